"""The mixin every moeflow model uses to expose its MoE layers' losses and records after a forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moeflow.layers import moe_layers
from moeflow.routing import Routing


class MoEOutputs:
    """Mixin for nn.Modules that contain MoELayers: sum their aux losses, collect their Routings."""

    def aux_loss(self) -> Tensor:
        """Sum of the MoE layers' coefficient-scaled auxiliary losses from the last forward (0 if dense)."""
        assert isinstance(self, nn.Module)
        total = torch.zeros((), device=next(self.parameters()).device)
        for _, m in moe_layers(self):
            total = total + m.aux_loss
        return total

    def routings(self) -> list[Routing]:
        """The last forward's Routing record of each MoE layer, in layer order."""
        assert isinstance(self, nn.Module)
        out = []
        for name, m in moe_layers(self):
            if m.last_routing is None:
                raise RuntimeError(f"MoE layer {name} has no routing yet: call the model forward first")
            out.append(m.last_routing)
        return out
