"""Round trips through save_pretrained/from_pretrained, the Auto classes, and the documented variant table."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import AutoConfig, AutoModel

import llava_vit
from llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel
from llava_vit.model.variants import PACKING_MODEL_NAMES, SOURCE_MODEL_NAMES
from model_pairs import TINY, randomize_


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = LlavaViTPackingModel(LlavaViTPackingConfig(**TINY, layer_norm_eps=1e-5, head_norm_eps=None)).eval()
    randomize_(model, 3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = LlavaViTPackingModel.from_pretrained(tmp_path).eval()
    assert loaded.config.layer_norm_eps == 1e-5 and loaded.config.head_norm_eps is None
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    grid = torch.tensor([[2, 3, 4], [1, 5, 2]])
    hs = torch.randn(34, model.config.patch_dim)
    with torch.no_grad():
        assert torch.equal(model(hs, grid).last_hidden_state, loaded(hs, grid).last_hidden_state)


@pytest.mark.parametrize("kwarg", ["torch_dtype", "dtype"])
def test_from_pretrained_honours_dtype(tmp_path, kwarg):
    LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).save_pretrained(tmp_path)
    loaded = LlavaViTPackingModel.from_pretrained(tmp_path, **{kwarg: torch.bfloat16})
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    out = loaded(torch.randn(16, loaded.config.patch_dim), torch.tensor([[1, 4, 4]]))
    assert out.last_hidden_state.dtype == torch.bfloat16


def test_auto_classes(tmp_path):
    LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LlavaViTPackingConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), LlavaViTPackingModel)
    hf = llava_vit.LlavaViTModel(llava_vit.LlavaViTConfig(**TINY))
    hf.save_pretrained(tmp_path / "twin")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "twin"), llava_vit.LlavaViTModel)


def test_onevision_encoder_folder_loads_with_auto_model():
    from conftest import GOLDEN_DIR

    model = AutoModel.from_pretrained(GOLDEN_DIR / "ovtiny_hf")
    assert isinstance(model, llava_vit.OneVisionEncoderModel)


DOCUMENTED_VARIANTS = {  # size: (hidden, layers, heads, head dim, MLP, patch), as in docs/ARCHITECTURE.md
    "small": (384, 6, 6, 64, 1536, 16),
    "base": (768, 12, 12, 64, 3072, 16),
    "large": (1024, 24, 16, 64, 4096, 14),
    "huge": (1280, 32, 20, 64, 5120, 14),
    "giant": (1536, 40, 16, 96, 6144, 14),
}


def test_variant_names_are_the_documented_ones():
    sizes = set(DOCUMENTED_VARIANTS)
    assert set(PACKING_MODEL_NAMES) == {f"hf_llava_vit_packing_{size}_ln" for size in sizes}
    assert set(SOURCE_MODEL_NAMES) == {f"llava_vit_{size}_ln" for size in sizes} | {"llava_vit_base_rms"}
    assert set(timm.list_models("*llava_vit*")) == set(PACKING_MODEL_NAMES) | set(SOURCE_MODEL_NAMES)


@pytest.mark.parametrize("name", sorted(PACKING_MODEL_NAMES))
def test_packing_variants_have_the_documented_shapes(name):
    hidden, layers, heads, head_dim, mlp, patch = DOCUMENTED_VARIANTS[name.removeprefix("hf_llava_vit_packing_").removesuffix("_ln")]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert isinstance(model, LlavaViTPackingModel)
    assert model.patch_embed.proj.weight.shape == (hidden, 3, patch, patch)
    assert len(model.encoder.layers) == layers
    layer = model.encoder.layers[0]
    assert layer.self_attn.qkv.weight.shape == (3 * hidden, hidden)
    assert layer.mlp.fc1.weight.shape == (mlp, hidden)
    assert (layer.self_attn.num_heads, layer.self_attn.head_dim) == (heads, head_dim)


@pytest.mark.parametrize("name", sorted(SOURCE_MODEL_NAMES))
def test_source_variants_have_the_documented_shapes_and_source_epsilons(name):
    size, norm = name.removeprefix("llava_vit_").rsplit("_", 1)
    hidden, layers, heads, head_dim, mlp, patch = DOCUMENTED_VARIANTS[size]
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.conv1.weight.shape == (hidden, 3, patch, patch)
    assert len(model.transformer.layers) == layers
    assert model.transformer.layers[0].mlp[0].weight.shape == (mlp, hidden)
    assert model.transformer.layers[0].attn.num_heads == heads and hidden // heads == head_dim
    assert model.head.norm.eps is None
    pre = model.ln_pre
    if norm == "ln":
        assert isinstance(pre, torch.nn.LayerNorm) and pre.eps == 1e-5
    else:
        assert isinstance(pre, torch.nn.RMSNorm) and pre.eps is None


def test_auto_registration_leaves_a_model_type_it_does_not_own():
    """A model_type transformers (or remote code) already owns keeps its classes; ours is skipped."""
    from transformers import ViTConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from llava_vit.model.variants import register_auto_classes

    class ClashingConfig(llava_vit.LlavaViTConfig):
        model_type = "vit"

    assert register_auto_classes(ClashingConfig, llava_vit.LlavaViTModel) is False
    assert CONFIG_MAPPING["vit"] is ViTConfig
    assert register_auto_classes(LlavaViTPackingConfig, LlavaViTPackingModel) is True  # ours: re-registered
    assert CONFIG_MAPPING["llava_vit_packing"] is LlavaViTPackingConfig


def test_pretrained_true_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="no weights are bundled"):
        timm.create_model("llava_vit_small_ln", pretrained=True)


def test_small_variant_runs_end_to_end():
    model = timm.create_model("hf_llava_vit_packing_small_ln").eval()
    with torch.no_grad():
        out = model(torch.randn(196 + 32, 768), torch.tensor([[1, 14, 14], [2, 4, 4]]))
    assert out.last_hidden_state.shape == (228, 384) and out.pooler_output.shape == (2, 384)
    assert torch.isfinite(out.last_hidden_state).all()


def test_timm_factory_refuses_unknown_keyword_arguments():
    with pytest.raises(TypeError, match="unknown keyword arguments \\['drop_path_rate'\\]"):
        timm.create_model("hf_llava_vit_packing_small_ln", drop_path_rate=0.1)
    assert len(timm.create_model("llava_vit_small_ln", num_hidden_layers=2).transformer.layers) == 2


def test_config_refuses_dropout_it_does_not_implement():
    with pytest.raises(ValueError, match="attention_dropout must be 0.0"):
        LlavaViTPackingConfig(**TINY, attention_dropout=0.1)
