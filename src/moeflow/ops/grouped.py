"""Grouped linear: row block e of x (rows sorted by expert) times expert e's weight, in one op.

Shape legend: R = rows (assignments sorted by expert), I = in features, O = out features, E = experts.
Weights are stored like nn.Linear, [E, O, I], so y_e = x_e @ w_e^T.
"""

from __future__ import annotations

import torch
from torch import Tensor



class _LoopGroupedLinear(torch.autograd.Function):
    """Per-expert GEMMs over contiguous row blocks, written into preallocated outputs.

    On CPU this matches `torch._grouped_mm` in speed (measured, torch 2.13, 2 threads) and, unlike it, has a
    working backward; writing through `out=` slices avoids the temporaries and the copy a `torch.cat` would cost.
    """

    @staticmethod
    def forward(ctx, x_RI: Tensor, w_EOI: Tensor, splits: list[int]) -> Tensor:  # type: ignore[override]
        """y[block e] = x[block e] @ w[e]^T."""
        ctx.save_for_backward(x_RI, w_EOI)
        ctx.splits = splits
        y_RO = x_RI.new_empty(x_RI.shape[0], w_EOI.shape[1])
        start = 0
        for e, n in enumerate(splits):
            if n:
                torch.mm(x_RI[start:start + n], w_EOI[e].t(), out=y_RO[start:start + n])
            start += n
        return y_RO

    @staticmethod
    def backward(ctx, g_RO: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        """dx[block e] = g[block e] @ w[e]; dw[e] = g[block e]^T @ x[block e]."""
        x_RI, w_EOI = ctx.saved_tensors
        g_RO = g_RO.contiguous()
        gx = torch.empty_like(x_RI) if ctx.needs_input_grad[0] else None
        # uninitialised: each used expert's block is overwritten below, unused ones are zeroed (saves a full fill)
        gw = torch.empty_like(w_EOI) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.splits):
            if n:
                rows = slice(start, start + n)
                if gx is not None:
                    torch.mm(g_RO[rows], w_EOI[e], out=gx[rows])
                if gw is not None:
                    torch.mm(g_RO[rows].t(), x_RI[rows], out=gw[e])
            elif gw is not None:
                gw[e].zero_()
            start += n
        return gx, gw, None


def _grouped_mm_ok(x_RI: Tensor, w_EOI: Tensor) -> bool:
    """Whether torch._grouped_mm can run this case (CUDA, bf16, 16-byte aligned rows, Hopper or newer)."""
    if not (hasattr(torch, "_grouped_mm") and x_RI.is_cuda and x_RI.dtype == torch.bfloat16
            and w_EOI.dtype == torch.bfloat16):
        return False
    if x_RI.shape[1] % 8 or w_EOI.shape[1] % 8:
        return False
    return torch.cuda.get_device_capability(x_RI.device) >= (9, 0)


def resolve_impl(x_RI: Tensor, w_EOI: Tensor, impl: str) -> str:
    """What "auto" means for these tensors: grouped_mm where it runs (CUDA bf16, Hopper+), else the loop."""
    if impl != "auto":
        return impl
    return "grouped_mm" if _grouped_mm_ok(x_RI, w_EOI) else "loop"


def grouped_linear(x_RI: Tensor, w_EOI: Tensor, counts_E: Tensor, splits: list[int] | None = None,
                   impl: str = "auto") -> Tensor:
    """Apply expert e's weight to its contiguous block of rows; returns [R, O].

    Args:
        x_RI: rows sorted by expert, block e has counts_E[e] rows.
        w_EOI: stacked weights [E, O, I].
        counts_E: rows per expert (int tensor on x's device).
        splits: counts_E as a Python list, if the caller already has it (saves a device sync).
        impl: "auto" | "grouped_mm" | "loop" | "bmm".
    """
    if x_RI.shape[1] != w_EOI.shape[2]:
        raise ValueError(f"grouped_linear: rows have {x_RI.shape[1]} features but weights expect {w_EOI.shape[2]}")
    if torch.is_autocast_enabled(x_RI.device.type):
        # custom autograd functions and out= GEMMs are not autocast-aware: cast once here, then run plainly
        dtype = torch.get_autocast_dtype(x_RI.device.type)
        with torch.autocast(x_RI.device.type, enabled=False):
            return grouped_linear(x_RI.to(dtype), w_EOI.to(dtype), counts_E, splits, impl)
    impl = resolve_impl(x_RI, w_EOI, impl)
    if impl == "grouped_mm":
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_RI, w_EOI.transpose(-2, -1), offs=offs)
    if splits is None:
        splits = counts_E.tolist()
    if impl == "bmm":
        return _padded_bmm(x_RI, w_EOI, counts_E, splits)
    if impl != "loop":
        raise ValueError(f"grouped_linear: unknown impl {impl!r}; use auto, grouped_mm, loop or bmm")
    return _LoopGroupedLinear.apply(x_RI, w_EOI, splits)


def _padded_bmm(x_RI: Tensor, w_EOI: Tensor, counts_E: Tensor, splits: list[int]) -> Tensor:
    """Pad every block to the largest, run one batched matmul, unpad (autograd through plain ops)."""
    e = w_EOI.shape[0]
    cmax = max(splits) if splits else 0
    starts = torch.cumsum(counts_E, 0) - counts_E
    expert_R = torch.repeat_interleave(torch.arange(e, device=x_RI.device), counts_E)
    slot_R = torch.arange(x_RI.shape[0], device=x_RI.device) - starts[expert_R]
    flat_R = expert_R * cmax + slot_R
    x_pad = x_RI.new_zeros(e * cmax, x_RI.shape[1]).index_copy(0, flat_R, x_RI)
    y_pad = torch.bmm(x_pad.view(e, cmax, -1), w_EOI.transpose(1, 2))
    return y_pad.reshape(e * cmax, -1).index_select(0, flat_R)

