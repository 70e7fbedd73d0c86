"""GShard top-2 gating with random routing and local groups (Lepikhin et al. 2020, Algorithm 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from moeflow.ops.losses import gshard_aux_loss
from moeflow.routing.base import Router, Selection


class GShardRouter(Router):
    """e1 = argmax p, e2 = argmax p without e1; g1, g2 renormalised by g1 + g2.

    Random routing: the second assignment is kept only where 2 * g2 > u, u ~ U(0, 1) (training; in eval only if
    `eval_random_routing`). The capacity count puts all first choices before any second choice (the template's
    slot-major priority). Loss `load_balance` = E * sum_e (c_e / T) * m_e per group with c_e the first-choice
    counts and m_e the mean gate, averaged over groups (1 at balance).
    """

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Top-2 with the second choice kept at random in proportion to its gate."""
        g_T2, e_T2 = probs_TE.topk(2, dim=-1)
        g_T2 = g_T2 / g_T2.sum(-1, keepdim=True).clamp_min(torch.finfo(g_T2.dtype).tiny)
        routed_KT = None
        if self.cfg.random_routing and (self.training or self.cfg.eval_random_routing):
            u_T = torch.rand(g_T2.shape[0], device=g_T2.device, dtype=g_T2.dtype)
            second = 2.0 * g_T2[:, 1].detach() > u_T
            routed_KT = torch.stack([torch.ones_like(second), second])
        g, e = num_groups, self.num_experts
        t = probs_TE.shape[0]
        loss = gshard_aux_loss(probs_TE.view(g, t // g, e), e_T2[:, 0].reshape(g, t // g))
        losses = {"load_balance": loss}
        return Selection(e_T2.t(), g_T2.t(), routed_KT, losses, self.cfg.aux_loss_coef * loss)
