"""What every moeflow model exposes about its MoE layers after a forward (shared by all architectures)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeflow.layers import MoELayer
from moeflow.routing import Routing


class MoEOutputs:
    """Mixin for nn.Modules that contain MoELayers: list them, sum their aux losses, collect their Routings."""

    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs, in module registration (= layer) order."""
        assert isinstance(self, nn.Module)
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' coefficient-scaled auxiliary losses from the last forward (0 if dense)."""
        assert isinstance(self, nn.Module)
        total = torch.zeros((), device=next(self.parameters()).device)
        for m in self.moe_layers():
            total = total + m.aux_loss
        return total

    def routings(self) -> list[Routing]:
        """The last forward's Routing record of each MoE layer, in layer order."""
        out = []
        for i, m in enumerate(self.moe_layers()):
            if m.last_routing is None:
                raise RuntimeError(f"MoE layer {i} has no routing yet: call the model forward first")
            out.append(m.last_routing)
        return out
