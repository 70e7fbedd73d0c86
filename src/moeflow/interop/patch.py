"""`patch_hf(model)`: run the MoE blocks of a live `transformers` model through moeflow's dispatch and experts.

Each HF sparse block (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3, Switch) is replaced by a `PatchedMoE` that
*adopts the block's own submodules* under their own names: the HF router module (`gate` / `router`), the HF
experts module, the shared expert(s). So the parameters are the very same `nn.Parameter` objects (aliased, not
copied), `state_dict()` keys do not change, an optimizer built before or after patching trains what
`save_pretrained` writes, and transformers' output-capturing hooks on the router class still record the router
logits that its load-balancing loss reads. What changes is the path: HF's router output becomes a moeflow
`Routing` record (routing decisions stay exactly HF's: its router module computes them), `LocalDispatcher`
plans the expert-contiguous rows, moeflow's experts run every block of rows and sum them back per token (instead
of HF's experts implementation: the eager per-expert loop, `grouped_mm` or `batched_mm`).
Plain silu/gelu/relu experts on CPU run as moeflow's fused, chunked grouped MLP (`ops.grouped_mlp`), whose
weight-gradient memory is reused across steps; on CUDA bf16 they run as `torch._grouped_mm`.
The block returns what HF's block returns: the hidden states [B, S, D].

HF experts since transformers 5 are already stacked (`gate_up_proj` [E, 2H, D], gate rows first; `down_proj`
[E, D, H]) — moeflow's own layout — and are used in place. Switch keeps one `nn.Linear` per expert; its
weights are stacked with `torch.stack` on every forward (a differentiable copy, so gradients still reach the
per-expert parameters).

Shape legend: B = batch, S = sequence, T = B*S tokens, D = model dim, E = experts, K = experts per token,
N = K*T assignments (slot-major), R = kept rows sorted by expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeflow.dispatch import LocalDispatcher
from moeflow.experts import weight_and_sum
from moeflow.layers import RecordsRouting
from moeflow.ops.grouped import grouped_linear, resolve_impl
from moeflow.ops.grouped_mlp import GradBuffers, grouped_mlp
from moeflow.ops.rows import ExpertRows
from moeflow.ops.threads import WorkerPool
from moeflow.routing import Routing
from moeflow.routing.deepseek import update_balance_bias
from moeflow.routing.log import log_routing

# HF block class name -> architecture (matched by name, so moeflow never imports transformers here)
BLOCKS = {"MixtralSparseMoeBlock": "mixtral", "Qwen2MoeSparseMoeBlock": "qwen2_moe", "OlmoeSparseMoeBlock": "olmoe",
          "DeepseekV3MoE": "deepseek_v3", "SwitchTransformersSparseMLP": "switch_transformers"}


def routing_from_topk(logits_TE: Tensor, probs_TE: Tensor, e_TK: Tensor, w_TK: Tensor,
                      kept_T: Tensor | None = None, capacity: int | None = None) -> Routing:
    """A moeflow Routing record from an external router's top-k choice (slot-major assignments n = s*T + t)."""
    t, k = e_TK.shape
    routed_N = torch.ones(k * t, dtype=torch.bool, device=e_TK.device)
    kept_N = routed_N if kept_T is None else kept_T.repeat(k)
    return Routing(token_ids_N=torch.arange(t, device=e_TK.device).repeat(k), expert_ids_N=e_TK.t().reshape(-1),
                   weights_N=w_TK.t().reshape(-1), routed_N=routed_N, kept_N=kept_N, probs_TE=probs_TE,
                   logits_TE=logits_TE, num_tokens=t, num_experts=logits_TE.shape[-1], top_k=k, capacity=capacity)


