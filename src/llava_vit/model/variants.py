"""Model variants (docs/ARCHITECTURE.md, "Variants"): timm names for the source and packed
encoders, and the transformers ``AutoConfig`` / ``AutoModel`` entries for every ``model_type``
of this package."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from timm.models import register_model
from transformers import AutoConfig, AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration import LlavaViTConfig, LlavaViTPackingConfig, OneVisionEncoderConfig
from .modeling import LlavaViTPackingModel
from ..reference import LlavaViT, LlavaViTModel, OneVisionEncoderModel

VARIANTS: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536, patch_size=16),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14),
    "huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120, patch_size=14),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=16, intermediate_size=6144, patch_size=14),
}

SOURCE_EPS = {
    "layer_norm": dict(layer_norm_type="layer_norm", layer_norm_eps=1e-5, head_norm_eps=None),
    "rms_norm": dict(layer_norm_type="rms_norm", layer_norm_eps=None, head_norm_eps=None),
}
"""The epsilons the timm training code used (PyTorch defaults; docs/ARCHITECTURE.md, "Norm epsilons")."""

SOURCE_MODEL_NAMES = {f"llava_vit_{size}_ln": (size, "layer_norm") for size in VARIANTS} | {
    "llava_vit_base_rms": ("base", "rms_norm")
}
PACKING_MODEL_NAMES = {f"hf_llava_vit_packing_{size}_ln": size for size in VARIANTS}

_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
logger = logging.getLogger(__name__)


def source_config(name: str, **overrides: Any) -> LlavaViTConfig:
    """The :class:`LlavaViTConfig` of a timm source variant, with the source's epsilons."""
    if name not in SOURCE_MODEL_NAMES:
        raise ValueError(f"unknown source model {name!r}; expected one of {sorted(SOURCE_MODEL_NAMES)}")
    size, norm = SOURCE_MODEL_NAMES[name]
    return LlavaViTConfig(**{**VARIANTS[size], **SOURCE_EPS[norm], **overrides})


def packing_config(name: str, **overrides: Any) -> LlavaViTPackingConfig:
    """The :class:`LlavaViTPackingConfig` of a packed variant (``hf_llava_vit_packing_<size>_ln`` or ``<size>``)."""
    size = PACKING_MODEL_NAMES.get(name, name)
    if size not in VARIANTS:
        raise ValueError(f"unknown packing model {name!r}; expected one of {sorted(PACKING_MODEL_NAMES)}")
    return LlavaViTPackingConfig(**{**VARIANTS[size], **overrides})


def _create(name: str, config_fn: Callable[..., Any], model_cls: type, pretrained: bool, kwargs: dict[str, Any]):
    """``model_cls(config_fn(name, **kwargs))`` for a timm factory.

    Keyword arguments must be fields of the config; timm's factory options are dropped, and
    ``pretrained=True`` is refused (no weights are bundled or downloaded).
    """
    if pretrained:
        raise ValueError(
            f"{name}: no weights are bundled or downloaded; create it with pretrained=False and load a "
            f"checkpoint (llava_vit.convert.convert_checkpoint, or load_state_dict)"
        )
    overrides = {k: v for k, v in kwargs.items() if k not in _TIMM_FACTORY_KWARGS}
    fields = set(config_fn(name).to_dict()) | {"attn_implementation"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{name}: unknown keyword arguments {unknown}; expected config fields such as "
                        f"{sorted(VARIANTS['large'])}")
    return model_cls(config_fn(name, **overrides))


# ---- timm: source encoders (training layout) ----------------------------------------------------


@register_model
def llava_vit_small_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViT:
    """Source encoder, small (384 wide, 6 layers, patch 16), LayerNorm."""
    return _create("llava_vit_small_ln", source_config, LlavaViT, pretrained, kwargs)


@register_model
def llava_vit_base_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViT:
    """Source encoder, base (768 wide, 12 layers, patch 16), LayerNorm."""
    return _create("llava_vit_base_ln", source_config, LlavaViT, pretrained, kwargs)


@register_model
def llava_vit_base_rms(pretrained: bool = False, **kwargs: Any) -> LlavaViT:
    """Source encoder, base (768 wide, 12 layers, patch 16), RMSNorm."""
    return _create("llava_vit_base_rms", source_config, LlavaViT, pretrained, kwargs)


@register_model
def llava_vit_large_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViT:
    """Source encoder, large (1024 wide, 24 layers, patch 14), LayerNorm."""
    return _create("llava_vit_large_ln", source_config, LlavaViT, pretrained, kwargs)


@register_model
def llava_vit_huge_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViT:
    """Source encoder, huge (1280 wide, 32 layers, patch 14), LayerNorm."""
    return _create("llava_vit_huge_ln", source_config, LlavaViT, pretrained, kwargs)


@register_model
def llava_vit_giant_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViT:
    """Source encoder, giant (1536 wide, 40 layers, patch 14), LayerNorm."""
    return _create("llava_vit_giant_ln", source_config, LlavaViT, pretrained, kwargs)


# ---- timm: packed encoders ----------------------------------------------------------------------


@register_model
def hf_llava_vit_packing_small_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViTPackingModel:
    """Packed encoder, small (384 wide, 6 layers, patch 16)."""
    return _create("hf_llava_vit_packing_small_ln", packing_config, LlavaViTPackingModel, pretrained, kwargs)


@register_model
def hf_llava_vit_packing_base_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViTPackingModel:
    """Packed encoder, base (768 wide, 12 layers, patch 16)."""
    return _create("hf_llava_vit_packing_base_ln", packing_config, LlavaViTPackingModel, pretrained, kwargs)


@register_model
def hf_llava_vit_packing_large_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViTPackingModel:
    """Packed encoder, large (1024 wide, 24 layers, patch 14)."""
    return _create("hf_llava_vit_packing_large_ln", packing_config, LlavaViTPackingModel, pretrained, kwargs)


@register_model
def hf_llava_vit_packing_huge_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViTPackingModel:
    """Packed encoder, huge (1280 wide, 32 layers, patch 14)."""
    return _create("hf_llava_vit_packing_huge_ln", packing_config, LlavaViTPackingModel, pretrained, kwargs)


@register_model
def hf_llava_vit_packing_giant_ln(pretrained: bool = False, **kwargs: Any) -> LlavaViTPackingModel:
    """Packed encoder, giant (1536 wide, 40 layers, patch 14)."""
    return _create("hf_llava_vit_packing_giant_ln", packing_config, LlavaViTPackingModel, pretrained, kwargs)


# ---- transformers Auto classes ------------------------------------------------------------------


def register_auto_classes(config_cls: type, model_cls: type) -> bool:
    """Register ``config_cls.model_type`` with ``AutoConfig`` and ``AutoModel``, unless another
    package owns that ``model_type`` (transformers itself, or remote code), which is left in place.

    A registration by this package (a re-import) is replaced. Returns whether it registered.
    """
    model_type = config_cls.model_type
    if model_type in CONFIG_MAPPING:
        owner = CONFIG_MAPPING[model_type]
        if owner.__module__ != config_cls.__module__ or owner.__qualname__ != config_cls.__qualname__:
            logger.warning(
                "llava_vit: model_type %r already belongs to %s.%s; AutoConfig/AutoModel keep that registration",
                model_type, owner.__module__, owner.__qualname__,
            )
            return False
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    return True


for _config, _model in (
    (LlavaViTPackingConfig, LlavaViTPackingModel),
    (LlavaViTConfig, LlavaViTModel),
    (OneVisionEncoderConfig, OneVisionEncoderModel),
):
    register_auto_classes(_config, _model)
