"""Random-weight source models and their packed twins, sharing exactly the same tensors."""

from __future__ import annotations

import torch

from llava_vit import LlavaViT, LlavaViTConfig, LlavaViTPackingConfig, LlavaViTPackingModel
from llava_vit.conversion.convert import to_packing_state_dict
from llava_vit.model.variants import SOURCE_EPS

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
