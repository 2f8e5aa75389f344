"""The packed LlavaViT encoder: images and videos of any size in one variable-length sequence.

Reads top-down in forward order: patch embedding, pre-norm, pre-norm residual layers with 3D
RoPE attention that never crosses sample boundaries, post-norm, and the attention-pooling head
that gives one vector per sample. docs/ARCHITECTURE.md states the math this follows line for line.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

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
from ..validation import check_hidden_states, check_pack_layout


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
    recomputes it in the backward pass with the user's checkpointing options (every layer, or every
    k-th: :meth:`LlavaViTPackingModel.gradient_checkpointing_enable`).
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


@dataclass(frozen=True)
class PreparedPack:
    """What a forward derives from ``grid_thw`` and ``patch_positions`` alone, on the model's device.

    Building it is the forward's host work (input checks, backend choice, host-to-device copies of
    the sample lengths and positions); :meth:`LlavaViTPackingModel.encode` on it is device work
    only, which is what a CUDA graph can capture (:mod:`llava_vit.model.cuda_graphs`).
    """

    backend: str
    """The attention backend that runs (``"auto"`` resolved for this pack)."""
    seqs: PackedSeqs
    """The samples, for the encoder layers and as the keys of the pooling head."""
    probe_seqs: PackedSeqs | None
    """One query per sample for the pooling head; ``None`` without a head."""
    rope: RotaryTables

    @property
    def seq_len(self) -> int:
        """Tokens in the pack: the ``hidden_states`` rows it goes with."""
        return sum(self.seqs.lengths)


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

    :meth:`forward` is :meth:`prepare` (the host work, from ``grid_thw`` and ``patch_positions``)
    then :meth:`encode` (the device work on ``hidden_states``); a service with one fixed input
    size can prepare once and replay the encode step as a CUDA graph
    (:class:`~llava_vit.model.cuda_graphs.CUDAGraphEncoder`).
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute encoder layers in the backward pass instead of keeping their activations.

        The transformers method, with one key of ours in ``gradient_checkpointing_kwargs``:
        ``"every_k_layers": k`` (a positive int, default 1) checkpoints only the layers whose index
        is a multiple of ``k`` (``k=2``: layers 0, 2, 4, ...). A checkpointed layer frees its
        activations after the forward and runs its forward again in the backward; the other
        layers keep theirs and are not recomputed. So ``k`` trades memory for time: ``k=1``
        uses the least memory, larger ``k`` recomputes ``1/k`` of the layers. The other keys
        (``use_reentrant``, ``context_fn``, ...) go to ``torch.utils.checkpoint.checkpoint``
        unchanged, and ``kwargs`` to the transformers method (``activation_checkpointing_enable``
        of transformers 5 calls this method too).
        """
        options = dict(gradient_checkpointing_kwargs or {})
        every_k_layers = options.pop("every_k_layers", 1)
        if isinstance(every_k_layers, bool) or not isinstance(every_k_layers, numbers.Integral) or every_k_layers < 1:
            raise ValueError(f"every_k_layers: expected a positive int, got {every_k_layers!r}")
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=options or None, **kwargs)
        for index, layer in enumerate(self.encoder.layers):
            if index % every_k_layers:
                layer.gradient_checkpointing = False

    def prepare(
        self, grid_thw: torch.Tensor, patch_positions: torch.Tensor | None = None, seq_len: int | None = None
    ) -> PreparedPack:
        """Check ``grid_thw`` and ``patch_positions`` (as :meth:`forward` takes them) and build the
        :class:`PreparedPack` for them on the model's device.

        ``seq_len``: the row count of the ``hidden_states`` that will go with the pack, checked
        against ``grid_thw`` first (a wrong grid is then reported as a wrong grid, not as a wrong
        ``patch_positions`` shape).
        """
        config = self.config
        weight = self.patch_embed.proj.weight
        device, dtype = weight.device, weight.dtype
        grid, lengths = check_pack_layout(grid_thw, patch_positions, device, seq_len)
        backend = resolve_attn_implementation(config._attn_implementation, device, dtype, tuple(lengths))
        if patch_positions is None:
            patch_positions = compute_patch_positions_from_grid_thw(grid)
        rope = RotaryTables.build(patch_positions.to(device, non_blocking=True), config.head_dim, config.rope_theta)
        probe_seqs = PackedSeqs.from_lengths([1] * len(lengths), device) if self.head is not None else None
        return PreparedPack(backend, PackedSeqs.from_lengths(lengths, device), probe_seqs, rope)

    def encode(
        self, hidden_states: torch.Tensor, pack: PreparedPack, output_hidden_states: bool = False
    ) -> BaseModelOutputWithPooling:
        """The forward's tensor computation on ``hidden_states`` ``(pack.seq_len, C*p*p)``, which the
        caller has checked: device work only (CPU ``hidden_states`` are copied over), no host reads."""
        x = self.layernorm_pre(self.patch_embed(hidden_states.to(self.patch_embed.proj.weight.device, non_blocking=True)))
        x, all_states = self.encoder(x, pack.rope, pack.seqs, pack.backend, output_hidden_states)
        x = self.layernorm_post(x)
        pooled = None if self.head is None else self.head(x, pack.seqs, pack.probe_seqs, pack.backend)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled, hidden_states=all_states)

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
        check_hidden_states(hidden_states, config.patch_dim, self.patch_embed.proj.weight.device)
        pack = self.prepare(grid_thw, patch_positions, seq_len=hidden_states.shape[0])
        out = self.encode(hidden_states, pack, output_hidden_states)
        return out if return_dict else out.to_tuple()
