"""RoPE positions of packed patches: from ``grid_thw``, and for videos in the 64-frame context.

All helpers are vectorized and run on the device of their inputs.
"""

from __future__ import annotations

import torch

SOURCE_TEMPORAL_CONTEXT = 64
"""Frames in the temporal context the source model was trained with."""


def _as_grid(grid_thw: torch.Tensor) -> torch.Tensor:
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"grid_thw must be a torch.Tensor of shape (num_samples, 3), got {type(grid_thw).__name__}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (num_samples, 3), got {tuple(grid_thw.shape)}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype.is_complex or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}")
    return grid_thw.long()


def compute_patch_positions_from_grid_thw(grid_thw: torch.Tensor) -> torch.Tensor:
    """``(seq_len, 3)`` positions ``[t, h, w]`` in raster order (t slowest, w fastest).

    t is the frame index 0..t-1 of each sample; ``seq_len = sum(t * h * w)``.
    """
    grid = _as_grid(grid_thw)
    if grid.shape[0] == 0:
        return torch.zeros(0, 3, dtype=torch.long, device=grid.device)
    t, h, w = grid.unbind(-1)
    lengths = t * h * w
    sample = torch.repeat_interleave(torch.arange(grid.shape[0], device=grid.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(sample.shape[0], device=grid.device) - starts[sample]
    hw = (h * w)[sample]
    ws = w[sample]
    return torch.stack((local // hw, (local % hw) // ws, local % ws), dim=-1)


def interpolate_frame_indices(
    frame_indices: torch.Tensor, total_frames: torch.Tensor, target_frames: int = SOURCE_TEMPORAL_CONTEXT
) -> torch.Tensor:
    """Place frame ``i`` of a ``T``-frame clip at ``round(i / max(T-1, 1) * (target_frames-1))``.

    ``frame_indices`` is ``[B, num_frames]``; ``total_frames`` is ``[B]`` (or a scalar/int).
    Returns ``[B, num_frames]`` long indices in ``[0, target_frames - 1]``; 8 frames give
    ``0, 9, 18, ..., 63``.
    """
    if not isinstance(frame_indices, torch.Tensor) or frame_indices.dim() != 2:
        raise ValueError(
            f"frame_indices must be a 2-D tensor [B, num_frames], got "
            f"{tuple(frame_indices.shape) if isinstance(frame_indices, torch.Tensor) else type(frame_indices).__name__}"
        )
    if isinstance(target_frames, bool) or not isinstance(target_frames, int) or target_frames < 1:
        raise ValueError(f"target_frames must be a positive integer, got {target_frames!r}")
    total = torch.as_tensor(total_frames, device=frame_indices.device).reshape(-1)
    if total.numel() not in (1, frame_indices.shape[0]):
        raise ValueError(
            f"total_frames must have one entry per row of frame_indices ({frame_indices.shape[0]}), "
            f"got {total.numel()}"
        )
    span = (total.to(torch.float64) - 1).clamp(min=1)[:, None]
    scaled = frame_indices.to(torch.float64) / span * (target_frames - 1)
    return scaled.round().long().clamp(0, target_frames - 1)


def compute_patch_positions_with_interpolated_temporal(
    interpolated_indices: torch.Tensor, h_patches: int, w_patches: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(B * num_frames * h * w, 3)`` positions whose t is the frame's slot in the temporal context.

    ``interpolated_indices`` is ``[B, num_frames]`` (from :func:`interpolate_frame_indices`); every
    clip has the same ``h_patches x w_patches`` grid. Rows are clip-major, then frame, row, column.
    """
    if not isinstance(interpolated_indices, torch.Tensor):
        interpolated_indices = torch.as_tensor(interpolated_indices)
    if interpolated_indices.dim() == 1:
        interpolated_indices = interpolated_indices[None]
    if interpolated_indices.dim() != 2:
        raise ValueError(
            f"interpolated_indices must be [B, num_frames], got shape {tuple(interpolated_indices.shape)}"
        )
    for name, value in (("h_patches", h_patches), ("w_patches", w_patches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = interpolated_indices.device if device is None else torch.device(device)
    t = interpolated_indices.to(device=device, dtype=torch.long).reshape(-1)
    hh = torch.arange(h_patches, device=device)
    ww = torch.arange(w_patches, device=device)
    grid = torch.stack(torch.meshgrid(t, hh, ww, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)
