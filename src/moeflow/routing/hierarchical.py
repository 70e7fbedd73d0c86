"""Hierarchical routing: pick a cluster of experts, then top-k inside it (Shazeer et al. 2017 §B, DESIGN.md §3).

Shape legend: T = tokens, D = model dim, E = experts, G = clusters (`num_clusters`), M = experts per cluster
(E / G), K = experts per token.

Cluster c holds the contiguous experts [c*M, (c+1)*M). Under expert parallelism rank p holds the contiguous
block [p*E/P, (p+1)*E/P), so with `num_clusters` a multiple of the EP size every cluster lives on one rank and
a token's all-to-all traffic goes to exactly one rank (its K rows), instead of up to K ranks for flat top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeflow.config import MoEConfig
from moeflow.routing.base import Router, Selection


class HierarchicalRouter(Router):
    """q = softmax(x . W_c) over G cluster prototypes; c = argmax q; then top-k of p(.|c) = softmax of the
    expert logits over cluster c's M experts only.

    Weights: w_j = q_c * p(e_j|c), with p(.|c) renormalised over the k choices first when `normalize` (the
    default), so a token's weights sum to q_c (as in Shazeer's hierarchical MoE, the cluster gate scales its
    cluster's output; this is what gives the prototypes a gradient from the task loss).
    `probs_TE` is the joint distribution P(e) = q_c(e) * p(e|c(e)) over all E experts (sums to 1).
    Losses per routing group, averaged over groups, each 1 at perfect balance, both weighted by `aux_loss_coef`:
      `cluster_balance` = G * sum_c f_c * Q_c     (f_c: fraction of tokens sent to c, Q_c: mean q_c)
      `load_balance`    = M * sum_e (n_e / (k T)) * P_e|c   (n_e: assignments to e, P_e|c: mean of p(e|c) over the
                          tokens sent to e's cluster); a within-cluster Switch loss, weighted by cluster share.
    z-loss (if `z_loss_coef`) applies to the expert logits, as for the other routers.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        """Expert gate [E, D] (template) plus the cluster prototypes [G, D]."""
        super().__init__(cfg)
        self.num_clusters = cfg.num_clusters
        self.cluster_weight = nn.Parameter(torch.empty(cfg.num_clusters, cfg.d_model))
        nn.init.normal_(self.cluster_weight, std=cfg.d_model ** -0.5 * 0.1)

    def cluster_logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        """Cluster logits [T, G] in the router's precision (at least fp32), with the same input jitter."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return nn.functional.linear(self.gate_input(x_TD).to(dtype), self.cluster_weight.to(dtype))

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Cluster by argmax of q, then top-k within the cluster."""
        g_clusters, e, k = self.num_clusters, self.num_experts, self.top_k
        m = e // g_clusters
        t = logits_TE.shape[0]
        q_TG = torch.softmax(self.cluster_logits(x_TD, logits_TE.dtype), dim=-1)
        cluster_T = q_TG.argmax(-1)
        p_TGM = torch.softmax(logits_TE.view(t, g_clusters, m), dim=-1)  # p(.|c) for every cluster
        p_TM = p_TGM.gather(1, cluster_T.view(t, 1, 1).expand(t, 1, m)).squeeze(1)
        w_TK, local_TK = torch.topk(p_TM, k, dim=-1)
        if self.cfg.normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        q_T = q_TG.gather(1, cluster_T.unsqueeze(1))
        w_TK = q_T * w_TK
        experts_TK = cluster_T.unsqueeze(1) * m + local_TK
        joint_TE = (q_TG.unsqueeze(-1) * p_TGM).reshape(t, e)
        losses = self._balance_losses(q_TG, cluster_T, p_TGM, experts_TK, group_T, num_groups)
        aux = self.cfg.aux_loss_coef * (losses["cluster_balance"] + losses["load_balance"])
        return Selection(experts_TK.t(), w_TK.t(), None, losses, aux, probs_TE=joint_TE)

    def _balance_losses(self, q_TG: Tensor, cluster_T: Tensor, p_TGM: Tensor, experts_TK: Tensor,
                        group_T: Tensor, n_groups: int) -> dict[str, Tensor]:
        """Both levels' Switch-style losses per routing group (see the class docstring), averaged over groups."""
        (t, g_clusters, m), k = p_TGM.shape, experts_TK.shape[1]
        tg = t // n_groups
        dtype = q_TG.dtype
        # level 1: clusters
        tokens_GC = torch.bincount(group_T * g_clusters + cluster_T, minlength=n_groups * g_clusters)
        f_GC = tokens_GC.view(n_groups, g_clusters).to(dtype) / max(tg, 1)
        q_mean_GC = q_TG.view(n_groups, tg, g_clusters).mean(1)
        cluster_loss = (g_clusters * (f_GC * q_mean_GC).sum(-1)).mean()
        # level 2: experts within the chosen cluster; P_e|c averages p(e|c) over the tokens routed to c
        p_own_TGM = p_TGM * nn.functional.one_hot(cluster_T, g_clusters).to(dtype).unsqueeze(-1)
        p_sum_GE = p_own_TGM.view(n_groups, tg, g_clusters * m).sum(1)
        p_mean_GE = p_sum_GE / tokens_GC.view(n_groups, g_clusters).clamp_min(1).to(dtype).repeat_interleave(m, 1)
        n_GE = torch.bincount((group_T.unsqueeze(1) * g_clusters * m + experts_TK).reshape(-1),
                              minlength=n_groups * g_clusters * m).view(n_groups, -1).to(dtype)
        expert_loss = (m * (n_GE / max(k * tg, 1) * p_mean_GE).sum(-1)).mean()
        return {"cluster_balance": cluster_loss, "load_balance": expert_loss}
