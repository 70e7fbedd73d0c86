"""Grouped MLP: expert e's whole FFN on its contiguous block of rows, fused and chunked (the CPU hot path).

Shape legend: R = rows (assignments sorted by expert), D = model dim, H = expert hidden dim, F = input-projection
width (2H for gated activations: gate rows first, then up rows), E = experts.
Weights are stored like nn.Linear: w_in [E, F, D], w_out [E, D, H].

Why not two `grouped_linear` calls and autograd in between: on CPU every large temporary is fresh memory that
page-faults on first touch (glibc serves blocks over 32 MiB with mmap and unmaps them on free), and the autograd
graph of `silu(gate) * up` keeps three [R, H]-sized tensors and builds a `cat` for the gradient of h. Here the
activation and all its gradients exist for one chunk (an expert's block, split past 4M elements) at a time.

With `tokens=` (the dispatch's token <-> row map) the op also takes over dispatch and combine: each chunk gathers
its rows from the token-major input itself and the rows' outputs are summed back per token, so the [R, D] copy
of the input is never written or saved, nor the [R, D] gather of the output gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from moeflow.config import ACTIVATIONS, GATED
from moeflow.ops.rows import TokenRows
from moeflow.ops.threads import WorkerPool
from moeflow.ops.tuning import tuning


def _blocks(splits: list[int], rows: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """(expert, [(start, stop) of each chunk of at most `rows` rows]) for every expert that has rows."""
    out, start = [], 0
    for e, n in enumerate(splits):
        if n:
            out.append((e, [(lo, min(lo + rows, start + n)) for lo in range(start, start + n, rows)]))
        start += n
    return out


def _row_reader(x: Tensor, tokens: TokenRows | None) -> Callable[[int, int], Tensor]:
    """Rows lo:hi of the expert-sorted rows: a slice of x, or (token-major x) those rows gathered from x."""
    if tokens is None:
        return lambda lo, hi: x[lo:hi]
    # NOTE: gathered per chunk inside the worker, the rows land in its cache right before its GEMM reads them; no
    # [R, D] copy is written, kept for the backward and read back (16 MB per layer on benchmarks/layer.py's B)
    return lambda lo, hi: x.index_select(0, tokens.token_ids_R[lo:hi])


def _costs(blocks: list[tuple[int, list[tuple[int, int]]]], w_in_EFD: Tensor) -> list[int]:
    """Multiply-adds of each block's forward (rows x F x D; the output projection is proportional)."""
    per_row = w_in_EFD.shape[1] * w_in_EFD.shape[2]
    return [(spans[-1][1] - spans[0][0]) * per_row for _, spans in blocks]


def _activation(h: Tensor, activation: str) -> tuple[Tensor, Tensor | None]:
    """(act(h), act(gate)) over the last dim; the second, which the backward reuses, only for gated ones."""
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        act_gate = F.silu(gate) if activation == "swiglu" else F.gelu(gate)
        return act_gate * up, act_gate
    if activation == "relu":
        return F.relu(h), None
    if activation == "gelu":
        return F.gelu(h), None
    if activation == "silu":
        return F.silu(h), None
    raise ValueError(f"unknown activation {activation!r}; use one of {ACTIVATIONS}")


def activate(h: Tensor, activation: str) -> Tensor:
    """The FFN nonlinearity (config.ACTIVATIONS); gated ones split h into (gate, up) halves of the last dim."""
    return _activation(h, activation)[0]


def _nonlinearity_backward(grad: Tensor, x: Tensor, out: Tensor, name: str) -> None:
    """out = d name(x) / d x * grad (out may alias grad)."""
    if name == "silu":
        torch.ops.aten.silu_backward(grad, x, grad_input=out)
    elif name == "gelu":
        torch.ops.aten.gelu_backward(grad, x, approximate="none", grad_input=out)
    else:
        torch.ops.aten.threshold_backward(grad, x, 0.0, grad_input=out)


def _activation_backward(h: Tensor, act_gate: Tensor | None, grad_a: Tensor, activation: str) -> Tensor:
    """d loss / d h for one chunk, from d loss / d act(h), written straight into one [rows, F] tensor."""
    grad_h = torch.empty_like(h)
    if activation == "swiglu" or activation == "geglu":
        assert act_gate is not None
        half = h.shape[1] // 2
        gate, up = h[:, :half], h[:, half:]
        grad_gate, grad_up = grad_h[:, :half], grad_h[:, half:]
        torch.mul(grad_a, act_gate, out=grad_up)
        torch.mul(grad_a, up, out=grad_gate)  # d loss / d act(gate), then through act's derivative in place
        _nonlinearity_backward(grad_gate, gate, grad_gate, "silu" if activation == "swiglu" else "gelu")
    else:
        _nonlinearity_backward(grad_a, h, grad_h, activation)
    return grad_h


