"""A plain, obviously-correct Mixture-of-Experts, written for the tests (slow on purpose).

Everything here follows DESIGN.md §3 and the papers literally, token by token, with Python loops and scalar
bookkeeping: no sorting tricks, no permutations, no grouped matmuls. The fast path (`moeflow.MoELayer`) is checked
against it in float64, forward and gradients. Weights stay differentiable 0-dim tensors, so autograd through this
file gives the reference gradients.

Shape legend: T = tokens, D = model dim, E = experts, H = expert hidden, F = 2H (gated) or H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor


@dataclass
class Assignment:
    """One (token, expert) pair: its combine weight, its choice rank, and whether it survives."""

    token: int
    expert: int
    weight: Tensor  # 0-dim, differentiable
    slot: int  # 0 = first choice (token choice); expert-choice assignments use 0
    routed: bool = True
    kept: bool = True


# ---------------------------------------------------------------- elementary functions, written out


def softmax_row(l_E: Tensor) -> Tensor:
    """exp(l - max) / sum(exp(l - max)) for one token."""
    z = torch.exp(l_E - l_E.max())
    return z / z.sum()


def probs(logits_TE: Tensor) -> Tensor:
    """Router probabilities, one token at a time."""
    return torch.stack([softmax_row(row) for row in logits_TE]) if len(logits_TE) else logits_TE.clone()


def activation(h: Tensor, name: str) -> Tensor:
    """The FFN nonlinearity from its formula; gated ones use the first half as gate, the second as up."""
    def silu(v: Tensor) -> Tensor:
        return v / (1.0 + torch.exp(-v))

    def gelu(v: Tensor) -> Tensor:
        return 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))

    if name in ("swiglu", "geglu"):
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        return (silu(gate) if name == "swiglu" else gelu(gate)) * up
    return {"relu": lambda v: torch.clamp(v, min=0.0), "gelu": gelu, "silu": silu}[name](h)


def expert_ffn(x_D: Tensor, w_in_FD: Tensor, w_out_DH: Tensor, act: str) -> Tensor:
    """One expert on one token: w_out @ act(w_in @ x)."""
    return w_out_DH @ activation(w_in_FD @ x_D, act)


def ranked(values_E: Tensor, exclude: tuple[int, ...] = ()) -> list[int]:
    """Indices in descending order of value (ties: lower index first), skipping `exclude`."""
    vals = values_E.detach().tolist()
    return sorted((e for e in range(len(vals)) if e not in exclude), key=lambda e: (-vals[e], e))


def capacity(cf: float, k: int, tokens: int, num_experts: int, min_capacity: int = 0) -> int:
    """C = max(ceil(cf * k * T / E), min_capacity), with cf read as the decimal the user wrote."""
    return max(math.ceil(Fraction(str(cf)) * k * tokens / num_experts), min_capacity)


def group_of(t: int, num_tokens: int, num_groups: int) -> int:
    """Local groups are contiguous and equal: token t belongs to group t // (T / G)."""
    return t // (num_tokens // num_groups)


# ---------------------------------------------------------------- routers (DESIGN.md §3)


def route_topk(p_TE: Tensor, k: int, normalize: bool) -> list[Assignment]:
    """Softmax top-k: the k most probable experts; weights p (renormalised over the k if `normalize`)."""
    out = []
    for t, p_E in enumerate(p_TE):
        chosen = ranked(p_E)[:k]
        total = sum(p_E[e] for e in chosen)
        for s, e in enumerate(chosen):
            out.append(Assignment(t, e, p_E[e] / total if normalize else p_E[e], s))
    return out


def route_switch(p_TE: Tensor) -> list[Assignment]:
    """Switch: the argmax expert, weighted by its raw probability."""
    return [Assignment(t, ranked(p_E)[0], p_E[ranked(p_E)[0]], 0) for t, p_E in enumerate(p_TE)]


def route_gshard(p_TE: Tensor, u_T: Tensor | None = None) -> list[Assignment]:
    """GShard top-2: g1, g2 renormalised by g1 + g2; the second kept only where 2 * g2 > u (if u is given)."""
    out = []
    for t, p_E in enumerate(p_TE):
        e1 = ranked(p_E)[0]
        e2 = ranked(p_E, exclude=(e1,))[0]
        g1, g2 = p_E[e1] / (p_E[e1] + p_E[e2]), p_E[e2] / (p_E[e1] + p_E[e2])
        out.append(Assignment(t, e1, g1, 0))
        out.append(Assignment(t, e2, g2, 1, routed=u_T is None or bool(2.0 * g2 > u_T[t])))
    return out


