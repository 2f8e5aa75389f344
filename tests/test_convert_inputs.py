"""Every checkpoint form the converter reads gives a packed model equal to its source model.

timm-source files: RMSNorm weights, ``{"model": ...}`` / ``{"state_dict": ...}`` / bare state
dicts, ``.safetensors``, no pooling head; HF folders: ``pytorch_model.bin`` and a sharded
``pytorch_model.bin.index.json``. Each is checked on an image and a video in one pack.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llava_vit import LlavaViT, LlavaViTConfig, LlavaViTModel, LlavaViTPackingConfig
from llava_vit.convert.checkpoint import convert_checkpoint
from llava_vit.model.variants import SOURCE_EPS
from llava_vit.reference import video_in_context
from model_pairs import TINY, image_and_video, pack_image_and_video, randomize_

P = TINY["patch_size"]
TOL = 2e-5


@torch.no_grad()
def assert_packed_equals_source(packed, source) -> None:
    """An image and a 4-frame clip in the 64-frame context, packed, against the source run on each."""
    image, clip, slots = image_and_video(seed=5)
    hidden_states, grid_thw, positions = pack_image_and_video(image, clip, slots)
    out = packed(hidden_states, grid_thw, positions)
    n_image = int(grid_thw[0].prod())
    if isinstance(source, LlavaViT):
        padded, visible = video_in_context(clip, slots, P)
        refs = [source(image), source(padded, visible_indices=visible)]
        refs = [(r["visible_embeddings"][0], r.get("head_output")) for r in refs]
    else:
        refs = [source(image), source(clip, patch_positions=positions[n_image:][None])]
        refs = [(r.last_hidden_state[0], r.pooler_output) for r in refs]
    torch.testing.assert_close(out.last_hidden_state, torch.cat([tokens for tokens, _ in refs]), rtol=0, atol=TOL)
    if source.config.use_head:
        torch.testing.assert_close(out.pooler_output, torch.cat([pooled for _, pooled in refs]), rtol=0, atol=TOL)
    else:
        assert out.pooler_output is None and packed.head is None


def timm_source(norm: str = "layer_norm", **arch) -> LlavaViT:
    source = LlavaViT(LlavaViTConfig(**{**TINY, **arch}, **SOURCE_EPS[norm])).eval()
    randomize_(source, 7)
    return source


def packing_config(norm: str = "layer_norm", **arch) -> LlavaViTPackingConfig:
    """The head count the tiny shapes cannot tell (they match no named variant)."""
    return LlavaViTPackingConfig(**{**TINY, **arch}, **SOURCE_EPS[norm])


@pytest.mark.parametrize("form", ["model", "state_dict", "bare", "safetensors"])
def test_timm_source_file_forms(form, tmp_path):
    source = timm_source()
    state = source.state_dict()
    if form == "safetensors":
        path = tmp_path / "backbone.safetensors"
        save_file(state, path)
    else:
        path = tmp_path / "backbone.pt"
        torch.save(state if form == "bare" else {form: state, "epoch": 3}, path)
    packed = convert_checkpoint(path, config=packing_config())
    assert_packed_equals_source(packed, source)


def test_rms_norm_source_keeps_machine_epsilon(tmp_path):
    source = timm_source("rms_norm")
    torch.save({"model": source.state_dict()}, tmp_path / "rms.pt")
    packed = convert_checkpoint(tmp_path / "rms.pt", config=packing_config("rms_norm"))
    assert packed.config.layer_norm_type == "rms_norm"
    assert isinstance(packed.layernorm_pre, torch.nn.RMSNorm) and packed.layernorm_pre.eps is None
    assert packed.config.layer_norm_eps is None and packed.config.head_norm_eps is None
    assert_packed_equals_source(packed, source)


def test_source_without_pooling_head(tmp_path):
    source = timm_source(use_head=False)
    torch.save({"model": source.state_dict()}, tmp_path / "headless.pt")
    packed = convert_checkpoint(tmp_path / "headless.pt", config=packing_config(use_head=False))
    assert packed.config.use_head is False
    assert_packed_equals_source(packed, source)
    assert not any(name.startswith("head.") for name in packed.state_dict())


def hf_folder(tmp_path, sharded: bool) -> tuple:
    """An HF-layout folder with ``pytorch_model.bin`` weights, or two ``.bin`` shards and their index."""
    model = LlavaViTModel(LlavaViTConfig(**TINY, layer_norm_eps=1e-6)).eval()
    randomize_(model, 9)
    folder = tmp_path / ("sharded" if sharded else "single")
    model.config.save_pretrained(folder)
    state = model.state_dict()
    if not sharded:
        torch.save(state, folder / "pytorch_model.bin")
        return folder, model
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, model


@pytest.mark.parametrize("sharded", [False, True], ids=["pytorch_model.bin", "sharded-bin-index"])
def test_hf_folder_with_bin_weights(sharded, tmp_path):
    folder, source = hf_folder(tmp_path, sharded)
    packed = convert_checkpoint(folder)
    assert (packed.config.num_attention_heads, packed.config.layer_norm_eps) == (TINY["num_attention_heads"], 1e-6)
    assert_packed_equals_source(packed, source)
