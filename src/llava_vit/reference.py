"""The source models: the unpacked encoder the weights were trained in (docs/ARCHITECTURE.md).

Two parameter layouts of one network, both taking batches of equal-shape images ``(B, C, H, W)``
or videos ``(B, C, T, H, W)``:

- :class:`LlavaViT`, the timm training layout (fused ``attn.in_proj``), registered in timm as
  ``llava_vit_<size>_ln`` / ``llava_vit_base_rms``; returns ``{"visible_embeddings",
  "head_output"}``.
- :class:`LlavaViTModel`, its Hugging Face twin (the published OneVision-Encoder layout, separate
  ``q/k/v_proj``); returns a ``BaseModelOutputWithPooling``.

They serve as the conversion source, the reference the packed model is verified against, and the
unpacked baseline in the benchmarks. For a video, ``visible_indices`` ``(B, N)`` selects which of
the ``T*h*w`` patch tokens enter the transformer, and their RoPE positions are taken from the full
``T x h x w`` grid at those indices; ``patch_positions`` ``(B, N, 3)`` overrides the positions.
The source was trained on videos in a 64-frame temporal context; :func:`video_in_context` builds
that input from sampled frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .model.configuration import LlavaViTConfig, OneVisionEncoderConfig
from .model.modeling import LlavaViTPackingMLP, init_weights, make_norm
from .model.positions import SOURCE_TEMPORAL_CONTEXT
from .model.rope import apply_rope, rope_cos_sin


def embed_patches(
    conv: nn.Conv2d,
    pixels: torch.Tensor,
    visible_indices: torch.Tensor | None,
    patch_positions: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens ``(B, N, D)`` and their RoPE positions ``(B, N, 3)`` for an image or video batch."""
    if pixels.dim() == 4:
        pixels = pixels[:, :, None]
    if pixels.dim() != 5:
        raise ValueError(f"pixel input must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(pixels.shape)}")
    batch, _, frames, height, width = pixels.shape
    p = conv.kernel_size[0]
    if height % p or width % p:
        raise ValueError(f"height and width ({height}x{width}) must be multiples of the patch size {p}")
    h, w = height // p, width // p
    flat = pixels.transpose(1, 2).flatten(0, 1).to(conv.weight.dtype)
    tokens = conv(flat).flatten(2).transpose(1, 2).reshape(batch, frames * h * w, -1)
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, device=pixels.device) for n in (frames, h, w)), indexing="ij"), dim=-1
    ).reshape(1, -1, 3).expand(batch, -1, -1)
    if visible_indices is not None:
        tokens = tokens.gather(1, visible_indices[..., None].expand(-1, -1, tokens.shape[-1]))
        grid = grid.gather(1, visible_indices[..., None].expand(-1, -1, 3))
    if patch_positions is not None:
        if patch_positions.shape != (*tokens.shape[:2], 3):
            raise ValueError(
                f"patch_positions must have shape {(*tokens.shape[:2], 3)} (one [t, h, w] per token), "
                f"got {tuple(patch_positions.shape)}"
            )
        grid = patch_positions.to(pixels.device)
    return tokens, grid