def route_noisy(h_TE: Tensor, k: int) -> list[Assignment]:
    """Noisy top-k: keep the k largest noisy logits H; the weights are a softmax over those k alone."""
    out = []
    for t, h_E in enumerate(h_TE):
        chosen = ranked(h_E)[:k]
        w = softmax_row(torch.stack([h_E[e] for e in chosen]))
        out.extend(Assignment(t, e, w[s], s) for s, e in enumerate(chosen))
    return out


def route_expert_choice(p_TE: Tensor, c: int, num_groups: int) -> list[Assignment]:
    """Expert choice: in each group, expert e takes the C tokens with the largest p[t, e]; weight p[t, e]."""
    t_all, e_all = p_TE.shape
    tg = t_all // num_groups
    out = []
    for g in range(num_groups):
        for e in range(e_all):
            col = p_TE[g * tg:(g + 1) * tg, e]
            out.extend(Assignment(g * tg + i, e, p_TE[g * tg + i, e], 0) for i in ranked(col)[:c])
    return out


def apply_capacity(assignments: list[Assignment], cap: int | None, policy: str, num_tokens: int,
                   num_groups: int) -> None:
    """Mark `kept`: walk the routed assignments of each group in priority order and fill each expert's slots.

    position: all first choices (in token order) before any second choice; probs: larger weight first.
    """
    for a in assignments:
        a.kept = a.routed
    if cap is None:
        return
    if policy == "position":
        order = sorted(assignments, key=lambda a: (a.slot, a.token))
    else:
        order = sorted(assignments, key=lambda a: (-float(a.weight.detach()), a.slot, a.token))
    used: dict[tuple[int, int], int] = {}
    for a in order:
        if not a.routed:
            continue
        key = (group_of(a.token, num_tokens, num_groups), a.expert)
        a.kept = used.get(key, 0) < cap
        used[key] = used.get(key, 0) + 1


# ---------------------------------------------------------------- the layer


def moe_forward(x_TD: Tensor, assignments: list[Assignment], w_in_EFD: Tensor, w_out_EDH: Tensor,
                act: str) -> Tensor:
    """y_t = sum over t's kept assignments of weight * expert_e(x_t); zero if none kept."""
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for a in assignments:
            if a.token == t and a.kept:
                y_D = y_D + a.weight * expert_ffn(x_TD[t], w_in_EFD[a.expert], w_out_EDH[a.expert], act)
        rows.append(y_D)
    return torch.stack(rows) if rows else x_TD.new_zeros(x_TD.shape)


def dense_ffn(x_TD: Tensor, w_in_FD: Tensor, w_out_DH: Tensor, act: str) -> Tensor:
    """The dense FFN, token by token."""
    return torch.stack([expert_ffn(x, w_in_FD, w_out_DH, act) for x in x_TD])


# ---------------------------------------------------------------- losses


def balance_loss(p_TE: Tensor, assignments: list[Assignment], num_groups: int) -> Tensor:
    """Switch / top-k load balance per group, E * sum_e f_e * P_e, averaged over groups.

    f_e: fraction of the group's routed assignments (before capacity) that chose e; P_e: mean probability of e.
    """
    t_all, e_all = p_TE.shape
    tg = t_all // num_groups
    per_group = []
    for g in range(num_groups):
        mine = [a for a in assignments if a.routed and group_of(a.token, t_all, num_groups) == g]
        total = 0.0
        for e in range(e_all):
            f_e = sum(1 for a in mine if a.expert == e) / len(mine)
            p_e = sum(p_TE[t, e] for t in range(g * tg, (g + 1) * tg)) / tg
            total = total + f_e * p_e
        per_group.append(e_all * total)
    return sum(per_group) / num_groups


