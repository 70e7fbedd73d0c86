"""Uniform noise for routers (Switch's input jitter), drawn in parallel on CPU.

Why: CPU `uniform_` runs one Mersenne Twister on one thread. Switch's jitter over config C's router input
([8192, 256], benchmarks/layer.py) took 13 ms of a 200 ms layer step that way (6.5%); in independently seeded
pieces spread over a worker pool it costs about half that on 2 cores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moeflow.ops.threads import WorkerPool

# Elements per independently seeded piece: fixed, so the values do not depend on the number of workers.
PIECE = 1 << 18


def uniform_like(x: Tensor, low: float, high: float, pool: WorkerPool | None = None) -> Tensor:
    """U(low, high) noise shaped like x; on CPU generated in pieces, each from its own seeded generator.

    The piece seeds are drawn from torch's default generator, so `torch.manual_seed` still fixes the result, for
    any pool size (None: one thread). Off the CPU, one `uniform_` (device generators are parallel already).
    """
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = out.numel()
    if x.device.type != "cpu" or n <= PIECE:
        return out.uniform_(low, high)
    flat = out.view(-1)
    pieces = (n + PIECE - 1) // PIECE
    seeds = torch.randint(0, 1 << 62, (pieces,), dtype=torch.int64).tolist()

    def fill(i: int) -> None:
        """Piece i from its own generator."""
        gen = torch.Generator().manual_seed(seeds[i])
        flat[i * PIECE:(i + 1) * PIECE].uniform_(low, high, generator=gen)

    costs = [min(PIECE, n - i * PIECE) for i in range(pieces)]
    if pool is None:
        for i in range(pieces):
            fill(i)
    else:
        pool.run(fill, costs)
    return out


__all__ = ["uniform_like", "PIECE"]
