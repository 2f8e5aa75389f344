"""Every bad input raises the documented exception, naming the argument, before any kernel runs.

Each case here is a row of the table in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from llava_vit import (
    LlavaViTPackingConfig,
    LlavaViTPackingModel,
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)
from model_pairs import TINY

PATCH_DIM = 3 * TINY["patch_size"] ** 2
GRID = torch.tensor([[1, 2, 2], [2, 1, 3]])  # 4 + 6 = 10 patches
SEQ_LEN = 10


def with_value(tensor: torch.Tensor, index: tuple, value) -> torch.Tensor:
    out = tensor.clone()
    out[index] = value
    return out


FORWARD_CASES = {  # name: (inputs replacing the valid ones, exception, message fragment)
    "hidden_states not a tensor": (
        dict(hidden_states=[[0.0] * PATCH_DIM] * SEQ_LEN), TypeError, "hidden_states must be a torch.Tensor of shape (seq_len, 192), got list"),
    "hidden_states integer": (
        dict(hidden_states=torch.zeros(SEQ_LEN, PATCH_DIM, dtype=torch.uint8)), TypeError,
        "hidden_states must be a floating-point tensor, got dtype torch.uint8"),
    "hidden_states 1-D": (
        dict(hidden_states=torch.zeros(SEQ_LEN * PATCH_DIM)), ValueError,
        "hidden_states must have shape (seq_len, patch_dim=192) (flattened C*p*p patches), got (1920,)"),
    "hidden_states batched (1, seq_len, patch_dim)": (
        dict(hidden_states=torch.zeros(1, SEQ_LEN, PATCH_DIM)), ValueError, "patch_dim=192) (flattened C*p*p patches), got (1, 10, 192)"),
    "hidden_states wrong patch_dim": (
        dict(hidden_states=torch.zeros(SEQ_LEN, 3 * 14 * 14)), ValueError, "patch_dim=192) (flattened C*p*p patches), got (10, 588)"),
    "hidden_states on another device": (
        dict(hidden_states=torch.zeros(SEQ_LEN, PATCH_DIM, device="meta")), ValueError,
        "hidden_states is on meta; expected the model's device (cpu) or the CPU"),
    "grid_thw not a tensor": (
        dict(grid_thw=GRID.tolist()), TypeError, "grid_thw must be an integer torch.Tensor of shape (num_samples, 3), got list"),
    "grid_thw float": (dict(grid_thw=GRID.float()), TypeError, "grid_thw must be an integer torch.Tensor of shape (num_samples, 3), got dtype torch.float32"),
    "grid_thw bool": (dict(grid_thw=GRID.bool()), TypeError, "grid_thw must be an integer torch.Tensor of shape (num_samples, 3), got dtype torch.bool"),
    "grid_thw 1-D": (dict(grid_thw=GRID[0]), ValueError, "grid_thw must have shape (num_samples, 3) (one [t, h, w] row per sample), got (3,)"),
    "grid_thw (N, 2)": (dict(grid_thw=torch.tensor([[2, 2], [2, 3]])), ValueError, "grid_thw must have shape (num_samples, 3)"),
    "grid_thw zero entry": (
        dict(grid_thw=with_value(GRID, (1, 0), 0)), ValueError, "grid_thw entries [t, h, w] must be positive integers, got grid_thw[1] = [0, 1, 3]"),
    "grid_thw negative pair (t*h*w still adds up)": (
        dict(grid_thw=torch.tensor([[1, -2, -2], [2, 1, 3]])), ValueError, "got grid_thw[0] = [1, -2, -2]"),
    "grid_thw sum(t*h*w) != seq_len": (
        dict(grid_thw=torch.tensor([[1, 2, 2], [2, 1, 2]])), ValueError,
        "grid_thw describes sum(t*h*w) = 8 patches but hidden_states has seq_len = 10"),
    "grid_thw on another device": (dict(grid_thw=GRID.to("meta")), ValueError, "grid_thw is on meta; expected the model's device (cpu)"),
    "empty batch": (
        dict(hidden_states=torch.zeros(0, PATCH_DIM), grid_thw=torch.zeros(0, 3, dtype=torch.long)), ValueError,
        "grid_thw has shape (0, 3): the batch is empty"),
    "patch_positions not a tensor": (
        dict(patch_positions=[[0, 0, 0]] * SEQ_LEN), TypeError, "patch_positions must be an integer torch.Tensor of shape (seq_len=10, 3), got list"),
    "patch_positions float": (
        dict(patch_positions=torch.zeros(SEQ_LEN, 3)), TypeError, "patch_positions must be an integer torch.Tensor of shape (seq_len=10, 3), got dtype torch.float32"),
    "patch_positions too short": (
        dict(patch_positions=torch.zeros(SEQ_LEN - 1, 3, dtype=torch.long)), ValueError,
        "patch_positions must have shape (seq_len=10, 3) (one [t, h, w] per patch), got (9, 3)"),
    "patch_positions (seq_len, 2)": (
        dict(patch_positions=torch.zeros(SEQ_LEN, 2, dtype=torch.long)), ValueError, "patch_positions must have shape (seq_len=10, 3)"),
    "patch_positions negative (CPU)": (
        dict(patch_positions=with_value(torch.zeros(SEQ_LEN, 3, dtype=torch.long), (7, 0), -1)), ValueError,
        "patch_positions must be non-negative, got patch_positions[7, 0] = -1"),
    "patch_positions on another device": (
        dict(patch_positions=torch.zeros(SEQ_LEN, 3, dtype=torch.long, device="meta")), ValueError,
        "patch_positions is on meta; expected the model's device (cpu)"),
}


@pytest.fixture(scope="module")
def model() -> LlavaViTPackingModel:
    return LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).eval()


def valid_inputs() -> dict:
    return dict(hidden_states=torch.randn(SEQ_LEN, PATCH_DIM), grid_thw=GRID, patch_positions=None)


@contextlib.contextmanager
def patch_embed_calls(model: LlavaViTPackingModel):
    """Record every call of the first kernel of the forward, the patch embedding."""
    calls: list[int] = []
    handle = model.patch_embed.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_valid_inputs_reach_the_kernels(model):
    with patch_embed_calls(model) as calls, torch.no_grad():
        model(**valid_inputs())
    assert calls == [1]


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_rejects_before_any_kernel(model, name):
    replaced, exception, fragment = FORWARD_CASES[name]
    with patch_embed_calls(model) as calls, pytest.raises(exception, match=re.escape(fragment)):
        model(**{**valid_inputs(), **replaced})
    assert not calls


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_any_integer_grid_and_positions_dtype_gives_the_same_output(model, dtype):
    inputs = valid_inputs()
    positions = compute_patch_positions_from_grid_thw(GRID)
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        out = model(inputs["hidden_states"], GRID.to(dtype), positions.to(dtype)).last_hidden_state
    assert torch.equal(out, reference)


def test_cpu_inputs_are_copied_to_the_model_device():
    """The device policy's other half: a model elsewhere (here: meta) takes CPU tensors."""
    with torch.device("meta"):
        model = LlavaViTPackingModel(LlavaViTPackingConfig(**TINY))
    positions = compute_patch_positions_from_grid_thw(GRID)
    out = model(torch.randn(SEQ_LEN, PATCH_DIM), GRID, positions)
    assert out.last_hidden_state.device.type == "meta" and out.last_hidden_state.shape == (SEQ_LEN, TINY["hidden_size"])


