"""RoPE positions of packed patches: from ``grid_thw``, and for videos in the 64-frame context.

All helpers are vectorized and run on the device of their inputs. Arguments are validated as in
:mod:`llava_vit.validation`: value checks (negative or out-of-range indices) apply to CPU tensors.
"""

from __future__ import annotations

import torch

from ..validation import check_grid_thw, check_integer_tensor, check_non_negative, check_positive_int

SOURCE_TEMPORAL_CONTEXT = 64
"""Frames in the temporal context the source model was trained with."""


def compute_patch_positions_from_grid_thw(grid_thw: torch.Tensor) -> torch.Tensor:
    """``(seq_len, 3)`` positions ``[t, h, w]`` in raster order (t slowest, w fastest).

    t is the frame index 0..t-1 of each sample; ``seq_len = sum(t * h * w)``. ``grid_thw`` is read
    on the host once (no sync for a CPU tensor); an empty ``(0, 3)`` grid gives ``(0, 3)`` positions.
    """
    total = int(check_grid_thw(grid_thw).prod(-1).sum())
    grid = grid_thw.long()
    if total == 0:
        return torch.zeros(0, 3, dtype=torch.long, device=grid.device)
    t, h, w = grid.unbind(-1)
    lengths = t * h * w
    sample = torch.repeat_interleave(torch.arange(grid.shape[0], device=grid.device), lengths, output_size=total)
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
    check_integer_tensor("frame_indices", frame_indices, "[B, num_frames]")
    if frame_indices.dim() != 2:
        raise ValueError(f"frame_indices must be 2-D [B, num_frames], got shape {tuple(frame_indices.shape)}")
    target_frames = check_positive_int("target_frames", target_frames)
    if isinstance(total_frames, torch.Tensor):
        check_integer_tensor("total_frames", total_frames, "[B]")
    else:
        total_frames = check_positive_int("total_frames", total_frames)
    total = torch.as_tensor(total_frames, device=frame_indices.device).reshape(-1)
    if total.numel() not in (1, frame_indices.shape[0]):
        raise ValueError(
            f"total_frames must have one entry per row of frame_indices ({frame_indices.shape[0]}) or one in all, "
            f"got {total.numel()}"
        )
    if total.device.type == "cpu":
        if bool((total < 1).any()):
            raise ValueError(f"total_frames must be positive, got {total.tolist()}")
        if bool(((frame_indices < 0) | (frame_indices >= total[:, None])).any()):
            raise ValueError(
                f"frame_indices must lie in [0, total_frames - 1] (total_frames = {total.tolist()}), got values "
                f"from {frame_indices.min().item()} to {frame_indices.max().item()}"
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
    check_integer_tensor("interpolated_indices", interpolated_indices, "[B, num_frames]")
    if interpolated_indices.dim() == 1:
        interpolated_indices = interpolated_indices[None]
    if interpolated_indices.dim() != 2:
        raise ValueError(
            f"interpolated_indices must be [B, num_frames] (or [num_frames]), got shape {tuple(interpolated_indices.shape)}"
        )
    check_non_negative("interpolated_indices", interpolated_indices)
    h_patches = check_positive_int("h_patches", h_patches)
    w_patches = check_positive_int("w_patches", w_patches)
    device = interpolated_indices.device if device is None else torch.device(device)
    t = interpolated_indices.to(device=device, dtype=torch.long).reshape(-1)
    hh = torch.arange(h_patches, device=device)
    ww = torch.arange(w_patches, device=device)
    grid = torch.stack(torch.meshgrid(t, hh, ww, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)
