"""Converted checkpoints reproduce the original implementation's outputs (DESIGN §8), float32 CPU."""

from __future__ import annotations

import pytest
import torch

from golden_cases import SET_NAMES, architecture_config, load_cases, pack, source_path
from llava_vit.conversion.convert import build_source_model, convert_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module", params=SET_NAMES)
def golden_set(request):
    name = request.param
    model = convert_checkpoint(source_path(name), config=architecture_config(name))
    return name, model, load_cases(name, model.config.patch_size)


@torch.no_grad()
def test_each_case_alone(golden_set):
    _, model, cases = golden_set
    for case in cases:
        out = model(case.hidden_states, case.grid_thw, case.patch_positions)
        assert (out.last_hidden_state - case.last_hidden_state).abs().max() <= TOL, case.case_id
        assert (out.pooler_output - case.pooler_output).abs().max() <= TOL, case.case_id


@torch.no_grad()
def test_all_cases_packed_together(golden_set):
    _, model, cases = golden_set
    hidden_states, grid_thw, positions = pack(cases)
    out = model(hidden_states, grid_thw, positions)
    expected = torch.cat([c.last_hidden_state for c in cases])
    assert out.last_hidden_state.shape == expected.shape
    assert (out.last_hidden_state - expected).abs().max() <= TOL
    assert (out.pooler_output - torch.cat([c.pooler_output for c in cases])).abs().max() <= TOL


@torch.no_grad()
@pytest.mark.parametrize("name", SET_NAMES)
def test_source_model_reproduces_golden(name):
    """The project's own source models (timm layout and HF twin) match the original too."""
    model = build_source_model(source_path(name), config=architecture_config(name))
    for case in load_cases(name, model.config.patch_size):
        out = model(*case.source_args, **case.source_kwargs)
        if "visible_embeddings" in out:  # timm layout
            last, pooled = out["visible_embeddings"], out["head_output"]
        else:  # HF twin
            last, pooled = out.last_hidden_state, out.pooler_output
        assert (last[0] - case.last_hidden_state).abs().max() <= TOL, case.case_id
        assert (pooled - case.pooler_output).abs().max() <= TOL, case.case_id


@torch.no_grad()
def test_wrong_epsilon_is_detected():
    """The low-variance sets exist to catch a wrong norm epsilon: with the HF default it must fail."""
    from llava_vit import LlavaViTPackingConfig
    from llava_vit.conversion.convert import read_checkpoint, to_packing_state_dict

    state, layout, _ = read_checkpoint(source_path("tinylowvar"))
    arch = architecture_config("tinylowvar").to_dict()
    wrong = LlavaViTPackingConfig(**{k: arch[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "patch_size")}, layer_norm_eps=1e-6)
    from llava_vit import LlavaViTPackingModel

    model = LlavaViTPackingModel(wrong).eval()
    model.load_state_dict(to_packing_state_dict(state, layout))
    (case,) = load_cases("tinylowvar", 16)
    out = model(case.hidden_states, case.grid_thw)
    assert (out.pooler_output - case.pooler_output).abs().max() > TOL


@torch.no_grad()
@pytest.mark.parametrize("name", SET_NAMES)
def test_bfloat16_close_to_float32(name):
    model = convert_checkpoint(source_path(name), config=architecture_config(name))
    cases = load_cases(name, model.config.patch_size)
    hidden_states, grid_thw, positions = pack(cases)
    ref = model(hidden_states, grid_thw, positions)
    out = model.to(torch.bfloat16)(hidden_states, grid_thw, positions)
    cos = torch.nn.functional.cosine_similarity(out.last_hidden_state.float(), ref.last_hidden_state, dim=-1)
    assert cos.min() >= 0.999
    cos_pool = torch.nn.functional.cosine_similarity(out.pooler_output.float(), ref.pooler_output, dim=-1)
    assert cos_pool.min() >= 0.999