HELPER_CASES = {  # name: (call, exception, message fragment)
    "grid_thw helper: list": (
        lambda: compute_patch_positions_from_grid_thw([[1, 2, 2]]), TypeError, "grid_thw must be an integer torch.Tensor"),
    "grid_thw helper: float": (
        lambda: compute_patch_positions_from_grid_thw(GRID.float()), TypeError, "grid_thw must be an integer torch.Tensor of shape (num_samples, 3), got dtype torch.float32"),
    "grid_thw helper: (3,)": (
        lambda: compute_patch_positions_from_grid_thw(GRID[0]), ValueError, "grid_thw must have shape (num_samples, 3)"),
    "grid_thw helper: zero entry": (
        lambda: compute_patch_positions_from_grid_thw(torch.tensor([[1, 2, 2], [1, 0, 3]])), ValueError, "got grid_thw[1] = [1, 0, 3]"),
    "grid_thw helper: negative entry": (
        lambda: compute_patch_positions_from_grid_thw(torch.tensor([[-1, 2, 2]])), ValueError, "got grid_thw[0] = [-1, 2, 2]"),
    "frame_indices: list": (
        lambda: interpolate_frame_indices([[0, 1]], torch.tensor([2])), TypeError, "frame_indices must be an integer torch.Tensor [B, num_frames], got list"),
    "frame_indices: float": (
        lambda: interpolate_frame_indices(torch.zeros(1, 2), torch.tensor([2])), TypeError, "frame_indices must be an integer torch.Tensor [B, num_frames], got dtype torch.float32"),
    "frame_indices: 1-D": (
        lambda: interpolate_frame_indices(torch.arange(8), torch.tensor([8])), ValueError, "frame_indices must be 2-D [B, num_frames], got shape (8,)"),
    "frame_indices: index >= total_frames": (
        lambda: interpolate_frame_indices(torch.arange(9)[None], torch.tensor([8])), ValueError,
        "frame_indices must lie in [0, total_frames - 1] (total_frames = [8]), got values from 0 to 8"),
    "frame_indices: negative": (
        lambda: interpolate_frame_indices(torch.tensor([[-1, 0]]), 2), ValueError, "frame_indices must lie in [0, total_frames - 1]"),
    "total_frames: float tensor": (
        lambda: interpolate_frame_indices(torch.arange(8)[None], torch.tensor([8.0])), TypeError, "total_frames must be an integer torch.Tensor [B], got dtype torch.float32"),
    "total_frames: float": (
        lambda: interpolate_frame_indices(torch.arange(8)[None], 8.0), TypeError, "total_frames must be a positive integer, got float 8.0"),
    "total_frames: zero int": (
        lambda: interpolate_frame_indices(torch.zeros(1, 1, dtype=torch.long), 0), ValueError, "total_frames must be a positive integer, got 0"),
    "total_frames: zero in tensor": (
        lambda: interpolate_frame_indices(torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 0])), ValueError, "total_frames must be positive, got [1, 0]"),
    "total_frames: wrong count": (
        lambda: interpolate_frame_indices(torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1, 1])), ValueError,
        "total_frames must have one entry per row of frame_indices (2) or one in all, got 3"),
    "target_frames: zero": (
        lambda: interpolate_frame_indices(torch.arange(8)[None], 8, 0), ValueError, "target_frames must be a positive integer, got 0"),
    "target_frames: bool": (
        lambda: interpolate_frame_indices(torch.arange(8)[None], 8, True), TypeError, "target_frames must be a positive integer, got bool True"),
    "interpolated_indices: float": (
        lambda: compute_patch_positions_with_interpolated_temporal(torch.tensor([[0.0, 9.0]]), 2, 2), TypeError,
        "interpolated_indices must be an integer torch.Tensor [B, num_frames], got dtype torch.float32"),
    "interpolated_indices: 3-D": (
        lambda: compute_patch_positions_with_interpolated_temporal(torch.zeros(1, 1, 2, dtype=torch.long), 2, 2), ValueError,
        "interpolated_indices must be [B, num_frames] (or [num_frames]), got shape (1, 1, 2)"),
    "interpolated_indices: negative": (
        lambda: compute_patch_positions_with_interpolated_temporal([[0, -9]], 2, 2), ValueError,
        "interpolated_indices must be non-negative, got interpolated_indices[0, 1] = -9"),
    "h_patches: zero": (
        lambda: compute_patch_positions_with_interpolated_temporal([[0, 9]], 0, 2), ValueError, "h_patches must be a positive integer, got 0"),
    "w_patches: float": (
        lambda: compute_patch_positions_with_interpolated_temporal([[0, 9]], 2, 2.0), TypeError, "w_patches must be a positive integer, got float 2.0"),
}


