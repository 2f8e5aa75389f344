"""The packed encoder equals the unpacked source model on random weights, for every input kind."""

from __future__ import annotations

import pytest
import torch

from golden_cases import patchify
from llava_vit import (
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)
from llava_vit.reference import video_in_context
from model_pairs import source_and_packed

P = 8
TOL = 2e-5


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def clip_in_context(frames: int, h: int, w: int, seed: int):
    """A clip, the source's 64-frame padded input + visible indices, and the packed positions."""
    clip = torch.randn(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed))
    slots = interpolate_frame_indices(torch.arange(frames)[None], torch.tensor([frames]))
    padded, visible = video_in_context(clip, slots, P)
    positions = compute_patch_positions_with_interpolated_temporal(slots, h // P, w // P)
    return clip, (padded,), {"visible_indices": visible}, positions


def sample_inputs(kind: str, seed: int):
    """(packed hidden_states, grid_thw, positions, source args, source kwargs)."""
    if kind.startswith("image"):
        h, w = {"image_square": (64, 64), "image_wide": (40, 96), "image_tall": (88, 24)}[kind]
        px = image(h, w, seed)
        grid = torch.tensor([[1, h // P, w // P]])
        return patchify(px[0], P), grid, compute_patch_positions_from_grid_thw(grid), (px,), {}
    frames, h, w = {"video_8f": (8, 32, 32), "video_5f": (5, 24, 40)}[kind]
    clip, args, kwargs, positions = clip_in_context(frames, h, w, seed)
    return patchify(clip[0], P), torch.tensor([[frames, h // P, w // P]]), positions, args, kwargs


KINDS = ("image_square", "image_wide", "image_tall", "video_8f", "video_5f")


@pytest.fixture(scope="module", params=["layer_norm", "rms_norm"])
def models(request):
    return source_and_packed(request.param, seed=1)


@torch.no_grad()
@pytest.mark.parametrize("kind", KINDS)
def test_single_sample(models, kind):
    source, packed = models
    hs, grid, pos, args, kwargs = sample_inputs(kind, seed=2)
    ref = source(*args, **kwargs)
    out = packed(hs, grid, pos)
    assert (out.last_hidden_state - ref["visible_embeddings"][0]).abs().max() <= TOL
    assert (out.pooler_output - ref["head_output"]).abs().max() <= TOL


@torch.no_grad()
def test_mixed_pack_equals_source_per_sample(models):
    source, packed = models
    order = ("video_8f", "image_wide", "image_square", "video_5f", "image_tall", "image_square")
    inputs = [sample_inputs(kind, seed=10 + i) for i, kind in enumerate(order)]
    out = packed(torch.cat([i[0] for i in inputs]), torch.cat([i[1] for i in inputs]), torch.cat([i[2] for i in inputs]))
    start = 0
    for i, (hs, _, _, args, kwargs) in enumerate(inputs):
        ref = source(*args, **kwargs)
        n = hs.shape[0]
        assert (out.last_hidden_state[start:start + n] - ref["visible_embeddings"][0]).abs().max() <= TOL, order[i]
        assert (out.pooler_output[i] - ref["head_output"][0]).abs().max() <= TOL, order[i]
        start += n


@torch.no_grad()
def test_default_positions_are_raster_frame_indices(models):
    """Without patch_positions a video's t is its frame index (0..T-1), as the source on a T-frame clip."""
    source, packed = models
    clip = torch.randn(1, 3, 3, 16, 24)
    out = packed(patchify(clip[0], P), torch.tensor([[3, 2, 3]]))
    ref = source(clip)
    assert (out.last_hidden_state - ref["visible_embeddings"][0]).abs().max() <= TOL


@torch.no_grad()
def test_output_hidden_states_and_tuple_output(models):
    _, packed = models
    hs, grid, pos, _, _ = sample_inputs("image_wide", seed=3)
    out = packed(hs, grid, pos, output_hidden_states=True)
    assert len(out.hidden_states) == packed.config.num_hidden_layers + 1
    assert torch.equal(packed.layernorm_post(out.hidden_states[-1]), out.last_hidden_state)
    as_tuple = packed(hs, grid, pos, return_dict=False)
    assert torch.equal(as_tuple[0], out.last_hidden_state) and torch.equal(as_tuple[1], out.pooler_output)