class PatchedMoE(RecordsRouting, nn.Module):
    """An HF sparse MoE block re-run as route -> dispatch -> grouped experts -> combine (+ shared experts).

    After each forward `last_routing` holds the moeflow Routing record (tokens per expert, drops, entropy).
    """

    def __init__(self, block: nn.Module, arch: str) -> None:
        """Adopt the block's router, experts and shared experts (same objects, same attribute names)."""
        super().__init__()
        self.arch = arch
        self.dispatcher = LocalDispatcher()
        self.last_routing: Routing | None = None
        self.grad_buffers = GradBuffers()  # expert weight-gradient memory reused across steps (CPU)
        self.pool = WorkerPool()  # the experts' CPU workers (as many as torch's threads)
        self.jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)  # Mixtral: noise on the whole MoE input
        for name, child in block.named_children():
            setattr(self, name, child)  # gate/router, experts, shared_expert(s), shared_expert_gate

    def route(self, x: Tensor) -> Routing:
        """Call the HF router module (so hooks see it) and express its decision as a Routing record."""
        if self.arch == "switch_transformers":
            # per-sequence capacity: the HF router needs [B, S, D]; it zeroes the one-hot rows of dropped tokens
            onehot_BSE, p_BS1, logits_BSE = self.router(x)
            logits_TE = logits_BSE.reshape(-1, logits_BSE.shape[-1])
            # HF's own argmax: over fp32 softmax probabilities cast back to the input dtype
            e_T1 = torch.softmax(logits_TE.float(), -1).to(x.dtype).argmax(-1, keepdim=True)
            kept_T = onehot_BSE.reshape(-1, onehot_BSE.shape[-1]).sum(-1) > 0
            return routing_from_topk(logits_TE, torch.softmax(logits_TE.float(), -1), e_T1, p_BS1.reshape(-1, 1),
                                     kept_T, self.router.expert_capacity)
        logits_TE, w_TK, e_TK = self.gate(x.reshape(-1, x.shape[-1]))
        if self.arch == "deepseek_v3":
            s_TE = torch.sigmoid(logits_TE.float())
            probs_TE = s_TE / s_TE.sum(-1, keepdim=True)
        else:
            probs_TE = torch.softmax(logits_TE.float(), -1)
        return routing_from_topk(logits_TE, probs_TE, e_TK, w_TK)

    def expert_weights(self) -> tuple[Tensor, Tensor]:
        """Stacked (w_in [E, F, D], w_out [E, D, H]): HF's own tensors, or a per-forward stack for Switch."""
        if self.arch == "switch_transformers":
            mods = [self.experts[f"expert_{e}"] for e in range(len(self.experts))]
            return torch.stack([m.wi.weight for m in mods]), torch.stack([m.wo.weight for m in mods])
        return self.experts.gate_up_proj, self.experts.down_proj

    def fused_activation(self) -> str | None:
        """moeflow's name for HF's expert activation when the fused grouped MLP computes exactly the same thing
        (silu/gelu/relu; gated unless Switch), else None (then HF's own activation module runs)."""
        if self.arch == "switch_transformers":
            e0 = self.experts["expert_0"]
            if self.training and e0.dropout.p > 0:
                return None  # HF drops activations inside each expert; only its own modules do that
            return _plain_activation(e0.act)
        act = _plain_activation(self.experts.act_fn)
        return {"silu": "swiglu", "gelu": "geglu"}.get(act or "")

    def run_experts(self, x: Tensor, rows: ExpertRows) -> Tensor:
        """Every expert on its rows as the plan names them (see moeflow.dispatch.ExpertRows): on CPU the fused,
        chunked grouped MLP; where torch._grouped_mm runs, or for an activation that is not a plain
        silu/gelu/relu, two grouped matmuls around HF's own activation module."""
        w_in, w_out = self.expert_weights()
        impl = resolve_impl(x, w_in, "auto")  # torch._grouped_mm where it runs (CUDA bf16), else the loop
        act = self.fused_activation()
        if act is not None and impl == "loop":
            return grouped_mlp(x, w_in, w_out, rows.splits, act, self.grad_buffers, rows.weights_R, rows.tokens,
                               self.pool)
        x_RD = x if rows.tokens is None else rows.tokens.gather(x)
        h_RF = grouped_linear(x_RD, w_in, rows.counts_E, rows.splits, impl)
        if self.arch == "switch_transformers":
            e0 = self.experts["expert_0"]
            a_RH = e0.dropout(e0.act(h_RF))
        else:
            gate, up = h_RF.chunk(2, dim=-1)
            a_RH = self.experts.act_fn(gate) * up
        y_RD = grouped_linear(a_RH.to(w_out.dtype), w_out, rows.counts_E, rows.splits, impl)
        return weight_and_sum(y_RD, rows)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[B, S, D] -> [B, S, D], what the HF block returns: route -> dispatch -> experts -> combine (+ shared)."""
        x = hidden_states
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.route(x)
        x_in, plan = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.run_experts(x_in, plan.rows), plan).to(x.dtype)
        if self.arch == "qwen2_moe":
            y_TD = y_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_expert(x_TD)
        elif self.arch == "deepseek_v3":
            y_TD = y_TD + self.shared_experts(x_TD)
        self.last_routing = routing
        log_routing(self, routing)
        return y_TD.view(hidden_states.shape)

    @torch.no_grad()
    def update_bias(self, rate: float = 1e-3, tokens_per_expert: Tensor | None = None) -> Tensor:
        """DeepSeek-V3 only: aux-loss-free balancing step on the HF router's `e_score_correction_bias`
        (b_e += rate * sign(mean_load - load_e)), from the last forward's load unless one is given."""
        if self.arch != "deepseek_v3":
            raise TypeError(f"update_bias applies to DeepSeek-V3 blocks, this one is {self.arch}")
        if tokens_per_expert is None:
            if self.last_routing is None:
                raise RuntimeError("update_bias needs a forward first (or pass tokens_per_expert)")
            tokens_per_expert = self.last_routing.tokens_per_expert
        return update_balance_bias(self.gate.e_score_correction_bias, tokens_per_expert, rate)


def _plain_activation(act: nn.Module) -> str | None:
    """'silu' / 'gelu' (exact) / 'relu' for HF activation modules that are exactly these functions, else None."""
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    if name == "ReLU":
        return "relu"
    if name == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return "gelu"
    return None


def patch_hf(model: nn.Module) -> nn.Module:
    """Replace, in place, every supported HF sparse MoE block of `model` by a PatchedMoE; returns the model.

    Raises if the model has none (a dense model, or an architecture moeflow does not patch).
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child).__name__ in BLOCKS]
    if not targets:
        found = sorted({type(m).__name__ for m in model.modules() if "moe" in type(m).__name__.lower()})
        raise TypeError(f"patch_hf found no supported MoE block in {type(model).__name__} "
                        f"(supported: {', '.join(BLOCKS)}; MoE-like modules present: {found or 'none'})")
    for parent, name, child in targets:
        arch = BLOCKS[type(child).__name__]
        if arch != "switch_transformers" and getattr(child.experts, "has_bias", False):
            raise TypeError(f"{type(child).__name__} with expert biases is not supported by patch_hf")
        setattr(parent, name, PatchedMoE(child, arch))
    return model


__all__ = ["patch_hf", "PatchedMoE", "routing_from_topk", "BLOCKS"]
