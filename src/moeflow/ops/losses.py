"""Auxiliary router losses and statistics, each with its scope and its value at perfect balance.

Shape legend: T = tokens in one routing group, E = experts, G = groups.

Every loss runs in at least fp32 (fp64 stays fp64), and an empty group (T = 0) contributes 0, not NaN, so a
rank or micro-batch without tokens does not poison the training loss.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32, or kept in its own dtype when that is wider (fp64 references must not lose precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def switch_balance_loss(probs_GTE: Tensor, counts_GE: Tensor, assignments_per_token: int) -> Tensor:
    """Switch/GShard load-balance loss E * sum_e f_e * P_e, averaged over groups; equals 1 at perfect balance.

    f_e = counts_e / (T * k) is the fraction of the group's assignments (before capacity drops) sent to e,
    P_e the mean router probability of e over the group's tokens. Only P_e carries gradient.
    """
    g, t, e = probs_GTE.shape
    if t == 0:
        return probs_GTE.sum() * 0.0  # keeps the autograd graph connected
    f_GE = counts_GE.to(probs_GTE.dtype) / (t * assignments_per_token)
    p_GE = probs_GTE.mean(dim=1)
    return (e * (f_GE * p_GE).sum(-1)).mean()


def gshard_aux_loss(gates_GTE: Tensor, first_choice_GT: Tensor) -> Tensor:
    """GShard aux loss E * sum_e (c_e / T) * m_e per group (c_e: first-choice counts, m_e: mean gate), averaged
    over groups; equals 1 at perfect balance."""
    g, t, e = gates_GTE.shape
    if t == 0:
        return gates_GTE.sum() * 0.0
    counts_GE = torch.zeros(g, e, dtype=gates_GTE.dtype, device=gates_GTE.device)
    counts_GE.scatter_add_(1, first_choice_GT, torch.ones_like(first_choice_GT, dtype=gates_GTE.dtype))
    return (e * ((counts_GE / t) * gates_GTE.mean(dim=1)).sum(-1)).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean_t(logsumexp_e(l_te)^2) (ST-MoE, Zoph et al. 2022)."""
    if logits_TE.shape[0] == 0:
        return _at_least_fp32(logits_TE).sum() * 0.0
    return torch.logsumexp(_at_least_fp32(logits_TE), dim=-1).square().mean()


def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation Var(x)/Mean(x)^2 (population variance); 0 at perfect balance."""
    x = _at_least_fp32(x)
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean().square() + eps)


def entropy(probs_TE: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of the router distribution."""
    p = _at_least_fp32(probs_TE)
    if p.shape[0] == 0:
        return p.sum() * 0.0
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
