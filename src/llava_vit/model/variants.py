"""Registered model variants (DESIGN §3): timm names for the source and packed encoders, and the
transformers ``AutoConfig`` / ``AutoModel`` entries for every ``model_type`` of this package."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm.models import register_model
from transformers import AutoConfig, AutoModel

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
"""The epsilons the timm training code used (PyTorch defaults, DESIGN §2.8)."""

SOURCE_MODEL_NAMES = {f"llava_vit_{size}_ln": (size, "layer_norm") for size in VARIANTS} | {
    "llava_vit_base_rms": ("base", "rms_norm")
}
PACKING_MODEL_NAMES = {f"hf_llava_vit_packing_{size}_ln": size for size in VARIANTS}

_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


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


def _register(name: str, config_fn: Callable[..., Any], model_cls: type, what: str) -> None:
    """Register ``name`` in timm: ``create_model(name, **config_overrides)`` builds ``model_cls``.

    Keyword arguments must be fields of the config; timm's factory options are dropped, and
    ``pretrained=True`` is refused (no weights are bundled or downloaded).
    """

    def create(pretrained: bool = False, **kwargs: Any):
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

    create.__name__ = name
    create.__doc__ = f"{what} {name}."
    register_model(create)


for _name in SOURCE_MODEL_NAMES:
    _register(_name, source_config, LlavaViT, "Source (timm training layout) encoder")
for _name in PACKING_MODEL_NAMES:
    _register(_name, packing_config, LlavaViTPackingModel, "Packed encoder")

for _config, _model in (
    (LlavaViTPackingConfig, LlavaViTPackingModel),
    (LlavaViTConfig, LlavaViTModel),
    (OneVisionEncoderConfig, OneVisionEncoderModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
