"""Switch Transformer top-1 routing (Fedus et al. 2021)."""

from __future__ import annotations

from torch import Tensor

from moeflow.routing.base import Router, Selection


class SwitchRouter(Router):
    """Expert = argmax p; weight = that probability (not renormalised). Input jitter U(1-eps, 1+eps) in training.

    Loss `load_balance` = E * sum_e f_e * P_e per group (f_e: fraction of tokens whose argmax is e), weighted by
    `aux_loss_coef` (alpha = 1e-2); `z_loss` = mean(logsumexp(l)^2), weighted by `z_loss_coef` (beta = 1e-3).
    """

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Argmax expert per token."""
        w_T, e_T = probs_TE.max(dim=-1)
        experts_KT, weights_KT = e_T.unsqueeze(0), w_T.unsqueeze(0)
        losses = {"load_balance": self.balance_loss(probs_TE, experts_KT, None, group_T, num_groups)}
        return Selection(experts_KT, weights_KT, None, losses, self.cfg.aux_loss_coef * losses["load_balance"])
