"""Pure tensor functions: no modules, no configs, no torch.distributed."""

from moeflow.ops.capacity import capacity_keep
from moeflow.ops.grouped import grouped_linear
from moeflow.ops.losses import cv_squared, entropy, gshard_aux_loss, switch_balance_loss, z_loss

__all__ = ["capacity_keep", "grouped_linear", "cv_squared", "entropy", "gshard_aux_loss",
           "switch_balance_loss", "z_loss"]