def gshard_aux(p_TE: Tensor, assignments: list[Assignment], num_groups: int) -> Tensor:
    """GShard aux: E * sum_e (c_e / T) * m_e per group, c_e = first-choice counts, m_e = mean gate."""
    firsts = [a for a in assignments if a.slot == 0]
    return balance_loss(p_TE, firsts, num_groups)


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of log(sum_e exp(l_e))^2."""
    return sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits_TE) / logits_TE.shape[0]


def cv_squared(v: Tensor) -> Tensor:
    """Squared coefficient of variation with the population variance (tensor2tensor's cv_squared, eps 1e-10)."""
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return var / (mean ** 2 + 1e-10)


def normal_cdf(z: Tensor) -> Tensor:
    """Phi(z) = (1 + erf(z / sqrt 2)) / 2."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def kth_excluding(h_E: Tensor, k: int, i: int) -> Tensor:
    """The k-th largest component of h, leaving out component i (Shazeer et al. 2017, below eq. 9)."""
    return h_E[ranked(h_E, exclude=(i,))[k - 1]]


def shazeer_losses(logits_TE: Tensor, h_TE: Tensor, std_TE: Tensor, k: int, num_groups: int,
                   noisy: bool = True) -> tuple[Tensor, Tensor]:
    """Importance and load losses of "Outrageously Large Neural Networks", eq. (6)-(10), per group, averaged.

    Importance(X) = sum_x G(x) (6), L = CV(Importance)^2 (7). P(x, i) = Phi((x W_g)_i - kth_excluding(H(x), k, i))
    / std_i) (9), Load(X)_i = sum_x P(x, i) (10), L = CV(Load)^2. Without noise (eval), Load counts the top-k.
    """
    t_all, e_all = logits_TE.shape
    tg = t_all // num_groups
    gates = {(a.token, a.expert): a.weight for a in route_noisy(h_TE, k)}
    imp, load = [], []
    for g in range(num_groups):
        tokens = range(g * tg, (g + 1) * tg)
        importance_E = [sum(gates.get((t, e), torch.zeros(())) for t in tokens) for e in range(e_all)]
        if noisy:
            load_E = [sum(normal_cdf((logits_TE[t, e] - kth_excluding(h_TE[t], k, e)) / std_TE[t, e])
                          for t in tokens) for e in range(e_all)]
        else:
            load_E = [torch.tensor(float(sum((t, e) in gates for t in tokens))) for e in range(e_all)]
        imp.append(cv_squared(importance_E))
        load.append(cv_squared(load_E))
    return sum(imp) / num_groups, sum(load) / num_groups


# ---------------------------------------------------------------- a whole reference layer


@dataclass
class Noise:
    """The random draws of one training forward, replayed from the same seed (None: eval / no noise)."""

    jitter_TD: Tensor | None = None  # Switch: multiplicative input jitter
    eps_TE: Tensor | None = None  # noisy top-k: standard normal noise
    u_T: Tensor | None = None  # GShard: uniform draw of random routing


def reference_layer(layer, x_TD: Tensor, noise: Noise | None = None) -> tuple[Tensor, Tensor, list[Assignment]]:
    """Route, apply capacity and run the experts of `layer` with the code above: (y_TD, aux_loss, assignments).

    Only the layer's parameters and config are read; none of its routing or dispatch code runs.
    """
    cfg, r = layer.cfg, layer.router
    noise = noise or Noise()
    t = x_TD.shape[0]
    gate_in = x_TD * noise.jitter_TD if noise.jitter_TD is not None else x_TD
    logits = gate_in @ r.weight.t() + (r.bias if r.bias is not None else 0.0)
    p = probs(logits)
    aux = torch.zeros((), dtype=x_TD.dtype)
    if cfg.router == "expert_choice":
        c = min(t // cfg.num_groups, capacity(cfg.capacity_factor or 1.0, cfg.top_k, t // cfg.num_groups,
                                              cfg.num_experts, cfg.min_capacity))
        assignments = route_expert_choice(p, c, cfg.num_groups)
    else:
        if cfg.router == "topk":
            assignments = route_topk(p, cfg.top_k, cfg.normalize)
            aux = aux + cfg.aux_loss_coef * balance_loss(p, assignments, cfg.num_groups)
        elif cfg.router == "switch":
            assignments = route_switch(p)
            aux = aux + cfg.aux_loss_coef * balance_loss(p, assignments, cfg.num_groups)
        elif cfg.router == "gshard":
            assignments = route_gshard(p, noise.u_T)
            aux = aux + cfg.aux_loss_coef * gshard_aux(p, assignments, cfg.num_groups)
        elif cfg.router == "noisy_topk":
            if noise.eps_TE is not None:
                std = torch.nn.functional.softplus(x_TD @ r.noise_weight.t()) + 1e-2
                h = logits + noise.eps_TE * std
            else:
                std, h = None, logits
            assignments = route_noisy(h, cfg.top_k)
            imp, load = shazeer_losses(logits, h, std, cfg.top_k, cfg.num_groups, noisy=std is not None
                                       and cfg.top_k < cfg.num_experts)
            aux = aux + cfg.importance_coef * imp + cfg.load_coef * load
        else:
            raise ValueError(f"no reference for router {cfg.router!r}")
        apply_capacity(assignments, None if cfg.capacity_factor is None else capacity(
            cfg.capacity_factor, cfg.top_k, t // cfg.num_groups, cfg.num_experts, cfg.min_capacity),
            cfg.drop_policy, t, cfg.num_groups)
    if cfg.z_loss_coef:
        aux = aux + cfg.z_loss_coef * z_loss(logits)
    y = moe_forward(x_TD, assignments, layer.experts.w_in, layer.experts.w_out, cfg.activation)
    if layer.shared is not None:
        s = dense_ffn(x_TD, layer.shared.w_in, layer.shared.w_out, cfg.activation)
        if layer.shared_gate is not None:
            s = torch.sigmoid(x_TD @ layer.shared_gate.weight.t()) * s
        y = y + s
    return y, aux, assignments
