"""Expert compression: shared bases with low-rank residuals, merging, SVD and pruning of trained experts."""

from moeflow.compress.experts import CompressedExperts, Layout, projection_shapes
from moeflow.compress.fit import fit_experts, layout_bytes, layout_params, seed_ratio
from moeflow.compress.model import (METHODS, CompressError, apply_layouts, calibrate, compress_model,
                                    layer_similarities)

__all__ = ["CompressedExperts", "Layout", "projection_shapes", "fit_experts", "layout_bytes", "layout_params",
           "seed_ratio", "METHODS", "CompressError", "apply_layouts", "calibrate", "compress_model",
           "layer_similarities"]
