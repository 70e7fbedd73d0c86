"""DeepSeek-V3 routing: sigmoid (or softmax) affinities, group-limited top-k, aux-loss-free balancing bias.

DeepSeek-V3 technical report (arXiv:2412.19437) §2.1.2, and HF `DeepseekV3TopkRouter` (transformers 5.23):
  s = sigmoid(x . W_g)                                   affinities [T, E]
  selection uses s + b, b a per-expert bias that no gradient touches;
  groups: experts split into n_group contiguous groups, each scored by the sum of its top-2 (s + b);
          only the best topk_group groups are eligible;
  weights = the chosen s (without b), normalised over the k choices (norm_topk_prob), times routed_scaling_factor;
  after each optimizer step: b_e += gamma * sign(mean_load - load_e)  (`update_bias`).

Shape legend: T = tokens, E = experts, K = experts per token, G = expert groups (n_group), M = experts per group.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeflow.config import MoEConfig
from moeflow.routing.base import Router, Routing, Selection
from moeflow.routing.log import MergedRouting, RoutingLog


def group_limited_mask(scores_TE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Bool [T, E]: experts in each token's best `topk_group` of `n_group` groups, groups ranked by top-2 sum.

    A group of one expert is scored by that expert alone (top-2 needs two).
    """
    t, e = scores_TE.shape
    if n_group == 1 or topk_group == n_group:
        return torch.ones_like(scores_TE, dtype=torch.bool)
    m = e // n_group
    group_scores_TG = scores_TE.view(t, n_group, m).topk(min(2, m), dim=-1).values.sum(-1)
    best_TG = group_scores_TG.topk(topk_group, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return keep_TG.unsqueeze(-1).expand(t, n_group, m).reshape(t, e)


@torch.no_grad()
def update_balance_bias(bias_E: Tensor, tokens_per_expert: Tensor, rate: float) -> Tensor:
    """In place: b_e += rate * sign(mean_load - load_e) (DeepSeek-V3 aux-loss-free balancing); returns bias_E."""
    load_E = torch.as_tensor(tokens_per_expert, device=bias_E.device).float()
    if load_E.shape != bias_E.shape:
        raise ValueError(f"tokens_per_expert must have shape {tuple(bias_E.shape)} (one count per expert), "
                         f"got {tuple(load_E.shape)}")
    if not torch.isfinite(load_E).all():
        raise ValueError("tokens_per_expert contains NaN or inf")
    if rate:
        bias_E.add_(rate * torch.sign(load_E.mean() - load_E).to(bias_E.dtype))
    return bias_E


class DeepSeekRouter(Router):
    """Sigmoid/softmax affinities with group-limited top-k and the aux-loss-free load-balancing bias.

    The bias is the persistent buffer `e_score_correction_bias` [E] (fp32, the name HF checkpoints use); it only
    changes through `update_bias`, which the trainer calls after `optimizer.step()` with the step's measured load.
    `probs_TE` in the Routing record holds the affinities normalised over all experts (s / sum s), a distribution
    for statistics and for the optional sequence-wise balance loss `load_balance` = E * sum_e f_e * P_e per routing
    group (DeepSeek-V3 eq. 17-20; 1 at balance), weighted by `aux_loss_coef` (set it to 0 for the pure
    aux-loss-free recipe, or ~1e-4 as in DeepSeek-V3).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        """Gate weight [E, D] (template) and the zero-initialised correction bias [E]."""
        super().__init__(cfg)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def affinities(self, logits_TE: Tensor) -> Tensor:
        """s: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2) of the fp32 logits."""
        if self.cfg.score_func == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def scores(self, logits_TE: Tensor) -> Tensor:
        """Affinities normalised to a distribution over experts (for losses and statistics)."""
        s_TE = self.affinities(logits_TE)
        return s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-20)

    def select(self, x_TD: Tensor, logits_TE: Tensor, probs_TE: Tensor, group_T: Tensor,
               num_groups: int) -> Selection:
        """Top-k of (s + b) within the eligible groups; weights from s alone."""
        cfg = self.cfg
        s_TE = self.affinities(logits_TE)
        # NOTE: the bias steers selection only; it is a buffer, so no gradient reaches it through the choice
        choice_TE = s_TE.detach() + self.e_score_correction_bias.float()
        eligible_TE = group_limited_mask(choice_TE, cfg.n_group, cfg.topk_group)
        choice_TE = choice_TE.masked_fill(~eligible_TE, float("-inf"))
        e_TK = choice_TE.topk(self.top_k, dim=-1).indices
        w_TK = s_TE.gather(1, e_TK)
        if cfg.normalize:
            w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
        w_TK = w_TK * cfg.routed_scaling_factor
        experts_KT, weights_KT = e_TK.t(), w_TK.t()
        losses = {"load_balance": self.balance_loss(probs_TE, experts_KT, None, group_T, num_groups)}
        return Selection(experts_KT, weights_KT, None, losses, cfg.aux_loss_coef * losses["load_balance"])

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor, rate: float | None = None) -> Tensor:
        """b_e += rate * sign(mean_load - load_e); returns the new bias. Call after optimizer.step().

        Args:
            tokens_per_expert: measured load [E] of the step (summed over micro-batches if accumulating).
            rate: gamma; defaults to `MoEConfig.bias_update_rate` (0 leaves the bias unchanged).
        """
        gamma = self.cfg.bias_update_rate if rate is None else rate
        return update_balance_bias(self.e_score_correction_bias, tokens_per_expert, gamma)


def update_router_biases(log: RoutingLog, rate: float | None = None) -> int:
    """After optimizer.step(): every DeepSeek router that routed inside `log`'s scope nudges its bias from the
    step's load (its layer's counts summed over every forward in the scope, e.g. over micro-batches).

    The counts come from the log, not from a module attribute, so an activation-checkpoint recompute cannot
    change them. Returns how many routers were updated.
    """
    n = 0
    for layer, routing in deepseek_loads(log):
        layer.router.update_bias(routing.tokens_per_expert, rate)
        n += 1
    return n


def deepseek_loads(log: RoutingLog) -> list[tuple[nn.Module, Routing | MergedRouting]]:
    """(layer, merged routing) of every layer in `log` whose router is a DeepSeekRouter, in first-call order."""
    layers = [m for m in dict.fromkeys(layer for layer, _ in log.entries)
              if isinstance(getattr(m, "router", None), DeepSeekRouter)]
    return list(zip(layers, log.per_layer(layers)))  # type: ignore[arg-type]
