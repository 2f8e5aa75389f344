"""Converted checkpoints reproduce the original implementation's outputs (tests/data/golden), float32 CPU."""

from __future__ import annotations

import pytest
import torch

from golden_cases import SET_NAMES, architecture_config, load_cases, pack, source_path
from llava_vit.convert.checkpoint import build_source_model, convert_checkpoint

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


def test_video_context_recipe_gives_the_golden_visible_indices():
    """``video_in_context`` builds the source's video input exactly as the original implementation did."""
    from safetensors.torch import load_file

    from conftest import GOLDEN_DIR
    from golden_cases import MANIFEST
    from llava_vit.reference import video_in_context

    checked = 0
    for set_name, entry in MANIFEST.items():
        for case in entry["cases"]:
            d = load_file(str(GOLDEN_DIR / case["file"]))
            if "visible_indices" not in d:
                continue
            patch = architecture_config(set_name).patch_size
            padded, visible = video_in_context(d["video"], d["interpolated_indices"], patch)
            assert torch.equal(visible, d["visible_indices"]), case["id"]
            slots = d["interpolated_indices"][0]
            assert torch.equal(padded[:, :, slots], d["video"])
            others = torch.ones(64, dtype=torch.bool)
            others[slots] = False
            assert padded.shape[2] == 64 and not padded[:, :, others].any()
            checked += 1
    assert checked >= 2


@torch.no_grad()
def test_wrong_epsilon_is_detected():
    """The low-variance sets exist to catch a wrong norm epsilon: with the HF default it must fail."""
    from llava_vit import LlavaViTPackingConfig
    from llava_vit.convert.checkpoint import read_checkpoint, to_packing_state_dict

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
