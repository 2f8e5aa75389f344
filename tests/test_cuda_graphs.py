"""The forward split into prepare + encode, and the encode step replayed as a CUDA graph
(the CUDA tests skip on machines without a CUDA GPU)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from llava_vit.model.cuda_graphs import CUDAGraphEncoder
from model_pairs import IMAGE_AND_VIDEO_GRID, TINY, image_and_video, pack_image_and_video, source_and_packed

P = TINY["patch_size"]
PACKS = {  # name: grid_thw; 224x224 images at the tiny model's patch size 8
    "one image": torch.tensor([[1, 28, 28]]),
    "two images": torch.tensor([[1, 28, 28], [1, 14, 21]]),
}
MIN_COSINE = 0.9999


def report(name: str, value: float) -> None:
    print(f"[cuda figure] {name}: {value:.6f}")


@torch.no_grad()
def test_prepare_then_encode_is_the_forward():
    _, model = source_and_packed(seed=71)
    hidden_states, grid, positions = pack_image_and_video(*image_and_video(seed=72))
    pack = model.prepare(grid, positions)
    assert pack.seq_len == hidden_states.shape[0] == int(IMAGE_AND_VIDEO_GRID.prod(-1).sum())
    out = model.encode(hidden_states, pack, output_hidden_states=True)
    reference = model(hidden_states, grid, positions, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(out.pooler_output, reference.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, reference.hidden_states, strict=True))


def test_cuda_graph_encoder_needs_a_cuda_model():
    _, model = source_and_packed(seed=73)
    with pytest.raises(ValueError, match=r"CUDAGraphEncoder needs a model on a CUDA device .* this model is on cpu"):
        CUDAGraphEncoder(model, PACKS["one image"])


def cuda_model(implementation: str) -> torch.nn.Module:
    _, model = source_and_packed(seed=74)
    model.config._attn_implementation = implementation
    return model.to("cuda", torch.bfloat16)


def min_cosine(out, reference) -> float:
    return min(
        F.cosine_similarity(out.last_hidden_state.float(), reference.last_hidden_state.float(), dim=-1).min().item(),
        F.cosine_similarity(out.pooler_output.float(), reference.pooler_output.float(), dim=-1).min().item(),
    )


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("pack", PACKS)
@pytest.mark.parametrize("implementation", ["auto", "sdpa"])
def test_cuda_graph_matches_the_eager_forward(implementation, pack):
    model, grid = cuda_model(implementation), PACKS[pack]
    seq_len = int(grid.prod(-1).sum())
    first = torch.randn(seq_len, model.config.patch_dim, device="cuda")
    model(first, grid)  # "auto" decides a pack shape's backend at its first sight: the graph and the eager reference then agree
    encoder = CUDAGraphEncoder(model, grid)
    assert encoder.input_shape == (seq_len, model.config.patch_dim)

    out = encoder(first)
    cosine = min_cosine(out, model(first, grid))
    report(f"CUDA graph vs eager, {pack}, {implementation} ({encoder.pack.backend}) bf16 min cosine", cosine)
    assert cosine >= MIN_COSINE
    kept = out.last_hidden_state.clone()

    second = torch.randn(seq_len, model.config.patch_dim)  # new pixels, on the CPU this time
    again = encoder(second)
    assert min_cosine(again, model(second, grid)) >= MIN_COSINE
    assert again.last_hidden_state.data_ptr() == out.last_hidden_state.data_ptr()  # the static outputs, overwritten
    assert not torch.equal(again.last_hidden_state, kept)


@pytest.mark.cuda
def test_cuda_graph_works_under_inference_mode_and_with_grad_enabled():
    model, grid = cuda_model("auto"), PACKS["two images"]
    hidden_states = torch.randn(int(grid.prod(-1).sum()), model.config.patch_dim, device="cuda")
    with torch.inference_mode():
        encoder = CUDAGraphEncoder(model, grid)
        inside = encoder(hidden_states).pooler_output.clone()
    outside = encoder(hidden_states.requires_grad_()).pooler_output
    assert not outside.requires_grad
    assert torch.equal(inside, outside)


@pytest.mark.cuda
def test_cuda_graph_rejects_another_input_shape():
    model, grid = cuda_model("auto"), PACKS["one image"]
    encoder = CUDAGraphEncoder(model, grid)
    wrong = torch.randn(28 * 27, model.config.patch_dim, device="cuda")
    expected = f"captured for, (seq_len, patch_dim) = (784, {model.config.patch_dim}); got (756, {model.config.patch_dim})"
    with pytest.raises(ValueError, match=re.escape(expected)):
        encoder(wrong)
