"""Top-k along the last dimension, fast for the small k routers use.

Shape legend: T = rows (tokens), E = columns (experts), K = choices.
"""

from __future__ import annotations

import torch
from torch import Tensor

# NOTE: on CPU, torch.topk over short rows costs about as much as four full passes over the input (1.5-2 ms for
# [4096, 64] on 2 cores, k = 2); a max per choice is one pass each (0.4 ms), so up to this k the max loop wins.
# Its handful of extra small ops cost more than they save below about 128K elements (measured, 2 cores, k = 2:
# [1024, 64] 0.56 vs 0.50 ms, [4096, 64] 1.19 vs 1.52 ms, [128, 8] 48 vs 10 us for the loop vs torch.topk).
_MAX_LOOP_K = 2
_MIN_LOOP_ELEMS = 1 << 17


def top_k(x_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest entries of each row, largest first, like `torch.topk(x, k, dim=-1)`.

    Ties go to the lower index. Values are differentiable (gathered from x), indices are int64.
    """
    if k < 0 or k > x_TE.shape[-1]:
        raise ValueError(f"top_k: k={k} must be in [0, {x_TE.shape[-1]}] (the size of the last dimension)")
    if x_TE.device.type != "cpu" or not 1 <= k <= _MAX_LOOP_K or x_TE.numel() < _MIN_LOOP_ELEMS:
        return torch.topk(x_TE, k, dim=-1)
    with torch.no_grad():
        first_T1 = x_TE.detach().argmax(-1, keepdim=True)
        if k == 1:
            idx_TK = first_T1
        else:
            second_T1 = x_TE.detach().scatter(-1, first_T1, float("-inf")).argmax(-1, keepdim=True)
            # a row whose other entries are all -inf: argmax returns the first -inf, which may be the taken one;
            # topk then takes the lowest other index
            second_T1 = torch.where(second_T1 == first_T1, (first_T1 == 0).long(), second_T1)
            idx_TK = torch.cat([first_T1, second_T1], -1)
    return x_TE.gather(-1, idx_TK), idx_TK