def video_in_context(
    clips: torch.Tensor, slots: torch.Tensor, patch_size: int, context: int = SOURCE_TEMPORAL_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor]:
    """The source model's input for clips placed in its temporal context.

    ``clips`` ``(B, C, T, H, W)``; ``slots`` ``(B, T)`` the context frame of each clip frame (from
    :func:`~llava_vit.interpolate_frame_indices`). Returns ``(B, C, context, H, W)`` pixels with
    frame ``i`` at ``slots[:, i]`` and zeros elsewhere, and ``visible_indices`` ``(B, T*h*w)``
    selecting exactly the clip frames' tokens, so the source attends over the real frames at
    their context positions (the packed model gets the same positions through ``patch_positions``).
    """
    batch, channels, frames, height, width = clips.shape
    per_frame = (height // patch_size) * (width // patch_size)
    slots = slots.to(clips.device)
    padded = clips.new_zeros(batch, channels, context, height, width)
    padded.scatter_(2, slots[:, None, :, None, None].expand(-1, channels, -1, height, width), clips)
    visible = (slots[..., None] * per_frame + torch.arange(per_frame, device=clips.device)).reshape(batch, -1)
    return padded, visible


def random_visible_indices(batch: int, num_tokens: int, mask_ratio: float, device) -> torch.Tensor:
    """MAE-style masking: a random ``1 - mask_ratio`` share of tokens per sample, in raster order."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = max(1, round(num_tokens * (1.0 - mask_ratio)))
    return torch.rand(batch, num_tokens, device=device).argsort(dim=1)[:, :keep].sort(dim=1).values


def rope_attention(q, k, v, positions: torch.Tensor, rope_theta: float) -> torch.Tensor:
    """Full attention over ``(B, N, H, hd)`` q/k/v with 3D RoPE at ``positions`` ``(B, N, 3)``."""
    batch, tokens, heads, head_dim = q.shape
    cos, sin = (t.reshape(batch, tokens, 1, head_dim) for t in rope_cos_sin(positions.reshape(-1, 3), head_dim, rope_theta, q.dtype))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


class AttentionPoolingHead(nn.Module):
    """``a = MultiheadAttention(probe, x, x)``; ``y = a + mlp(rmsnorm(a))``; returns ``y[:, 0]``."""

    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size
        self.probe = nn.Parameter(torch.randn(1, 1, dim) * config.initializer_range)
        self.attention = nn.MultiheadAttention(dim, config.num_attention_heads, batch_first=True)
        self.norm = nn.RMSNorm(dim, eps=config.head_norm_eps)
        self.mlp = LlavaViTPackingMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1).to(x.dtype)
        pooled = self.attention(probe, x, x, need_weights=False)[0]
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]


# ---- timm training layout ---------------------------------------------------------------------


class _SourceAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.rope_theta = config.num_attention_heads, config.rope_theta
        self.in_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, positions):
        q, k, v = self.in_proj(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        return self.out_proj(rope_attention(q, k, v, positions, self.rope_theta))


class _SourceBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.hidden_size)
        self.attn = _SourceAttention(config)
        self.ln_2 = make_norm(config, config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size), nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )

    def forward(self, x, positions):
        x = x + self.attn(self.ln_1(x), positions)
        return x + self.mlp(self.ln_2(x))


class _SourceTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(_SourceBlock(config) for _ in range(config.num_hidden_layers))


class LlavaViT(nn.Module):
    """The timm-layout source encoder (``conv1, ln_pre, transformer.layers.*, ln_post, head.*``).

    ``config`` is a :class:`~llava_vit.LlavaViTConfig`; the timm variants build it with the
    training code's epsilons (LayerNorm 1e-5, RMSNorm ``None``).
    """

    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.config = config
        dim, p = config.hidden_size, config.patch_size
        self.conv1 = nn.Conv2d(config.num_channels, dim, kernel_size=p, stride=p, bias=False)
        self.ln_pre = make_norm(config, dim)
        self.transformer = _SourceTransformer(config)
        self.ln_post = make_norm(config, dim)
        self.head = AttentionPoolingHead(config) if config.use_head else None

    def forward(
        self,
        x: torch.Tensor,
        visible_indices: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        patch_positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if visible_indices is None and mask_ratio:
            frames = x.shape[2] if x.dim() == 5 else 1
            num_tokens = frames * (x.shape[-2] // self.config.patch_size) * (x.shape[-1] // self.config.patch_size)
            visible_indices = random_visible_indices(x.shape[0], num_tokens, mask_ratio, x.device)
        tokens, positions = embed_patches(self.conv1, x, visible_indices, patch_positions)
        h = self.ln_pre(tokens)
        for layer in self.transformer.layers:
            h = layer(h, positions)
        h = self.ln_post(h)
        out = {"visible_embeddings": h}
        if self.head is not None:
            out["head_output"] = self.head(h)
        return out


# ---- Hugging Face / OneVision-Encoder layout --------------------------------------------------


class LlavaViTEmbeddings(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=p, stride=p, bias=False)


class LlavaViTAttention(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.num_heads, self.rope_theta = config.num_attention_heads, config.rope_theta
        dim = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, positions):
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(rope_attention(q, k, v, positions, self.rope_theta))


class LlavaViTEncoderLayer(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layer_norm1 = make_norm(config, config.hidden_size)
        self.self_attn = LlavaViTAttention(config)
        self.layer_norm2 = make_norm(config, config.hidden_size)
        self.mlp = LlavaViTPackingMLP(config)

    def forward(self, x, positions):
        x = x + self.self_attn(self.layer_norm1(x), positions)
        return x + self.mlp(self.layer_norm2(x))


class LlavaViTEncoder(nn.Module):
    def __init__(self, config: LlavaViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(LlavaViTEncoderLayer(config) for _ in range(config.num_hidden_layers))


class LlavaViTModel(PreTrainedModel):
    """Unpacked HF twin of the source encoder; loads OneVision-Encoder folders as they are."""

    config_class = LlavaViTConfig
    base_model_prefix = "llava_vit"
    main_input_name = "pixel_values"
    _no_split_modules = ["LlavaViTEncoderLayer"]

    def __init__(self, config: LlavaViTConfig):
        super().__init__(config)
        self.embeddings = LlavaViTEmbeddings(config)
        self.layernorm_pre = make_norm(config, config.hidden_size)
        self.encoder = LlavaViTEncoder(config)
        self.layernorm_post = make_norm(config, config.hidden_size)
        self.head = AttentionPoolingHead(config) if config.use_head else None
        self.post_init()

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        """Attention always runs through ``scaled_dot_product_attention`` here."""
        if attn_implementation not in (None, "sdpa"):
            raise ValueError(f"LlavaViTModel runs attention through SDPA only, got {attn_implementation!r}")
        return "sdpa"

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)

    def forward(
        self,
        pixel_values: torch.Tensor,
        visible_indices: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        tokens, positions = embed_patches(self.embeddings.patch_embedding, pixel_values, visible_indices, patch_positions)
        h = self.layernorm_pre(tokens)
        states = []
        for layer in self.encoder.layers:
            if output_hidden_states:
                states.append(h)
            h = layer(h, positions)
        if output_hidden_states:
            states.append(h)
        h = self.layernorm_post(h)
        pooled = self.head(h) if self.head is not None else None
        all_states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return tuple(v for v in (h, pooled, all_states) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled, hidden_states=all_states)


class OneVisionEncoderModel(LlavaViTModel):
    """The same model under the published OneVision-Encoder ``model_type``."""

    config_class = OneVisionEncoderConfig
