"""Seed import path for the packed encoder; everything lives in :mod:`llava_vit`."""

from llava_vit import (
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    compute_patch_positions_from_grid_thw,
)

__all__ = ["LlavaViTPackingConfig", "LlavaViTPackingModel", "compute_patch_positions_from_grid_thw"]
