"""Packing properties, by hypothesis, on a small random model in float32 on the CPU.

- packing invariance: any grouping and order of samples gives each sample its output alone;
- determinism: the same input twice gives bit-identical outputs;
- backend agreement: every backend equals the unpacked source model (the CUDA ones on a GPU);
- extreme grids (1x1, 1x64, 64x1, 16 frames) packed among others equal the source model too;
- NaN/Inf in one sample's pixels make that sample's outputs NaN and leave every other sample's
  outputs bit-identical (docs/RELIABILITY.md).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from golden_cases import patchify
from llava_vit import compute_patch_positions_with_interpolated_temporal, interpolate_frame_indices
import torch.nn.functional as F

from llava_vit.model.attention import (
    FLASH_ATTN4_CAPABILITY_MAJORS,
    flash_attn4_available,
    flash_attn_available,
    torch_varlen_available,
)
from model_pairs import TINY, source_and_packed

P = TINY["patch_size"]
ATOL = 1e-5  # features are O(1); float32 reassociation between pack shapes stays well below this

grids = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))  # small ranges: equal shapes recur
EXTREME_GRIDS = [(1, 1, 1), (1, 1, 64), (1, 64, 1), (16, 1, 1), (16, 1, 64), (16, 3, 2)]
seeds = st.integers(0, 2**16)


def packs(min_size: int = 1) -> st.SearchStrategy:
    """Lists of ``(grid, seed)`` samples: mixed shapes, or all of one shape (one batched SDPA call)."""
    mixed = st.lists(st.tuples(grids, seeds), min_size=min_size, max_size=5)
    same = grids.flatmap(lambda grid: st.lists(st.tuples(st.just(grid), seeds), min_size=max(min_size, 2), max_size=4))
    return st.one_of(mixed, same)


@pytest.fixture(scope="module")
def models():
    return source_and_packed(seed=3)


def pixels(grid: tuple[int, int, int], seed: int) -> torch.Tensor:
    t, h, w = grid
    return torch.randn(3, t, h * P, w * P, generator=torch.Generator().manual_seed(seed))


def interpolated_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = grid
    slots = interpolate_frame_indices(torch.arange(t)[None], t)
    return compute_patch_positions_with_interpolated_temporal(slots, h, w)


@torch.no_grad()
def encode(model, batch: list[tuple[tuple[int, int, int], int]], interpolated: bool = False):
    """Pack ``batch`` (grid, seed) into one call; per sample ``(tokens, pooled)``."""
    grid_thw = torch.tensor([grid for grid, _ in batch])
    hidden_states = torch.cat([patchify(pixels(grid, seed), P) for grid, seed in batch])
    positions = torch.cat([interpolated_positions(grid) for grid, _ in batch]) if interpolated else None
    out = model(hidden_states, grid_thw, positions)
    lengths = [math.prod(grid) for grid, _ in batch]
    return list(zip(out.last_hidden_state.split(lengths), out.pooler_output))


@torch.no_grad()
def encode_with_source(source, grid: tuple[int, int, int], seed: int, interpolated: bool = False):
    """The unpacked source model on one sample: a (1, C, T, H, W) clip, or (1, C, H, W) image."""
    px = pixels(grid, seed)[None]
    px = px[:, :, 0] if grid[0] == 1 else px
    positions = interpolated_positions(grid)[None] if interpolated else None
    out = source(px, patch_positions=positions)
    return out["visible_embeddings"][0], out["head_output"][0]


def assert_same_sample(actual, expected, atol: float = ATOL):
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=atol)
    torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=atol)


_CUDA = pytest.mark.cuda
BACKEND_RUNS = [  # (attn_implementation, device, dtype); half precision is compared by cosine
    pytest.param("sdpa", "cpu", torch.float32, id="sdpa-cpu-float32"),
    pytest.param("sdpa", "cuda", torch.float32, marks=_CUDA, id="sdpa-cuda-float32"),
    pytest.param("sdpa", "cuda", torch.bfloat16, marks=_CUDA, id="sdpa-cuda-bfloat16"),
    pytest.param("varlen", "cuda", torch.bfloat16, id="varlen-cuda-bfloat16", marks=[
        _CUDA, pytest.mark.skipif(not torch_varlen_available(), reason="needs torch.nn.attention.varlen (PyTorch >= 2.10)")]),
    pytest.param("flash_attention_2", "cuda", torch.bfloat16, id="flash_attention_2-cuda-bfloat16", marks=[
        _CUDA, pytest.mark.skipif(not flash_attn_available(), reason="needs the flash-attn package")]),
    pytest.param("flash_attention_4", "cuda", torch.bfloat16, id="flash_attention_4-cuda-bfloat16", marks=[
        _CUDA, pytest.mark.skipif(not flash_attn4_available(), reason="needs the flash-attn-4 package"),
        pytest.mark.skipif(
            flash_attn4_available() and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] not in FLASH_ATTN4_CAPABILITY_MAJORS,
            reason="flash-attn-4 needs a GPU of compute capability 9.x or 10.x")]),
]
HALF_MIN_COS = 0.999


@pytest.fixture(scope="module")
def device_models(models):
    """The packed model moved to each ``(device, dtype)``, made once."""
    made = {}

    def get(device: str, dtype: torch.dtype):
        if (device, dtype) not in made:
            made[device, dtype] = copy.deepcopy(models[1]).to(device, dtype)
        return made[device, dtype]

    return get


@settings(max_examples=25, deadline=None)
@given(batch=packs(), data=st.data())
def test_any_grouping_and_order_gives_each_sample_its_output_alone(models, batch, data):
    _, packed = models
    alone = [encode(packed, [sample])[0] for sample in batch]
    order = data.draw(st.permutations(range(len(batch))), label="order")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(batch) - 1)), label="cuts")) if len(batch) > 1 else []
    for group in (order[a:b] for a, b in zip([0, *cuts], [*cuts, len(batch)])):
        for i, result in zip(group, encode(packed, [batch[i] for i in group])):
            assert_same_sample(result, alone[i])


@settings(max_examples=10, deadline=None)
@given(batch=packs(), interpolated=st.booleans())
def test_same_input_twice_is_bit_identical(models, batch, interpolated):
    _, packed = models
    for first, second in zip(encode(packed, batch, interpolated), encode(packed, batch, interpolated)):
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("backend, device, dtype", BACKEND_RUNS)
@settings(max_examples=15, deadline=None)
@given(batch=packs(), interpolated=st.booleans())
def test_every_backend_equals_the_source_model(models, device_models, backend, device, dtype, batch, interpolated):
    source, _ = models
    packed = device_models(device, dtype)
    packed.config._attn_implementation = backend
    try:
        results = encode(packed, batch, interpolated)
    finally:
        packed.config._attn_implementation = "auto"
    for (grid, seed), (tokens, pooled) in zip(batch, results):
        expected = encode_with_source(source, grid, seed, interpolated)
        actual = tokens.float().cpu(), pooled.float().cpu()
        if dtype == torch.float32:
            assert_same_sample(actual, expected, atol=2 * ATOL if device == "cpu" else 1e-4)
        else:
            assert F.cosine_similarity(actual[0], expected[0], dim=-1).min() >= HALF_MIN_COS
            assert F.cosine_similarity(actual[1], expected[1], dim=0) >= HALF_MIN_COS


@pytest.mark.parametrize("extreme", EXTREME_GRIDS, ids=lambda g: "x".join(map(str, g)))
@settings(max_examples=3, deadline=None)
@given(seed=seeds, others=st.lists(st.tuples(grids, seeds), max_size=2), position=st.integers(0, 2))
def test_extreme_grids_in_a_pack_equal_the_source_model(models, extreme, seed, others, position):
    source, packed = models
    batch = others[:position] + [(extreme, seed)] + others[position:]
    for (grid, sample_seed), result in zip(batch, encode(packed, batch)):
        assert_same_sample(result, encode_with_source(source, grid, sample_seed), atol=2 * ATOL)


@settings(max_examples=15, deadline=None)
@given(
    batch=packs(min_size=2),
    data=st.data(),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_non_finite_pixels_stay_inside_their_sample(models, batch, data, value):
    _, packed = models
    bad = data.draw(st.integers(0, len(batch) - 1), label="bad sample")
    lengths = [math.prod(grid) for grid, _ in batch]
    hidden_states = torch.cat([patchify(pixels(grid, seed), P) for grid, seed in batch])
    row = sum(lengths[:bad]) + data.draw(st.integers(0, lengths[bad] - 1), label="token")
    column = data.draw(st.integers(0, hidden_states.shape[1] - 1), label="channel")
    poisoned = hidden_states.clone()
    poisoned[row, column] = value
    grid_thw = torch.tensor([grid for grid, _ in batch])
    with torch.no_grad():
        clean, dirty = packed(hidden_states, grid_thw), packed(poisoned, grid_thw)
    for i, (tokens, clean_tokens) in enumerate(
        zip(dirty.last_hidden_state.split(lengths), clean.last_hidden_state.split(lengths))
    ):
        if i == bad:
            assert tokens.isnan().all() and dirty.pooler_output[i].isnan().all()
        else:
            assert torch.equal(tokens, clean_tokens) and torch.equal(dirty.pooler_output[i], clean.pooler_output[i])