def _mm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b (an expert's weight gradient summed over its chunks)."""
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _chunk_forward(x: Tensor, w_in: Tensor, w_out: Tensor, y: Tensor, w: Tensor | None,
                   activation: str) -> Tensor:
    """y = act(x @ w_in^T) @ w_out^T for one chunk of one expert (times w per row if given); returns h."""
    h = torch.mm(x, w_in.t())
    a, _ = _activation(h, activation)
    torch.mm(a, w_out.t(), out=y)
    if w is not None:
        y.mul_(w.unsqueeze(1))
    return h


def _chunk_backward(g: Tensor, x: Tensor, h: Tensor, w_in: Tensor, w_out: Tensor, w: Tensor | None,
                    gw: Tensor | None, gw_in: Tensor | None, gw_out: Tensor | None, gx: Tensor | None,
                    accumulate: bool, activation: str) -> None:
    """One chunk's gradients: the row weights' (gw), w_out's and w_in's (summed into if `accumulate`), x's."""
    a, act_gate = _activation(h, activation)
    grad_a = torch.mm(g, w_out)
    if w is not None:  # y_r = w_r * u_r with u_r = a_r @ w_out^T: d/dw_r = <g_r, u_r> = <g_r w_out, a_r>
        w2 = w.unsqueeze(1)
        if gw is not None:
            torch.sum(grad_a * a, 1, out=gw)
        grad_a.mul_(w2)
        a.mul_(w2)  # `a` is a fresh tensor the activation's backward does not read
    if gw_out is not None:
        _mm_into(gw_out, g.t(), a, accumulate)
    grad_h = _activation_backward(h, act_gate, grad_a, activation)
    if gw_in is not None:
        _mm_into(gw_in, grad_h.t(), x, accumulate)
    if gx is not None:
        torch.mm(grad_h, w_in, out=gx)


class GradBuffers:
    """Memory for the stacked weight gradients that is reused across steps (CPU only), owned by one module.

    With `zero_grad(set_to_none=True)` each step frees the [E, F, D] gradients and the next backward maps fresh
    pages and faults them in again: on a 2-core VM that cost 60 ms of a 300 ms step (config B of
    benchmarks/layer.py). A buffer is handed out again only while nothing but this cache holds its storage, so a
    gradient that is still in use (accumulation, `set_to_none=False`, a tensor kept by the caller) is never
    overwritten. Between steps it holds one gradient-sized block per weight, as `set_to_none=False` would.
    """

    def __init__(self) -> None:
        """Start empty; buffers are created by the first backward."""
        self._bufs: dict[str, Tensor] = {}

    def empty_like(self, name: str, w: Tensor) -> Tensor:
        """An uninitialised contiguous tensor shaped like `w`, on already-touched memory when possible."""
        if w.device.type != "cpu":  # other devices have caching allocators
            return torch.empty_like(w, memory_format=torch.contiguous_format)
        buf = self._bufs.get(name)
        if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or _storage_users(buf) != 1:
            buf = torch.empty_like(w, memory_format=torch.contiguous_format)
            self._bufs[name] = buf
        # a new view, referenced only by autograd, so AccumulateGrad adopts it as .grad instead of copying it
        return buf.view(buf.shape)

    def clear(self) -> None:
        """Drop the cached buffers (gradients handed out stay valid)."""
        self._bufs.clear()

    def __getstate__(self) -> dict:
        """Copies and pickles start empty: the buffers are scratch memory, not state."""
        return {"_bufs": {}}


def _storage_users(t: Tensor) -> int:
    """How many tensors share t's storage; a large number (never reuse) if torch does not tell."""
    try:
        # NOTE: private API; the storage handle made here holds one reference of its own
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1
    except (AttributeError, RuntimeError):
        return 1 << 30


def _run(pool: WorkerPool | None, work: Callable[[int], None], costs: list[int], x: Tensor) -> None:
    """The experts' work items: on the pool when there is one and the work is big enough, else inline."""
    if pool is None:
        for i, c in enumerate(costs):
            if c:
                work(i)
        return
    pool.run(work, costs, tuning().pool_min_macs, cpu=x.is_cpu)


class _GroupedMLP(torch.autograd.Function):
    """y = act(x W_in^T) W_out^T per expert block, chunk by chunk.

    Saved for the backward: x, the weights and the pre-activation h (per chunk, so each piece stays under the
    mmap threshold). The backward recomputes act(h) per chunk and fuses the activation's derivative, so no
    [R, H] or [R, F] tensor is allocated in either pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in_EFD: Tensor, w_out_EDH: Tensor,  # type: ignore[override]
                w_R: Tensor | None, splits: list[int], activation: str, keep: bool,
                grad_buffers: GradBuffers | None, tokens: TokenRows | None,
                pool: WorkerPool | None) -> Tensor:
        """y[block e] = act(x[block e] @ w_in[e]^T) @ w_out[e]^T (times w per row if given); `keep`: save h.

        With `tokens`, x is token-major [T, D]: each chunk gathers its rows itself and the rows' outputs are
        summed back into their tokens, [T, D].
        """
        rows = max(1, tuning().chunk_elems // w_in_EFD.shape[1])
        y_RD = x.new_empty(sum(splits), w_out_EDH.shape[1])
        blocks = _blocks(splits, rows)
        h_blocks: list[list[Tensor]] = [[] for _ in blocks]
        read = _row_reader(x, tokens)

        costs = _costs(blocks, w_in_EFD)
        w_in_E, w_out_E = w_in_EFD.unbind(0), w_out_EDH.unbind(0)  # every expert's view in one call each

        def expert(i: int) -> None:
            """Expert blocks[i]'s FFN, chunk by chunk, into its rows of y."""
            e, spans = blocks[i]
            for lo, hi in spans:
                h = _chunk_forward(read(lo, hi), w_in_E[e], w_out_E[e], y_RD[lo:hi],
                                   None if w_R is None else w_R[lo:hi], activation)
                if keep:
                    h_blocks[i].append(h)

        _run(pool, expert, costs, x)
        ctx.weighted = w_R is not None
        ctx.save_for_backward(x, w_in_EFD, w_out_EDH, w_R if ctx.weighted else x.new_empty(0),
                              *(h for hs in h_blocks for h in hs))
        ctx.splits, ctx.activation, ctx.rows, ctx.tokens, ctx.pool = splits, activation, rows, tokens, pool
        ctx.grad_buffers = grad_buffers if grad_buffers is not None else GradBuffers()
        return y_RD if tokens is None else tokens.sum(y_RD)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_RD: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """Per chunk: recompute act(h), then the gradients of the row weights, w_out, h, w_in and x in turn."""
        x, w_in_EFD, w_out_EDH, w_R, *h_chunks = ctx.saved_tensors
        w_R = w_R if ctx.weighted else None
        tokens: TokenRows | None = ctx.tokens
        need_x, need_w_in, need_w_out, need_w = ctx.needs_input_grad[:4]
        g_RD = g_RD.contiguous()  # [T, D] with tokens
        read_x, read_g = _row_reader(x, tokens), _row_reader(g_RD, tokens)
        gx_RD = x.new_empty(sum(ctx.splits), x.shape[1]) if need_x else None
        # uninitialised: each expert's first chunk overwrites its block; experts without rows are zeroed below
        gw_in = ctx.grad_buffers.empty_like("w_in", w_in_EFD) if need_w_in else None
        gw_out = ctx.grad_buffers.empty_like("w_out", w_out_EDH) if need_w_out else None
        gw_R = torch.empty_like(w_R) if w_R is not None and need_w else None
        blocks = _blocks(ctx.splits, ctx.rows)
        first_chunk = [0]
        for _, spans in blocks:
            first_chunk.append(first_chunk[-1] + len(spans))

        costs = _costs(blocks, w_in_EFD)
        w_in_E, w_out_E = w_in_EFD.unbind(0), w_out_EDH.unbind(0)
        gw_in_E = None if gw_in is None else gw_in.unbind(0)
        gw_out_E = None if gw_out is None else gw_out.unbind(0)

        def expert(i: int) -> None:
            """Expert blocks[i]'s gradients; its weight gradients summed over its chunks."""
            e, spans = blocks[i]
            for j, (lo, hi) in enumerate(spans):
                _chunk_backward(read_g(lo, hi), read_x(lo, hi), h_chunks[first_chunk[i] + j], w_in_E[e],
                                w_out_E[e], None if w_R is None else w_R[lo:hi],
                                None if gw_R is None else gw_R[lo:hi], None if gw_in_E is None else gw_in_E[e],
                                None if gw_out_E is None else gw_out_E[e],
                                None if gx_RD is None else gx_RD[lo:hi], j > 0, ctx.activation)

        _run(ctx.pool, expert, costs, x)
        for e, n in enumerate(ctx.splits):
            if n == 0:
                for gw in (gw_in, gw_out):
                    if gw is not None:
                        gw[e].zero_()
        gx = gx_RD if gx_RD is None or tokens is None else tokens.sum(gx_RD)
        return gx, gw_in, gw_out, gw_R, None, None, None, None, None, None


def grouped_mlp(x: Tensor, w_in_EFD: Tensor, w_out_EDH: Tensor, splits: list[int], activation: str = "swiglu",
                grad_buffers: GradBuffers | None = None, row_weights: Tensor | None = None,
                tokens: TokenRows | None = None, pool: WorkerPool | None = None) -> Tensor:
    """Expert e's FFN on its block of rows, fused and chunked, with a hand-written backward: [R, D] -> [R, D].

    Args:
        x: rows sorted by expert, [R, D]; block e has splits[e] rows. With `tokens`: token-major [T, D].
        w_in_EFD, w_out_EDH: stacked expert weights (gated activations: gate rows, then up rows of w_in).
        splits: rows per expert, as Python ints.
        activation: "swiglu" | "geglu" | "relu" | "gelu" | "silu".
        grad_buffers: the owning module's GradBuffers, to reuse the weight-gradient memory across steps.
        row_weights: [R] combine weights to scale each output row by (differentiable). Applying them here, on
            cache-hot chunks spread over the expert workers, saves the combine a pass over [R, D] each way.
        tokens: the dispatch's token <-> row map. Given, the experts read row r from x[tokens.token_ids_R[r]]
            and return each token's summed rows, [T, D]: dispatch, experts and combine in one op, with no [R, D]
            copy of the inputs (forward) or of the output gradient (backward).
        pool: the owning module's WorkerPool, to run the experts on its single-threaded workers (None: inline).
    """
    gated = activation in GATED
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_mlp: unknown activation {activation!r}; use one of {ACTIVATIONS}")
    if x.dim() != 2 or x.shape[1] != w_in_EFD.shape[2] \
            or w_in_EFD.shape[1] != (2 if gated else 1) * w_out_EDH.shape[2] \
            or w_out_EDH.shape[:2] != (w_in_EFD.shape[0], x.shape[1]):
        raise ValueError(f"grouped_mlp: shapes do not fit: x {tuple(x.shape)}, w_in {tuple(w_in_EFD.shape)}, "
                         f"w_out {tuple(w_out_EDH.shape)} with activation {activation!r}")
    num_rows = x.shape[0] if tokens is None else tokens.token_ids_R.numel()
    if tokens is not None and x.shape[0] != tokens.num_tokens:
        raise ValueError(f"grouped_mlp: with `tokens`, x must be token-major [T={tokens.num_tokens}, D], got "
                         f"{tuple(x.shape)}")
    if len(splits) != w_in_EFD.shape[0] or sum(splits) != num_rows:
        raise ValueError(f"grouped_mlp: splits {splits} must have one entry per expert ({w_in_EFD.shape[0]}) and "
                         f"sum to the number of rows ({num_rows})")
    if row_weights is not None and row_weights.shape != (num_rows,):
        raise ValueError(f"grouped_mlp: row_weights must be [R={num_rows}], got {tuple(row_weights.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        # custom Functions and out= GEMMs are not autocast-aware: cast once here, then run plainly
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return grouped_mlp(x.to(dtype), w_in_EFD.to(dtype), w_out_EDH.to(dtype), splits, activation,
                               grad_buffers, None if row_weights is None else row_weights.to(dtype), tokens, pool)
    if row_weights is not None:
        row_weights = row_weights.to(x.dtype).contiguous()
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, w_in_EFD, w_out_EDH, row_weights))
    return _GroupedMLP.apply(x, w_in_EFD, w_out_EDH, row_weights, splits, activation, keep, grad_buffers, tokens,
                             pool)
