"""Checks at the public boundary: wrong inputs raise before any kernel runs, naming the argument.

Only shapes, dtypes and devices are inspected, plus ``grid_thw`` values, which are read on the
host once per call (a CPU ``grid_thw`` costs no device sync at all).
"""

from __future__ import annotations

import torch

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    return type(value).__name__


def check_grid_thw(grid_thw) -> list[int]:
    """Validate ``grid_thw`` ``(num_samples, 3)`` of positive integers; return per-sample token counts."""
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"grid_thw must be a torch.Tensor of shape (num_samples, 3), got {_describe(grid_thw)}")
    if grid_thw.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"grid_thw must hold integers [t, h, w], got dtype {grid_thw.dtype}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (num_samples, 3), got {tuple(grid_thw.shape)}")
    if grid_thw.shape[0] == 0:
        raise ValueError("grid_thw is empty: the batch has no samples (expected at least one [t, h, w] row)")
    rows = grid_thw.cpu().long().tolist()
    for i, row in enumerate(rows):
        if min(row) <= 0:
            raise ValueError(f"grid_thw[{i}] = {row}: every entry of [t, h, w] must be positive")
    return [t * h * w for t, h, w in rows]


def check_packed_inputs(hidden_states, grid_thw, patch_positions, patch_dim: int) -> list[int]:
    """Validate the packed forward's inputs; return the per-sample token counts."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor (seq_len, {patch_dim}), got {_describe(hidden_states)}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != patch_dim:
        raise ValueError(
            f"hidden_states must have shape (seq_len, patch_dim={patch_dim}) (C*p*p flattened patches), "
            f"got {tuple(hidden_states.shape)}"
        )
    if not hidden_states.dtype.is_floating_point:
        raise TypeError(f"hidden_states must be a floating-point tensor, got dtype {hidden_states.dtype}")
    lengths = check_grid_thw(grid_thw)
    seq_len = hidden_states.shape[0]
    if sum(lengths) != seq_len:
        raise ValueError(
            f"grid_thw describes sum(t*h*w) = {sum(lengths)} patches but hidden_states has seq_len = {seq_len}"
        )
    _check_same_device("grid_thw", grid_thw, hidden_states)
    if patch_positions is not None:
        if not isinstance(patch_positions, torch.Tensor):
            raise TypeError(f"patch_positions must be a torch.Tensor (seq_len, 3), got {_describe(patch_positions)}")
        if patch_positions.dtype not in _INTEGER_DTYPES:
            raise TypeError(f"patch_positions must hold integer [t, h, w] positions, got dtype {patch_positions.dtype}")
        if patch_positions.shape != (seq_len, 3):
            raise ValueError(
                f"patch_positions must have shape (seq_len={seq_len}, 3), got {tuple(patch_positions.shape)}"
            )
        _check_same_device("patch_positions", patch_positions, hidden_states)
    return lengths


def _check_same_device(name: str, tensor: torch.Tensor, hidden_states: torch.Tensor) -> None:
    if tensor.device.type != "cpu" and tensor.device != hidden_states.device:
        raise ValueError(
            f"{name} is on {tensor.device} but hidden_states is on {hidden_states.device}; "
            f"put {name} on the same device (or on the CPU)"
        )
