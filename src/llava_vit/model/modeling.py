"""The packed LlavaViT encoder: images and videos of any size in one variable-length sequence.

Reads top-down in forward order: patch embedding, pre-norm, pre-norm residual layers with 3D
RoPE attention that never crosses sample boundaries, post-norm, and the attention-pooling head
that gives one vector per sample. docs/ARCHITECTURE.md states the math this follows line for line.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .attention import PackedSeqs, check_attn_implementation, resolve_attn_implementation, varlen_attention
from .configuration import LlavaViTPackingConfig
from .positions import compute_patch_positions_from_grid_thw
from .rope import RotaryTables
from ..validation import check_packed_inputs


def make_norm(config, dim: int) -> nn.Module:
    """The body norm: LayerNorm, or RMSNorm when ``layer_norm_type == "rms_norm"``."""
    if config.layer_norm_type == "rms_norm":
        return nn.RMSNorm(dim, eps=config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """Fresh-model init shared by the packed and source encoders: truncated-normal matrices, zero
    biases, unit norms; the attention-pooling ``in_proj_weight`` and ``probe`` like matrices."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        nn.init.trunc_normal_(module.in_proj_weight, std=std)
        nn.init.zeros_(module.in_proj_bias)
    if isinstance(getattr(module, "probe", None), nn.Parameter):
        nn.init.trunc_normal_(module.probe, std=std)


class LlavaViTPackingPatchEmbed(nn.Module):
    """``Conv2d(C, D, p, stride=p, bias=False)`` on channel-major patch vectors, as one matmul."""

    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)
        return F.linear(patches.to(weight.dtype), weight)


class LlavaViTPackingAttentionLayer(nn.Module):
    """Fused-qkv multi-head self-attention with 3D RoPE, block-diagonal over the packed samples."""

    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def project(self, x: torch.Tensor, rope: RotaryTables):
        """``q, k, v`` ``(N, H, hd)``, with RoPE applied to q and k in one pass."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k = rope.rotate_qk(qkv)
        return q, k, qkv[:, 2]


class LlavaViTPackingMLP(nn.Module):
    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LlavaViTPackingEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    A transformers ``GradientCheckpointingLayer``: ``model.gradient_checkpointing_enable(...)``
    recomputes it in the backward pass with the user's checkpointing options.
    """

    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__()
        self.layer_norm1 = make_norm(config, config.hidden_size)
        self.self_attn = LlavaViTPackingAttentionLayer(config)
        self.layer_norm2 = make_norm(config, config.hidden_size)
        self.mlp = LlavaViTPackingMLP(config)

    def forward(self, x: torch.Tensor, rope: RotaryTables, seqs: PackedSeqs, backend: str) -> torch.Tensor:
        q, k, v = self.self_attn.project(self.layer_norm1(x), rope)
        x = x + self.self_attn.proj(varlen_attention(q, k, v, seqs, seqs, backend).flatten(1))
        return x + self.mlp(self.layer_norm2(x))


class LlavaViTPackingEncoder(nn.Module):
    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__()
        self.layers = nn.ModuleList(LlavaViTPackingEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, rope: RotaryTables, seqs: PackedSeqs, backend: str, output_hidden_states: bool = False):
        states = []
        for layer in self.layers:
            if output_hidden_states:
                states.append(x)
            x = layer(x, rope, seqs, backend)
        if output_hidden_states:
            states.append(x)
        return x, tuple(states) if output_hidden_states else None


