"""Explicit collection of the Routing records of a forward: aux losses and statistics without hidden state.

Why a scope and not module attributes: a module attribute (`last_routing`) is overwritten when activation
checkpointing recomputes a block during backward, and keeps only the last of two forwards in one step. Records
taken inside `record_routing()` belong to exactly the forwards run inside it: a recompute runs during backward,
after the scope closed, so it is never counted twice, and two forwards in one scope are both counted.

    with record_routing() as log:
        logits = model(x)
    loss = task_loss(logits) + log.aux_loss()
    stats = layer_stats(log.per_layer([m for _, m in moe_layers(model)]))   # one merged Routing per layer
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moeflow.routing.base import Routing

# The open logs, innermost last. A plain list (not a ContextVar) so that torch.compile can trace the append.
_OPEN: list["RoutingLog"] = []


@dataclass
class RoutingLog:
    """(layer, Routing) for every MoE forward run while this log was open, in call order."""

    entries: list[tuple[object, Routing]] = field(default_factory=list)

    def add(self, layer: object, routing: Routing) -> None:
        """Record one forward of `layer`."""
        self.entries.append((layer, routing))

    def __len__(self) -> int:
        """Number of recorded forwards."""
        return len(self.entries)

    def aux_loss(self, device: torch.device | str | None = None) -> Tensor:
        """Sum of the coefficient-scaled auxiliary losses of every recorded forward (0 if none has one)."""
        losses = [r.aux_loss for _, r in self.entries if r.aux_loss is not None]
        if not losses:
            dev = device if device is not None else (self.entries[0][1].weights_N.device if self.entries else "cpu")
            return torch.zeros((), device=dev)
        total = losses[0]
        for v in losses[1:]:
            total = total + v
        return total

    def routings(self, layer: object) -> list[Routing]:
        """The records of one layer, in call order."""
        return [r for m, r in self.entries if m is layer]

    def per_layer(self, layers: Sequence[object]) -> list[Routing | MergedRouting]:
        """One Routing per layer, merged over its forwards (counts summed, fractions token-weighted).

        Raises if a layer has no record (it was not called inside the scope).
        """
        out = []
        for i, layer in enumerate(layers):
            rs = self.routings(layer)
            if not rs:
                raise RuntimeError(f"MoE layer {i} ({type(layer).__name__}) has no routing record: run the model's "
                                   "forward inside record_routing()")
            out.append(merge_routings(rs))
        return out


def merge_routings(rs: Sequence[Routing]) -> Routing | MergedRouting:
    """One record standing for several forwards of a layer: what layer_stats and bias updates read.

    Counts (`tokens_per_expert`) add up; the dropped fraction and entropy are token-weighted means; each loss is
    the mean over forwards (as a loss averaged over micro-batches would be). One forward returns itself.
    """
    if len(rs) == 1:
        return rs[0]
    tokens = torch.tensor([float(r.num_tokens) for r in rs])
    share = (tokens / tokens.sum()).tolist()
    return MergedRouting(
        parts=list(rs), tokens_per_expert=sum(r.tokens_per_expert for r in rs[1:]) + rs[0].tokens_per_expert,
        dropped_fraction=sum(s * r.dropped_fraction.float() for s, r in zip(share, rs)),
        entropy=sum(s * r.entropy.float() for s, r in zip(share, rs)),
        losses={k: sum(r.losses[k] for r in rs) / len(rs) for k in rs[0].losses})


@dataclass
class MergedRouting:
    """The statistics view of several Routing records (see `merge_routings`); not a routing to dispatch."""

    parts: list[Routing]
    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    entropy: Tensor
    losses: dict[str, Tensor]

    @property
    def aux_loss(self) -> Tensor | None:
        """Sum of the parts' aux losses."""
        losses = [r.aux_loss for r in self.parts if r.aux_loss is not None]
        return sum(losses[1:], losses[0]) if losses else None


@contextmanager
def record_routing() -> Iterator[RoutingLog]:
    """Collect the Routing of every MoE forward run inside the block (nested scopes each get their own)."""
    log = RoutingLog()
    _OPEN.append(log)
    try:
        yield log
    finally:
        _OPEN.remove(log)


def log_routing(layer: object, routing: Routing) -> None:
    """Called by every MoE block's forward: hand its Routing to the open logs (no-op when none is open)."""
    for log in _OPEN:
        log.add(layer, routing)


__all__ = ["RoutingLog", "MergedRouting", "record_routing", "log_routing", "merge_routings"]
