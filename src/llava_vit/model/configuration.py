"""Configurations: the packed encoder and its unpacked Hugging Face twin (the source layout)."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..validation import check_positive_int

_SAME_AS_LAYER_NORM = "same_as_layer_norm"


class _LlavaViTArchitecture(PretrainedConfig):
    """Fields shared by both layouts, and the checks that reject impossible architectures.

    The norm epsilons are part of a checkpoint's identity (docs/ARCHITECTURE.md, "Norm epsilons"): ``layer_norm_eps`` is
    used by every body norm and ``head_norm_eps`` by the pooling head's RMSNorm; either may be
    ``None``, the dtype's machine epsilon (PyTorch's RMSNorm default; RMSNorm only). When
    ``head_norm_eps`` is not given it follows ``layer_norm_eps``, as in HF-format checkpoints.
    Defaults describe ViT-L/14.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        image_size: int = 448,
        patch_size: int = 14,
        hidden_act: str = "gelu",
        layer_norm_eps: float | None = 1e-6,
        layer_norm_type: str = "layer_norm",
        head_norm_eps: float | None | str = _SAME_AS_LAYER_NORM,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        rope_theta: float = 10000.0,
        use_head: bool = True,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.layer_norm_type = layer_norm_type
        self.head_norm_eps = layer_norm_eps if head_norm_eps == _SAME_AS_LAYER_NORM else head_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.rope_theta = rope_theta
        self.use_head = use_head
        super().__init__(**kwargs)
        self._validate_architecture()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector, ``C * p * p``."""
        return self.num_channels * self.patch_size * self.patch_size

    def to_diff_dict(self) -> dict:
        """Always write both epsilons: a missing ``head_norm_eps`` would follow ``layer_norm_eps``."""
        diff = super().to_diff_dict()
        diff["layer_norm_eps"] = self.layer_norm_eps
        diff["head_norm_eps"] = self.head_norm_eps
        return diff

    def _validate_architecture(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "patch_size"):
            setattr(self, name, check_positive_int(name, getattr(self, name)))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 32:
            valid = [n for n in range(1, self.hidden_size // 32 + 1) if self.hidden_size % (32 * n) == 0]
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {self.hidden_size} / {self.num_attention_heads} = "
                f"{self.head_dim}: the 3D RoPE splits head_dim/2 frequencies 4:6:6 over (t, h, w), so head_dim must "
                f"be a multiple of 32 (num_attention_heads in {valid} for this hidden_size)"
            )
        if self.layer_norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"layer_norm_type must be 'layer_norm' or 'rms_norm', got {self.layer_norm_type!r}")
        if self.layer_norm_type == "layer_norm" and self.layer_norm_eps is None:
            raise ValueError("layer_norm_eps=None (machine epsilon) is only valid with layer_norm_type='rms_norm'")
        for name in ("layer_norm_eps", "head_norm_eps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
                raise ValueError(f"{name} must be a non-negative number or None (machine epsilon), got {value!r}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.attention_dropout != 0.0:
            raise ValueError(
                f"attention_dropout must be 0.0: the encoder has no dropout (it is an inference/fine-tuning "
                f"encoder of pretrained weights), got {self.attention_dropout!r}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (the exact erf GELU it was trained with), got {self.hidden_act!r}")


class LlavaViTPackingConfig(_LlavaViTArchitecture):
    """Configuration of :class:`~llava_vit.LlavaViTPackingModel` (see the base for shared fields).

    ``temporal_patch_size`` must be 1 (a patch is one frame). ``spatial_merge_size`` is carried
    for the LLM-side patch merger (Qwen2-VL style); the encoder itself does not merge.
    """

    model_type = "llava_vit_packing"

    def __init__(self, temporal_patch_size: int = 1, spatial_merge_size: int = 1, **kwargs):
        if temporal_patch_size != 1:
            raise ValueError(f"temporal_patch_size must be 1 (each patch is one frame), got {temporal_patch_size!r}")
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = check_positive_int("spatial_merge_size", spatial_merge_size)
        super().__init__(**kwargs)


class LlavaViTConfig(_LlavaViTArchitecture):
    """Configuration of the unpacked source model (:class:`~llava_vit.LlavaViTModel` and the timm
    :class:`~llava_vit.source.LlavaViT`), the published OneVision-Encoder fields.

    ``rope_temporal_size`` is the temporal context, in frames, the source was trained with.
    """

    model_type = "llava_vit"

    def __init__(self, rope_temporal_size: int = 64, **kwargs):
        self.rope_temporal_size = rope_temporal_size
        super().__init__(**kwargs)


class OneVisionEncoderConfig(LlavaViTConfig):
    """The published OneVision-Encoder ``model_type``; same layout as :class:`LlavaViTConfig`."""

    model_type = "onevision_encoder"

    def __init__(self, **kwargs):  # an own __init__ keeps transformers 5 from generating a dataclass one
        super().__init__(**kwargs)
