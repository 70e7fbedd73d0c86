"""Auxiliary router losses and statistics, each with its scope and its value at perfect balance.

Shape legend: T = tokens in one routing group, E = experts, G = groups.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_balance_loss(probs_GTE: Tensor, counts_GE: Tensor, assignments_per_token: int) -> Tensor:
    """Switch/GShard load-balance loss E * sum_e f_e * P_e, averaged over groups; equals 1 at perfect balance.

    f_e = counts_e / (T * k) is the fraction of the group's assignments (before capacity drops) sent to e,
    P_e the mean router probability of e over the group's tokens. Only P_e carries gradient.
    """
    g, t, e = probs_GTE.shape
    f_GE = counts_GE.to(probs_GTE.dtype) / (t * assignments_per_token)
    p_GE = probs_GTE.mean(dim=1)
    return (e * (f_GE * p_GE).sum(-1)).mean()


def gshard_aux_loss(gates_GTE: Tensor, first_choice_GT: Tensor) -> Tensor:
    """GShard aux loss E * sum_e (c_e / T) * m_e per group (c_e: first-choice counts, m_e: mean gate), averaged
    over groups; equals 1 at perfect balance."""
    g, t, e = gates_GTE.shape
    counts_GE = torch.zeros(g, e, dtype=gates_GTE.dtype, device=gates_GTE.device)
    counts_GE.scatter_add_(1, first_choice_GT, torch.ones_like(first_choice_GT, dtype=gates_GTE.dtype))
    return (e * ((counts_GE / t) * gates_GTE.mean(dim=1)).sum(-1)).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean_t(logsumexp_e(l_te)^2) (ST-MoE, Zoph et al. 2022)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation Var(x)/Mean(x)^2 (population variance); 0 at perfect balance."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean().square() + eps)


def entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the router distribution."""
    p = probs_TE.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
