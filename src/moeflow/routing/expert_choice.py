"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from moeflow.config import expert_capacity
from moeflow.routing.base import Router, Selection


class ExpertChoiceRouter(Router):
    """p = softmax(l) per token; expert e takes the C tokens of its group with the largest p[:, e].

    C = ceil(cf * k * T_g / E) with cf = the mode's capacity factor (1 when dropless), so a token gets 0..E experts,
    on average k; the combine weight is p[t, e]. Balanced by construction: no balance loss. Note that a token's
    experts depend on other tokens of its group, later ones included, so it is not causal for decoding.
    """

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Every expert chooses its C tokens, group by group (assignments expert-major within each group)."""
        t, e, g = x_TD.shape[0], self.num_experts, num_groups
        tg = t // g
        c = self.cfg.capacity(tg, self.training)
        c = min(tg, expert_capacity(1.0, self.top_k, tg, e, self.cfg.min_capacity) if c is None else c)
        w_GEC, idx_GEC = torch.topk(probs_TE.view(g, tg, e).transpose(1, 2), c, dim=-1)
        token_ids_N = (idx_GEC + (torch.arange(g, device=x_TD.device) * tg).view(g, 1, 1)).reshape(-1)
        expert_ids_N = torch.arange(e, device=x_TD.device).view(1, e, 1).expand(g, e, c).reshape(1, -1)
        return Selection(expert_ids_N, w_GEC.reshape(1, -1), token_ids_N=token_ids_N, capacity=c)
