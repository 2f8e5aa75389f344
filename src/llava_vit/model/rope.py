"""3D rotary position embedding, split 4:6:6 over (t, h, w), with the interleaved rotation.

The trained weights depend on two details that differ from the textbook RoPE (docs/ARCHITECTURE.md):
each axis has its own frequency ladder ``theta ** (-i / size_axis)``, and the rotation pairs
elements (2j, 2j+1) while the angle table is ``concat(f, f)``, so the two elements of a pair are
rotated by *different* frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import rope_qk, triton_available


def rope_axis_sizes(head_dim: int) -> tuple[int, int, int]:
    """Number of frequencies given to the (t, h, w) axes: 4u, 6u, 6u with u = head_dim / 32."""
    unit = head_dim // 32
    return 4 * unit, 6 * unit, 6 * unit


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles ``concat(f, f)`` of shape ``(N, head_dim)``, float32, for ``positions`` ``(N, 3)``."""
    pos = positions.to(torch.float32)
    freqs = []
    for axis, size in enumerate(rope_axis_sizes(head_dim)):
        inv_freq = theta ** (-torch.arange(size, device=pos.device, dtype=torch.float32) / size)
        freqs.append(pos[:, axis, None] * inv_freq)
    f = torch.cat(freqs, dim=-1)
    return torch.cat((f, f), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables ``(cos, signed_sin)``, each ``(N, head_dim)`` in ``dtype``, for :func:`apply_rope`.

    ``signed_sin`` carries the sign of the interleaved rotation (``-sin`` at even indices), so that
    applying RoPE is one pair swap and one multiply-add.
    """
    angles = rope_angles(positions, head_dim, theta)
    sin = angles.sin()
    sin[:, 0::2].neg_()
    return angles.cos().to(dtype), sin.to(dtype)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x[1], x[0], x[3], x[2], ...)`` on the last dimension."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotation ``x*cos(emb) + rot(x)*sin(emb)``, with ``rot(x)[2j] = -x[2j+1]`` and
    ``rot(x)[2j+1] = x[2j]``; the tables (from :func:`rope_cos_sin`) must broadcast against ``x``."""
    return torch.addcmul(x * cos, swap_pairs(x), signed_sin)


@dataclass(frozen=True)
class RotaryTables:
    """The float32 ``(N, head_dim)`` RoPE tables of one packed forward, built once for all layers.

    On CUDA with Triton the rotation runs as one fused kernel (:func:`llava_vit.kernels.rope_qk`);
    elsewhere, and inside ``torch.compile`` (which fuses it itself), as :func:`apply_rope` with the
    tables in the compute dtype.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, positions: torch.Tensor, head_dim: int, theta: float) -> RotaryTables:
        return cls(*rope_cos_sin(positions, head_dim, theta))

    def rotate_qk(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated ``q, k`` ``(N, H, hd)`` from ``qkv`` ``(N, 3, H, hd)``."""
        if qkv.is_cuda and triton_available() and not torch.compiler.is_compiling():
            return rope_qk(qkv, self.cos, self.sin)
        cos, sin = (t.to(qkv.dtype)[:, None, None] for t in (self.cos, self.sin))
        return apply_rope(qkv[:, :2], cos, sin).unbind(1)
