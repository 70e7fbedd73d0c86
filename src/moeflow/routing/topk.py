"""Softmax top-k routing (Mixtral; Qwen2-MoE and OLMoE with normalize=False)."""

from __future__ import annotations

from torch import Tensor

from moeflow.routing.base import Router, Selection


class TopKRouter(Router):
    """p = softmax(l); the top-k experts of p; weights p_topk, renormalised to sum to 1 if `normalize`.

    Loss `load_balance` = E * sum_e f_e * P_e per routing group with f_e over all k choices (1 at balance).
    """

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Top-k of the softmax probabilities."""
        w_TK, e_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.cfg.normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        experts_KT, weights_KT = e_TK.t(), w_TK.t()
        losses = {"load_balance": self.balance_loss(probs_TE, experts_KT, None, group_T, num_groups)}
        return Selection(experts_KT, weights_KT, None, losses, self.cfg.aux_loss_coef * losses["load_balance"])
