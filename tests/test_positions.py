"""Vectorized position helpers equal the original implementation's per-patch loops."""

from __future__ import annotations

import pytest
import torch

from llava_vit import (
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)


def original_positions_from_grid(grid_thw):
    rows = []
    for t, h, w in grid_thw.tolist():
        for ti in range(t):
            for hi in range(h):
                for wi in range(w):
                    rows.append([ti, hi, wi])
    return torch.tensor(rows)


def original_interpolated_positions(indices, h, w):
    rows = []
    for clip in indices.tolist():
        for t in clip:
            for hi in range(h):
                for wi in range(w):
                    rows.append([t, hi, wi])
    return torch.tensor(rows)


def test_positions_from_grid_match_loop():
    grid = torch.tensor([[1, 3, 5], [4, 2, 3], [1, 1, 1], [2, 1, 7]])
    assert torch.equal(compute_patch_positions_from_grid_thw(grid), original_positions_from_grid(grid))


def test_interpolated_indices_match_the_documented_examples():
    eight = interpolate_frame_indices(torch.arange(8)[None], torch.tensor([8]), 64)
    assert eight.tolist() == [[0, 9, 18, 27, 36, 45, 54, 63]]
    four = interpolate_frame_indices(torch.arange(4)[None], torch.tensor([4]))
    assert four.tolist() == [[0, 21, 42, 63]]
    one = interpolate_frame_indices(torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]))
    assert one.tolist() == [[0]]


def test_interpolation_is_batched():
    idx = torch.stack([torch.arange(8), torch.arange(8)])
    out = interpolate_frame_indices(idx, torch.tensor([8, 15]), 64)
    assert out[0].tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert out[1].tolist() == [round(i / 14 * 63) for i in range(8)]


@pytest.mark.parametrize("batch", [1, 3])
def test_interpolated_positions_match_loop(batch):
    slots = interpolate_frame_indices(torch.arange(8).expand(batch, 8), torch.full((batch,), 8))
    out = compute_patch_positions_with_interpolated_temporal(slots, 3, 4, device="cpu")
    assert torch.equal(out, original_interpolated_positions(slots, 3, 4))
    assert out.shape == (batch * 8 * 12, 3)
    assert out[12].tolist() == [9, 0, 0]  # first patch of frame 1 sits at slot 9