@pytest.mark.parametrize("name", HELPER_CASES)
def test_position_helpers_reject(name):
    call, exception, fragment = HELPER_CASES[name]
    with pytest.raises(exception, match=re.escape(fragment)):
        call()


def test_position_helpers_accept_edge_values():
    assert compute_patch_positions_from_grid_thw(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
    assert interpolate_frame_indices(torch.tensor([[0, 7]]), 8).tolist() == [[0, 63]]
    assert compute_patch_positions_with_interpolated_temporal([0, 63], 1, 1).tolist() == [[0, 0, 0], [63, 0, 0]]


CONFIG_CASES = {  # name: (config arguments, message fragment); all raise ValueError
    "hidden_size not divisible by heads": (dict(hidden_size=1024, num_attention_heads=20), "hidden_size (1024) must be divisible by num_attention_heads (20)"),
    "head_dim the RoPE split cannot take": (
        dict(hidden_size=96, num_attention_heads=2), "head_dim = hidden_size / num_attention_heads = 96 / 2 = 48"),
    "hidden_size zero": (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    "unknown layer_norm_type": (dict(layer_norm_type="batch_norm"), "layer_norm_type must be 'layer_norm' or 'rms_norm'"),
    "LayerNorm with eps None": (dict(layer_norm_eps=None), "layer_norm_eps=None (machine epsilon) is only valid with layer_norm_type='rms_norm'"),
    "negative layer_norm_eps": (dict(layer_norm_eps=-1e-6), "layer_norm_eps must be a non-negative number or None"),
    "NaN head_norm_eps": (dict(head_norm_eps=float("nan")), "head_norm_eps must be a non-negative number or None"),
    "rope_theta zero": (dict(rope_theta=0), "rope_theta must be a positive number, got 0"),
    "approximate GELU": (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act must be 'gelu'"),
    "temporal_patch_size 2": (dict(temporal_patch_size=2), "temporal_patch_size must be 1"),
    "spatial_merge_size zero": (dict(spatial_merge_size=0), "spatial_merge_size must be a positive integer, got 0"),
}


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_config_rejects(name):
    kwargs, fragment = CONFIG_CASES[name]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        LlavaViTPackingConfig(**kwargs)


CONFIG_TYPE_CASES = {  # name: (config arguments, message fragment); all raise TypeError
    "patch_size a string": (dict(patch_size="14"), "patch_size must be a positive integer, got str '14'"),
    "num_hidden_layers float": (dict(num_hidden_layers=2.0), "num_hidden_layers must be a positive integer, got float 2.0"),
    "num_attention_heads bool": (dict(num_attention_heads=True), "num_attention_heads must be a positive integer, got bool True"),
    "spatial_merge_size float": (dict(spatial_merge_size=1.0), "spatial_merge_size must be a positive integer, got float 1.0"),
}


@pytest.mark.parametrize("name", CONFIG_TYPE_CASES)
def test_config_rejects_wrong_types(name):
    kwargs, fragment = CONFIG_TYPE_CASES[name]
    with pytest.raises(TypeError, match=re.escape(fragment)):
        LlavaViTPackingConfig(**kwargs)


def test_config_head_dim_error_names_valid_head_counts():
    with pytest.raises(ValueError, match=re.escape("num_attention_heads in [1, 2, 4, 8, 16, 32] for this hidden_size")):
        LlavaViTPackingConfig(hidden_size=1024, num_attention_heads=64)
