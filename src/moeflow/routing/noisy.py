"""Noisily gated top-k (Shazeer et al. 2017, "Outrageously Large Neural Networks")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeflow.config import MoEConfig
from moeflow.ops.losses import cv_squared
from moeflow.routing.base import Router, Selection


class NoisyTopKRouter(Router):
    """H = l + eps * softplus(x W_noise), eps ~ N(0, 1) in training only; keep the top-k of H; softmax over those k.

    Losses (eq. 6-10 of the paper), per routing group and averaged over groups, both 0 at perfect balance:
    `importance` = CV(sum_x G(x))^2 weighted by `importance_coef`; `load` = CV(sum_x P(x, e))^2 weighted by
    `load_coef`, with the smooth estimator P(x, e) = Phi((l_e - kth_excluding(H, k, e)) / softplus(x W_noise)_e).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        """Add the noise projection W_noise [E, D] (zero-initialised as in the paper)."""
        super().__init__(cfg)
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Noisy top-k with softmax over the kept logits."""
        k, e = self.top_k, self.num_experts
        t = logits_TE.shape[0]
        noisy = self.training
        if noisy:
            with torch.autocast(x_TD.device.type, enabled=False):
                raw_TE = x_TD.to(logits_TE.dtype) @ self.noise_weight.to(logits_TE.dtype).t()
                std_TE = nn.functional.softplus(raw_TE) + 1e-2  # + 1e-2 as in tensor2tensor's noise_epsilon
            h_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        else:
            h_TE = logits_TE
        top_k1 = min(k + 1, e)
        top_vals, top_idx = torch.topk(h_TE, top_k1, dim=-1)
        gates_TK = torch.softmax(top_vals[:, :k], dim=-1)
        gates_TE = torch.zeros_like(h_TE).scatter(1, top_idx[:, :k], gates_TK)
        g = num_groups
        importance = torch.stack([cv_squared(s) for s in gates_TE.view(g, t // g, e).sum(1)]).mean()
        if noisy and k < e:
            # P(x, e) = Pr[l_e + noise beats the k-th largest of H among the other experts]
            thresh_in = top_vals[:, k:k + 1]  # for experts in the top k, the (k+1)-th value is the bar
            thresh_out = top_vals[:, k - 1:k]  # for the others, the k-th value
            in_top = h_TE > thresh_in
            thresh_TE = torch.where(in_top, thresh_in, thresh_out)
            # ndtr is the standard normal CDF; unlike distributions.Normal it does not reject NaN with an
            # unrelated message, so a NaN input reaches MoELayer's finite check
            p_TE = torch.special.ndtr((logits_TE - thresh_TE) / std_TE)
            load_E = p_TE.view(g, t // g, e).sum(1)
        else:
            load_E = (gates_TE > 0).float().view(g, t // g, e).sum(1)
        load = torch.stack([cv_squared(s) for s in load_E]).mean()
        losses = {"importance": importance, "load": load}
        aux = self.cfg.importance_coef * importance + self.cfg.load_coef * load
        return Selection(top_idx[:, :k].t(), gates_TK.t(), None, losses, aux)
