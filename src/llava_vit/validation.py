"""Checks at the public boundary: wrong inputs raise before any kernel runs, with a message that
names the argument, what was expected and what was given.

Reading a tensor's values costs nothing on the CPU and a device sync on an accelerator, so:

- types, shapes, dtypes and devices are always checked;
- ``grid_thw`` values are always checked: the forward needs them on the host to size its kernels,
  so it reads ``grid_thw`` once per call and derives everything else from that copy;
- values of other tensors (negative positions, frame indices out of range) are checked only when
  the tensor is on the CPU, where the check needs no sync.

NaN/Inf in ``hidden_states`` are not checked; see docs/RELIABILITY.md for what they do.
"""

from __future__ import annotations

import numbers

import torch

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def describe(value) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (numbers.Number, str)) else type(value).__name__


def check_positive_int(name: str, value) -> int:
    """``value`` as an ``int``; ``TypeError`` if it is not an integer, ``ValueError`` if it is below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def check_integer_tensor(name: str, value, shape: str) -> None:
    """``value`` must be a tensor of an integer dtype (not bool); ``shape`` describes it in messages."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor {shape}, got {describe(value)}")
    if value.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer torch.Tensor {shape}, got dtype {value.dtype}")


def check_non_negative(name: str, value: torch.Tensor) -> None:
    """Reject negative entries of a CPU tensor (elsewhere this would cost a device sync, so it is skipped)."""
    if value.device.type == "cpu" and value.numel() and bool(value.min() < 0):
        index = tuple((value < 0).nonzero()[0].tolist())
        raise ValueError(f"{name} must be non-negative, got {name}[{', '.join(map(str, index))}] = {value[index].item()}")


def check_grid_thw(grid_thw) -> torch.Tensor:
    """Validate ``grid_thw`` ``(num_samples, 3)`` of positive integers; return it as a CPU int64 tensor.

    This is the one host read of ``grid_thw`` (free for a CPU tensor, one sync for a device tensor).
    """
    check_integer_tensor("grid_thw", grid_thw, "of shape (num_samples, 3)")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape (num_samples, 3) (one [t, h, w] row per sample), got {tuple(grid_thw.shape)}")
    grid = grid_thw.to("cpu", torch.long)
    bad = (grid <= 0).any(dim=1).nonzero()
    if len(bad):
        i = bad[0, 0].item()
        raise ValueError(f"grid_thw entries [t, h, w] must be positive integers, got grid_thw[{i}] = {grid[i].tolist()}")
    return grid


def check_hidden_states(hidden_states, patch_dim: int, device: torch.device) -> None:
    """``hidden_states`` must be a floating-point ``(seq_len, patch_dim)`` tensor on ``device`` or
    on the CPU (CPU inputs are copied over)."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor of shape (seq_len, {patch_dim}), got {describe(hidden_states)}")
    if not hidden_states.dtype.is_floating_point:
        raise TypeError(f"hidden_states must be a floating-point tensor, got dtype {hidden_states.dtype}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != patch_dim:
        raise ValueError(
            f"hidden_states must have shape (seq_len, patch_dim={patch_dim}) (flattened C*p*p patches), "
            f"got {tuple(hidden_states.shape)}"
        )
    _check_device("hidden_states", hidden_states, device)


def check_pack_layout(
    grid_thw, patch_positions, device: torch.device, seq_len: int | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Validate ``grid_thw`` and ``patch_positions`` of a pack for a model on ``device``.

    Both must be on ``device`` or on the CPU. ``seq_len``, the token count of the ``hidden_states``
    that go with them, is checked against ``grid_thw`` before ``patch_positions`` is looked at, so a
    wrong grid is reported as such. Returns the host copy of ``grid_thw`` and the per-sample token
    counts.
    """
    _check_device("grid_thw", grid_thw, device)
    grid = check_grid_thw(grid_thw)
    if len(grid) == 0:
        raise ValueError("grid_thw has shape (0, 3): the batch is empty; expected at least one [t, h, w] row")
    lengths = [t * h * w for t, h, w in grid.tolist()]
    if seq_len is None:
        seq_len = sum(lengths)
    elif sum(lengths) != seq_len:
        raise ValueError(
            f"grid_thw describes sum(t*h*w) = {sum(lengths)} patches but hidden_states has seq_len = {seq_len}"
        )
    if patch_positions is not None:
        check_integer_tensor("patch_positions", patch_positions, f"of shape (seq_len={seq_len}, 3)")
        if patch_positions.shape != (seq_len, 3):
            raise ValueError(
                f"patch_positions must have shape (seq_len={seq_len}, 3) (one [t, h, w] per patch), "
                f"got {tuple(patch_positions.shape)}"
            )
        _check_device("patch_positions", patch_positions, device)
        check_non_negative("patch_positions", patch_positions)
    return grid, lengths


def _check_device(name: str, value, device: torch.device) -> None:
    """A tensor ``value`` must be on ``device`` or on the CPU (other types are checked elsewhere)."""
    if isinstance(value, torch.Tensor) and value.device.type != "cpu" and value.device != device:
        raise ValueError(f"{name} is on {value.device}; expected the model's device ({device}) or the CPU")


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """The device a command runs on: ``name`` (``cpu``, ``cuda``, ``cuda:1``...), or CUDA when present."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{flag} {name!r} is not a device name (expected cpu or cuda): {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{flag} {name}: no CUDA GPU is available here (CUDA is not available to this machine or "
            f"PyTorch build); use {flag} cpu"
        )
    return device
