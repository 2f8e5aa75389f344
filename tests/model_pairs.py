"""Random-weight source models and their packed twins, sharing exactly the same tensors, and a
mixed image + video pack to run them on."""

from __future__ import annotations

import torch

from llava_vit import (
    LlavaViT,
    LlavaViTConfig,
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)
from llava_vit.convert.checkpoint import to_packing_state_dict
from llava_vit.model.variants import SOURCE_EPS
from llava_vit.processing import patchify

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Every tensor random, norm weights away from 1 and biases non-zero (as the golden files)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or name.startswith("ln_") or "norm1" in name or "norm2" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))


def source_and_packed(norm: str = "layer_norm", seed: int = 0, **arch) -> tuple[LlavaViT, LlavaViTPackingModel]:
    arch = {**TINY, **arch}
    source = LlavaViT(LlavaViTConfig(**arch, **SOURCE_EPS[norm])).eval()
    randomize_(source, seed)
    packed = LlavaViTPackingModel(LlavaViTPackingConfig(**arch, **SOURCE_EPS[norm])).eval()
    packed.load_state_dict(to_packing_state_dict(source.state_dict(), "timm_source"))
    return source, packed


IMAGE_AND_VIDEO_GRID = torch.tensor([[1, 3, 5], [4, 2, 3]])


def image_and_video(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image ``(1, C, 3p, 5p)``, a 4-frame clip ``(1, C, 4, 2p, 3p)`` (``p`` of :data:`TINY`) and
    the clip's ``(1, 4)`` slots in the 64-frame context."""
    p = TINY["patch_size"]
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, 3 * p, 5 * p, generator=gen)
    clip = torch.randn(1, 3, 4, 2 * p, 3 * p, generator=gen)
    return image, clip, interpolate_frame_indices(torch.arange(4)[None], 4)


def pack_image_and_video(image, clip, slots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two samples of :func:`image_and_video` in one pack: ``hidden_states``, ``grid_thw``,
    ``patch_positions`` (the clip at its context slots)."""
    p = TINY["patch_size"]
    positions = torch.cat([compute_patch_positions_from_grid_thw(IMAGE_AND_VIDEO_GRID[:1]),
                           compute_patch_positions_with_interpolated_temporal(slots, 2, 3)])
    return torch.cat([patchify(image[0], p), patchify(clip[0], p)]), IMAGE_AND_VIDEO_GRID, positions
