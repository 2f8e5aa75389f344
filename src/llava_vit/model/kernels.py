"""Fused CUDA kernels (Triton) for the packed forward's elementwise hot spots.

RoPE in eager PyTorch costs three broadcasting passes (multiply, pair swap, multiply-add) over q
and k; on an H100 that was 24% of a ViT-L forward (docs/PERFORMANCE.md). :func:`rope_qk` does
it in one pass, in float32 registers, reading the partner element of each pair at ``index ^ 1``.
Used only when Triton and a CUDA tensor are present; :func:`llava_vit.rope.apply_rope` is the
reference and the fallback.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch builds ship without Triton
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _rope_kernel(
        src_ptr, dst_ptr, cos_ptr, sin_ptr, num_rows, src_row_stride, dst_row_stride,
        HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_POW2: tl.constexpr, BLOCK_ROWS: tl.constexpr,
        TRANSPOSE: tl.constexpr,
    ):
        """``BLOCK_ROWS`` tokens, every head: ``dst = src*cos + src[i^1]*sin[i]`` (forward) or its
        transpose ``dst = src*cos + src[i^1]*sin[i^1]`` (the gradient). The tables are read once
        per token and reused for all heads."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        cols = tl.arange(0, HEAD_DIM_POW2)[None, :]
        mask = (rows < num_rows) & (cols < HEAD_DIM)
        rows64 = rows.to(tl.int64)
        table = rows64 * HEAD_DIM
        cos = tl.load(cos_ptr + table + cols, mask=mask)
        sin = tl.load(sin_ptr + table + ((cols ^ 1) if TRANSPOSE else cols), mask=mask)
        src_rows = src_ptr + rows64 * src_row_stride
        dst_rows = dst_ptr + rows64 * dst_row_stride
        for head in tl.range(0, HEADS):
            offset = head * HEAD_DIM
            x = tl.load(src_rows + offset + cols, mask=mask).to(tl.float32)
            partner = tl.load(src_rows + offset + (cols ^ 1), mask=mask).to(tl.float32)
            out = x * cos + partner * sin
            tl.store(dst_rows + offset + cols, out.to(dst_ptr.dtype.element_ty), mask=mask)


def _launch_rope(
    src: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool,
    block_rows: int = 16, num_warps: int = 4,
) -> None:
    """Rotate ``src`` ``(N, heads, hd)`` (any row stride, rows of heads contiguous) into ``dst``.

    One program per ``block_rows`` tokens (``bench/rope_kernel_tuning.py`` picks the default tile
    on an H100).
    """
    num_rows, heads, head_dim = src.shape
    _rope_kernel[(triton.cdiv(num_rows, block_rows),)](
        src, dst, cos, sin, num_rows, src.stride(0), dst.stride(0),
        HEADS=heads, HEAD_DIM=head_dim, HEAD_DIM_POW2=triton.next_power_of_2(head_dim), BLOCK_ROWS=block_rows,
        TRANSPOSE=transpose, num_warps=num_warps,
    )


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
        _launch_rope(qk.flatten(1, 2), out.view(out.shape[0], -1, out.shape[-1]), cos, sin, transpose=False)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        _launch_rope(grad.flatten(1, 2), out.flatten(1, 2), cos, sin, transpose=True)
        return out, None, None


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on the q and k parts of ``qkv`` ``(N, 3, H, hd)``; returns rotated ``q, k`` ``(N, H, hd)``.

    ``cos``/``sin`` are the float32 ``(N, hd)`` tables of :func:`llava_vit.rope.rope_cos_sin`.
    Without autograd the rotation is written in place into ``qkv`` (no new memory).
    """
    if qkv.stride(-1) != 1 or qkv.stride(-2) != qkv.shape[-1] or qkv.stride(1) != qkv.shape[-2] * qkv.shape[-1]:
        qkv = qkv.contiguous()
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _RopeQK.apply(qkv[:, :2], cos, sin).unbind(1)
    qk = qkv[:, :2].flatten(1, 2)
    _launch_rope(qk, qk, cos, sin, transpose=False)
    return qkv[:, 0], qkv[:, 1]
