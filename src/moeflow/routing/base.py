"""The `Routing` record every router returns, and the router template they share.

Shape legend: T = tokens, D = model dim, E = experts, K = experts per token, N = assignments
(token-choice: N = K*T in slot-major order, n = s*T + t), G = routing groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moeflow.config import MoEConfig
from moeflow.ops.capacity import capacity_keep
from moeflow.ops.noise import uniform_like
from moeflow.ops.threads import WorkerPool
from moeflow.ops.losses import entropy, switch_balance_loss, z_loss


@dataclass
class Routing:
    """One routing decision for T tokens, in flat (COO) assignment form.

    `kept_N` marks the assignments the experts will process; an assignment that is routed but not kept was
    dropped by capacity and contributes exactly zero. `aux_loss` is the sum of the coefficient-scaled losses
    (add it to the training loss); `losses` holds each unscaled term by name.
    """

    token_ids_N: Tensor  # int64 [N]
    expert_ids_N: Tensor  # int64 [N]
    weights_N: Tensor  # fp32 (or fp64) [N], combine weight of each assignment (differentiable w.r.t. the router)
    routed_N: Tensor  # bool [N], the router chose it (False: e.g. GShard's randomly skipped second choice)
    kept_N: Tensor  # bool [N], routed and within capacity
    probs_TE: Tensor  # fp32 [T, E] (fp64 for fp64 inputs), router probabilities (for statistics and losses)
    logits_TE: Tensor  # fp32 [T, E] (fp64 for fp64 inputs)
    num_tokens: int
    num_experts: int
    top_k: int  # K for token-choice routing (N = K*T, slot-major); 0 for expert choice
    capacity: int | None  # slots per expert per group (None: dropless)
    losses: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None

    @property
    def tokens_per_expert(self) -> Tensor:
        """Kept assignments per expert, int64 [E]."""
        return torch.bincount(self.expert_ids_N[self.kept_N], minlength=self.num_experts)

    @property
    def routed_per_expert(self) -> Tensor:
        """Routed assignments per expert before capacity drops, int64 [E]."""
        return torch.bincount(self.expert_ids_N[self.routed_N], minlength=self.num_experts)

    @property
    def dropped_fraction(self) -> Tensor:
        """Fraction of routed assignments dropped by capacity (0-dim float tensor)."""
        routed = self.routed_N.sum()
        return (routed - self.kept_N.sum()).float() / routed.clamp_min(1).float()

    @property
    def tokens_fully_dropped(self) -> Tensor:
        """Fraction of tokens none of whose assignments was kept (only the residual carries them)."""
        kept_T = torch.zeros(self.num_tokens, dtype=torch.bool, device=self.kept_N.device)
        kept_T[self.token_ids_N[self.kept_N]] = True
        if self.num_tokens == 0:
            return kept_T.new_zeros((), dtype=torch.float32)
        return 1.0 - kept_T.float().mean()

    @property
    def entropy(self) -> Tensor:
        """Mean router entropy in nats."""
        return entropy(self.probs_TE.detach())

    def stats(self) -> dict[str, object]:
        """Plain-Python statistics for logging (one device sync)."""
        out: dict[str, object] = {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "dropped_fraction": float(self.dropped_fraction),
            "entropy": float(self.entropy),
        }
        for name, v in self.losses.items():
            out[name] = float(v.detach())
        return out


def logits_finite(logits_TE: Tensor) -> bool:
    """True when every router logit is finite (one host sync)."""
    return not bool(non_finite_flag(logits_TE))


def non_finite_flag(logits_TE: Tensor) -> Tensor:
    """int64 [1] on the logits' device: 1 if any logit is NaN/inf, else 0 (no host sync).

    One reduction: a NaN or an infinity makes the sum NaN or infinite. (`isfinite(x).all()` is four passes over
    [T, E], 0.6 vs 0.07 ms at config B's [4096, 64].) Finite logits summing past the dtype's maximum also count
    as non-finite: logits that large would overflow the router's softmax anyway.
    """
    return (~torch.isfinite(logits_TE.sum())).to(torch.int64).view(1)


def non_finite_message(x_TD: Tensor, routing: Routing) -> str:
    """How many tokens have NaN/inf router logits, and whether the input or the router weights are the cause."""
    bad_tokens = int((~torch.isfinite(routing.logits_TE).all(-1)).sum())
    bad_inputs = int((~torch.isfinite(x_TD).all(-1)).sum())
    cause = (f"{bad_inputs} input tokens contain NaN/inf (check the previous layer)" if bad_inputs
             else "the router weights contain NaN/inf or overflow (check the learning rate and the last update)")
    return f"{bad_tokens} of {routing.num_tokens} tokens have non-finite router logits; {cause}"


@dataclass
class Selection:
    """What a router's `select` returns: K choices per token (slot-major [K, T]) and their weights."""

    experts_KT: Tensor
    weights_KT: Tensor
    routed_KT: Tensor | None = None  # None: all routed
    losses: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    probs_TE: Tensor | None = None  # None: the template's scores(logits); set by routers whose probabilities
    # are not a function of the expert logits alone (hierarchical: cluster prob x within-cluster prob)
    # expert choice: the experts choose, so the assignments are given flat (experts_KT, weights_KT as [1, N] with
    # these tokens) and already fill exactly `capacity` slots each: the template applies no capacity of its own
    token_ids_N: Tensor | None = None
    capacity: int | None = None


class Router(nn.Module):
    """Template: gate (fp32 logits) -> select (per router) -> capacity (shared) -> Routing.

    Subclasses implement `select(x_TD, logits_TE, probs_TE, group_T, num_groups)`; routing groups, capacity,
    dropping and the z-loss are applied here, once, for every router. Everything the template reads is in the
    config, per mode: train/eval capacity (`MoEConfig.capacity`) and groups (`MoEConfig.groups`), or one group
    per sequence (`group_by_sequence`, from the `seq_len` of the layer's input).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        """Create the gate weight [E, D] (and bias if configured)."""
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        # Switch's jitter is drawn on the router's own CPU workers (see ops/noise.py)
        self.noise_pool = WorkerPool(cfg.cpu_workers) if cfg.jitter_eps else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small init so initial routing is near uniform (Switch: truncated normal with small scale)."""
        nn.init.normal_(self.weight, std=self.cfg.d_model ** -0.5 * 0.1)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def gate_input(self, x_TD: Tensor) -> Tensor:
        """The router's input: x, with Switch's multiplicative jitter in training."""
        eps = self.cfg.jitter_eps or 0.0
        if self.training and eps > 0:
            return x_TD * uniform_like(x_TD, 1.0 - eps, 1.0 + eps, self.noise_pool)
        return x_TD

    def logits(self, x_TD: Tensor) -> Tensor:
        """fp32 router logits [T, E] (router precision matters: bf16 flips near-tied experts)."""
        # at least fp32: bf16 inputs are upcast, fp64 ones (reference tests) are not cast down
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return nn.functional.linear(self.gate_input(x_TD).to(dtype), self.weight.to(dtype), bias)

    def routing_groups(self, num_tokens: int, seq_len: int | None) -> int:
        """Routing groups of this forward: one per sequence (group_by_sequence), else the mode's fixed count."""
        if self.cfg.group_by_sequence:
            if seq_len is None or seq_len < 1 or num_tokens % seq_len:
                raise ValueError(f"group_by_sequence routes each sequence as its own group: the MoE layer needs "
                                 f"inputs [batch, seq, {self.cfg.d_model}], got {num_tokens} tokens with "
                                 f"seq_len={seq_len}")
            return max(num_tokens // seq_len, 1)
        g = self.cfg.groups(self.training)
        if num_tokens % g:
            raise ValueError(f"num_groups={g} must divide the number of tokens ({num_tokens}); "
                             "pick a num_groups that divides batch*sequence length")
        return g

    def group_ids(self, num_tokens: int, num_groups: int, device: torch.device) -> Tensor:
        """Group of each token: G contiguous, equal groups (GShard local groups, or sequences)."""
        return torch.arange(num_tokens, device=device) // max(num_tokens // num_groups, 1)

    def scores(self, logits_TE: Tensor) -> Tensor:
        """Router probabilities from logits (softmax by default)."""
        return torch.softmax(logits_TE, dim=-1)

    def balance_loss(self, probs_TE: Tensor, experts_KT: Tensor, routed_KT: Tensor | None, group_T: Tensor,
                     num_groups: int) -> Tensor:
        """Switch-style load-balance loss per routing group over all K choices (1 at balance), mean over groups."""
        g, e = num_groups, self.num_experts
        k, t = experts_KT.shape
        bucket = (group_T.unsqueeze(0) * e + experts_KT).reshape(-1)
        if routed_KT is not None:
            bucket = bucket[routed_KT.reshape(-1)]
        counts_GE = torch.bincount(bucket, minlength=g * e).view(g, e)
        return switch_balance_loss(probs_TE.view(g, t // g, e), counts_GE, k)

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Choose K experts per token and their combine weights (group_T [T]: each token's routing group)."""
        raise NotImplementedError

    def forward(self, x_TD: Tensor, seq_len: int | None = None) -> Routing:
        """Route T tokens [T, D] and return the full Routing record (capacity applied).

        `seq_len`: the length S of the sequences the tokens come from (the layer's input was [B, S, D]); only
        `group_by_sequence` reads it.
        """
        if x_TD.dim() != 2 or x_TD.shape[1] != self.cfg.d_model:
            raise ValueError(f"router expects [tokens, {self.cfg.d_model}], got {tuple(x_TD.shape)}")
        t = x_TD.shape[0]
        g = self.routing_groups(t, seq_len)
        group_T = self.group_ids(t, g, x_TD.device)
        logits_TE = self.logits(x_TD)
        probs_TE = self.scores(logits_TE)
        sel = self.select(x_TD, logits_TE, probs_TE, group_T, g)
        expert_ids_N = sel.experts_KT.reshape(-1)
        if sel.token_ids_N is not None:  # expert choice: every chosen assignment fits by construction
            k, token_ids_N, capacity = 0, sel.token_ids_N, sel.capacity
            routed_N = kept_N = torch.ones_like(expert_ids_N, dtype=torch.bool)
        else:
            k = sel.experts_KT.shape[0]
            token_ids_N = torch.arange(t, device=x_TD.device).repeat(k)
            routed_N = (torch.ones_like(expert_ids_N, dtype=torch.bool) if sel.routed_KT is None
                        else sel.routed_KT.reshape(-1))
            capacity = self.cfg.capacity(t // g, self.training)
            if capacity is None:
                kept_N = routed_N
            else:
                if self.cfg.drop_policy == "position":
                    # slot-major assignment order: all first choices (in token order) before any second choice
                    priority_N = torch.arange(k * t, device=x_TD.device)
                else:
                    priority_N = -sel.weights_KT.detach().reshape(-1)
                kept_N = capacity_keep(expert_ids_N, group_T.repeat(k), priority_N, routed_N,
                                       self.num_experts, g, capacity)
        losses = dict(sel.losses)
        aux = sel.aux_loss if sel.aux_loss is not None else logits_TE.new_zeros(())
        if self.cfg.z_loss_coef:
            losses["z_loss"] = z_loss(logits_TE)
            aux = aux + self.cfg.z_loss_coef * losses["z_loss"]
        return Routing(token_ids_N=token_ids_N, expert_ids_N=expert_ids_N, weights_N=sel.weights_KT.reshape(-1),
                       routed_N=routed_N, kept_N=kept_N,
                       probs_TE=probs_TE if sel.probs_TE is None else sel.probs_TE, logits_TE=logits_TE, num_tokens=t,
                       num_experts=self.num_experts, top_k=k, capacity=capacity, losses=losses, aux_loss=aux)