class MultiheadAttentionPoolingParams(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` (same names, same checkpoint layout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)


class LlavaViTPackingHead(nn.Module):
    """Attention pooling per sample: a learned probe queries the sample's tokens (one vector each).

    ``a = MHA(probe, x, x)``; ``y = a + mlp(rmsnorm(a))``. All samples go through one varlen
    attention call with one query each, so there is no loop over samples and no host sync.
    """

    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = MultiheadAttentionPoolingParams(config.hidden_size)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.head_norm_eps)
        self.mlp = LlavaViTPackingMLP(config)

    def forward(self, x: torch.Tensor, seqs: PackedSeqs, probe_seqs: PackedSeqs, backend: str) -> torch.Tensor:
        w_q, w_kv = self.attention.in_proj_weight.split((x.shape[-1], 2 * x.shape[-1]))
        b_q, b_kv = self.attention.in_proj_bias.split((x.shape[-1], 2 * x.shape[-1]))
        num_samples = len(seqs.lengths)
        q = F.linear(self.probe.reshape(1, -1), w_q, b_q).reshape(1, self.num_heads, self.head_dim)
        q = q.expand(num_samples, -1, -1).contiguous()
        k, v = F.linear(x, w_kv, b_kv).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(1)
        pooled = self.attention.out_proj(varlen_attention(q, k, v, probe_seqs, seqs, backend).flatten(1))
        return pooled + self.mlp(self.norm(pooled))


class LlavaViTPackingPreTrainedModel(PreTrainedModel):
    config_class = LlavaViTPackingConfig
    base_model_prefix = "llava_vit_packing"
    main_input_name = "hidden_states"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _no_split_modules = ["LlavaViTPackingEncoderLayer"]

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        """Accept this model's backends (see :mod:`llava_vit.attention`); ``None`` means ``"auto"``."""
        return check_attn_implementation(attn_implementation)

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)


class LlavaViTPackingModel(LlavaViTPackingPreTrainedModel):
    """Packed vision encoder (docs/ARCHITECTURE.md, "The packing contract").

    Args of :meth:`forward`:
        hidden_states: ``(seq_len, C*p*p)`` flattened patches of every sample, concatenated
            (channel-major within a patch: ``(C, p, p)`` flattened).
        grid_thw: ``(num_samples, 3)`` integer ``[t, h, w]`` patch grid of each sample. A CPU
            tensor avoids the one device-to-host copy a CUDA ``grid_thw`` costs per call.
        patch_positions: optional ``(seq_len, 3)`` integer RoPE positions ``[t, h, w]``;
            default: raster positions from ``grid_thw`` (for videos that must match the source
            model, use :func:`~llava_vit.compute_patch_positions_with_interpolated_temporal`).
        output_hidden_states: also return the input of every layer plus the last layer's output.
        return_dict: return a ``BaseModelOutputWithPooling`` (default) or a tuple.

    Tensors must be on the model's device or on the CPU (CPU inputs are copied over); any other
    device raises ``ValueError``. Bad inputs raise before any kernel runs (docs/RELIABILITY.md).
    """

    def __init__(self, config: LlavaViTPackingConfig):
        super().__init__(config)
        self.patch_embed = LlavaViTPackingPatchEmbed(config)
        self.layernorm_pre = make_norm(config, config.hidden_size)
        self.encoder = LlavaViTPackingEncoder(config)
        self.layernorm_post = make_norm(config, config.hidden_size)
        self.head = LlavaViTPackingHead(config) if config.use_head else None
        self.post_init()

    def compile_fused(self, **compile_kwargs) -> LlavaViTPackingModel:
        """Opt in to ``torch.compile`` of every encoder layer (norms, RoPE, GELU and residuals fused
        around the matmuls). The attention kernel is excluded from compilation
        (:func:`~llava_vit.model.attention.varlen_attention`), so packs of any lengths reuse one
        compilation. Returns ``self``."""
        options = {"dynamic": True, **compile_kwargs}
        for layer in self.encoder.layers:
            layer.compile(**options)
        return self

    def forward(
        self,
        hidden_states: torch.Tensor,
        grid_thw: torch.Tensor,
        patch_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        config = self.config
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        weight = self.patch_embed.proj.weight
        device, dtype = weight.device, weight.dtype
        grid, lengths = check_packed_inputs(hidden_states, grid_thw, patch_positions, config.patch_dim, device)
        backend = resolve_attn_implementation(config._attn_implementation, device, dtype, tuple(lengths))
        seqs = PackedSeqs.from_lengths(lengths, device)
        if patch_positions is None:
            patch_positions = compute_patch_positions_from_grid_thw(grid)
        rope = RotaryTables.build(patch_positions.to(device, non_blocking=True), config.head_dim, config.rope_theta)

        x = self.layernorm_pre(self.patch_embed(hidden_states.to(device, non_blocking=True)))
        x, all_states = self.encoder(x, rope, seqs, backend, output_hidden_states)
        x = self.layernorm_post(x)
        pooled = None
        if self.head is not None:
            probe_seqs = PackedSeqs.from_lengths([1] * len(lengths), device)
            pooled = self.head(x, seqs, probe_seqs, backend)

        if not return_dict:
            return tuple(v for v in (x, pooled, all_states) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=all_states)
