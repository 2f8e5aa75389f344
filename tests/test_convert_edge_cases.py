"""convert_checkpoint corner cases: a given head count wins over a guess, and nothing is silently changed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import GOLDEN_DIR
from llava_vit import LlavaViT, LlavaViTPackingConfig, LlavaViTPackingModel, source_config
from llava_vit.convert.checkpoint import ConversionError, convert_checkpoint
from model_pairs import TINY


def test_given_head_count_wins_over_the_variant_guess(tmp_path):
    """The small variant's shapes with 12 heads instead of 6: the shapes cannot tell, the config can."""
    source = LlavaViT(source_config("llava_vit_small_ln", num_attention_heads=12))
    torch.save({"model": source.state_dict()}, tmp_path / "ck.pt")
    assert convert_checkpoint(tmp_path / "ck.pt").config.num_attention_heads == 6  # the guess
    config = LlavaViTPackingConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                   num_attention_heads=12, patch_size=16)
    assert convert_checkpoint(tmp_path / "ck.pt", config=config).config.num_attention_heads == 12


def test_hf_folder_with_an_unsupported_activation_is_refused(tmp_path):
    folder = tmp_path / "ov"
    shutil.copytree(GOLDEN_DIR / "ovtiny_hf", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu_pytorch_tanh"}))
    with pytest.raises(ValueError, match="hidden_act must be 'gelu'"):
        convert_checkpoint(folder)


def test_packed_folder_is_not_reconverted(tmp_path):
    LlavaViTPackingModel(LlavaViTPackingConfig(**TINY, head_norm_eps=None)).save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="already in the packed layout"):
        convert_checkpoint(tmp_path)


def test_hf_temporal_context_reaches_the_processor_config(tmp_path):
    from llava_vit.cli import main

    folder = tmp_path / "ov"
    shutil.copytree(GOLDEN_DIR / "ovtiny_hf", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_temporal_size": 16}))
    assert main(["convert", str(folder), "--output-dir", str(tmp_path / "out"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["temporal_context"] == 16


def test_public_import_path_of_the_converter():
    """``from llava_vit.convert import convert_checkpoint`` is part of the public API."""
    from llava_vit.convert import convert_checkpoint as public
    from llava_vit.convert.checkpoint import convert_checkpoint as library

    assert public is library and public.__module__ == "llava_vit.convert.checkpoint"
