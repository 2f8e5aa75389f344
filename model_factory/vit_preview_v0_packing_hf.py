"""Seed import path for the packed encoder; everything lives in :mod:`llava_vit`."""

import llava_vit.variants  # noqa: F401  (registers the timm and transformers names)
from llava_vit import (
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    compute_patch_positions_from_grid_thw,
)

__all__ = ["LlavaViTPackingConfig", "LlavaViTPackingModel", "compute_patch_positions_from_grid_thw"]
