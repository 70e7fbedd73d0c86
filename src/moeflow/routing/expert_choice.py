"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from moeflow.config import expert_capacity
from moeflow.ops.losses import z_loss
from moeflow.routing.base import Router, Routing


class ExpertChoiceRouter(Router):
    """p = softmax(l) per token; expert e takes the C tokens of its group with the largest p[:, e].

    C = ceil(cf * k * T_g / E) with cf = capacity_factor (1 when None), so a token gets 0..E experts on
    average k; the combine weight is p[t, e]. Balanced by construction: no balance loss. Note that a token's
    experts depend on other tokens of its group, later ones included, so it is not causal for decoding.
    """

    def forward(self, x_TD: Tensor) -> Routing:
        """Route by letting every expert choose its tokens, group by group."""
        if x_TD.dim() != 2 or x_TD.shape[1] != self.cfg.d_model:
            raise ValueError(f"router expects [tokens, {self.cfg.d_model}], got {tuple(x_TD.shape)}")
        t, e, g = x_TD.shape[0], self.num_experts, self.cfg.num_groups
        self.group_ids(t, x_TD.device)  # validates divisibility
        tg = t // g
        cf = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else 1.0
        c = min(tg, expert_capacity(cf, self.top_k, tg, e, self.cfg.min_capacity))
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_GEC, idx_GEC = torch.topk(probs_TE.view(g, tg, e).transpose(1, 2), c, dim=-1)
        token_ids_N = (idx_GEC + (torch.arange(g, device=x_TD.device) * tg).view(g, 1, 1)).reshape(-1)
        expert_ids_N = torch.arange(e, device=x_TD.device).view(1, e, 1).expand(g, e, c).reshape(-1)
        all_N = torch.ones_like(token_ids_N, dtype=torch.bool)
        losses: dict[str, Tensor] = {}
        aux = logits_TE.new_zeros(())
        if self.cfg.z_loss_coef:
            losses["z_loss"] = z_loss(logits_TE)
            aux = aux + self.cfg.z_loss_coef * losses["z_loss"]
        return Routing(token_ids_N=token_ids_N, expert_ids_N=expert_ids_N, weights_N=w_GEC.reshape(-1),
                       routed_N=all_N, kept_N=all_N, probs_TE=probs_TE, logits_TE=logits_TE, num_tokens=t,
                       num_experts=e, top_k=0, capacity=c, losses=losses, aux_loss=aux)
