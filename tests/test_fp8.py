"""Opt-in FP8: which linears are converted, every refusal at the boundary (these run on CPU without
torchao, faking the CUDA device where needed), and on an FP8-capable GPU the agreement with bf16."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel
from llava_vit.model.fp8 import INSTALL_HINT, LINEAR_KINDS, fp8_linear_names, quantize_fp8
from model_pairs import TINY, randomize_

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="needs torchao")
needs_fp8_gpu = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                   reason="needs CUDA capability 8.9+ (FP8 tensor cores)")


def layer_names(layer: int, kinds=tuple(LINEAR_KINDS)) -> list[str]:
    return [f"encoder.layers.{layer}.{LINEAR_KINDS[kind]}" for kind in kinds]


def tiny_model(dtype=torch.bfloat16, **arch) -> LlavaViTPackingModel:
    return LlavaViTPackingModel(LlavaViTPackingConfig(**{**TINY, **arch})).to(dtype).eval()


@pytest.fixture
def fake_cuda(monkeypatch):
    """The model reports a CUDA device (its tensors stay on the CPU) of the capability the test sets."""
    monkeypatch.setattr(LlavaViTPackingModel, "device", property(lambda self: torch.device("cuda", 0)))
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


@pytest.mark.parametrize("keep_bf16, layers, kinds", [
    ((), [0, 1, 2, 3], ["qkv", "proj", "fc1", "fc2"]),
    ({"fc2"}, [0, 1, 2, 3], ["qkv", "proj", "fc1"]),
    ("fc2", [0, 1, 2, 3], ["qkv", "proj", "fc1"]),
    ({0, -1}, [1, 2], ["qkv", "proj", "fc1", "fc2"]),
    ([0, 3, -1], [1, 2], ["qkv", "proj", "fc1", "fc2"]),
    ({"fc2", 0, -1}, [1, 2], ["qkv", "proj", "fc1"]),
    (-2, [0, 1, 3], ["qkv", "proj", "fc1", "fc2"]),
    (("qkv", "proj"), [0, 1, 2, 3], ["fc1", "fc2"]),
])
def test_fp8_linear_names_follow_keep_bf16(keep_bf16, layers, kinds):
    assert fp8_linear_names(4, keep_bf16) == [name for i in layers for name in layer_names(i, kinds)]


def test_fp8_linear_names_are_the_model_linears():
    model = tiny_model(num_hidden_layers=3)
    linears = [name for name, m in model.named_modules() if name.startswith("encoder.") and isinstance(m, torch.nn.Linear)]
    assert fp8_linear_names(3) == linears


@pytest.mark.parametrize("keep_bf16, message", [
    ({"fc3"}, "expected a linear kind among ['fc1', 'fc2', 'proj', 'qkv'] or a layer index, got 'fc3'"),
    ({4}, "layer index 4 is out of range for 4 layers (expected -4..3)"),
    ({-5}, "layer index -5 is out of range"),
    (set(LINEAR_KINDS), "keeps every linear in bfloat16: nothing to convert"),
    (range(4), "keeps every linear in bfloat16"),
])
def test_fp8_linear_names_rejects_bad_keep_bf16(keep_bf16, message):
    with pytest.raises(ValueError) as error:
        fp8_linear_names(4, keep_bf16)
    assert message in str(error.value)


@pytest.mark.parametrize("keep_bf16, message", [({True}, "got True"), ([1.0], "got 1.0"), ([None], "got None")])
def test_fp8_linear_names_rejects_other_types(keep_bf16, message):
    with pytest.raises(TypeError, match=rf"expected linear kinds \(str\) and layer indices \(int\), {message}"):
        fp8_linear_names(4, keep_bf16)


def test_quantize_fp8_rejects_other_modules():
    with pytest.raises(TypeError, match="expected a LlavaViTPackingModel, got Linear"):
        quantize_fp8(torch.nn.Linear(16, 16))


def test_quantize_fp8_rejects_bad_keep_bf16_before_anything_else():
    with pytest.raises(ValueError, match="got 'fc3'"):
        quantize_fp8(tiny_model(torch.float32), keep_bf16={"fc3"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_fp8_wants_bfloat16(dtype, fake_cuda):
    with pytest.raises(ValueError, match=rf"expected a bfloat16 model .* got parameters in \['{dtype}'\]"):
        quantize_fp8(tiny_model(dtype))


def test_quantize_fp8_wants_cuda():
    with pytest.raises(ValueError, match="expected the model on a CUDA device, got cpu"):
        quantize_fp8(tiny_model())


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (7, 5)])
def test_quantize_fp8_wants_fp8_tensor_cores(capability, fake_cuda):
    fake_cuda["value"] = capability
    with pytest.raises(ValueError, match=rf"capability 8.9 or newer \(Ada, Hopper or later\), cuda:0 has {capability[0]}.{capability[1]}"):
        quantize_fp8(tiny_model())


def test_quantize_fp8_names_the_missing_extra(fake_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = tiny_model()
    with pytest.raises(ImportError) as error:
        quantize_fp8(model)
    assert INSTALL_HINT in str(error.value) and "torchao>=0.17" in str(error.value)
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_quantize_fp8_wants_linears_in_multiples_of_16():
    model = tiny_model(intermediate_size=72)
    with pytest.raises(ValueError, match=r"multiples of 16, encoder.layers.0.mlp.fc1 is 64 -> 72; keep it in bf16"):
        quantize_fp8(model)
    with pytest.raises(ValueError, match="CUDA device"):  # the check covers only the linears to convert
        quantize_fp8(model, keep_bf16={"fc1", "fc2"})


class Float8Like(torch.Tensor):
    """Stands for a weight some quantization already replaced."""


def test_quantize_fp8_refuses_a_converted_model():
    model = tiny_model()
    fc2 = model.encoder.layers[1].mlp.fc2
    fc2.weight = torch.nn.Parameter(fc2.weight.detach().as_subclass(Float8Like), requires_grad=False)
    with pytest.raises(ValueError, match="encoder.layers.1.mlp.fc2.weight is already a Float8Like; a model is converted once"):
        quantize_fp8(model, keep_bf16={"fc2"})


@needs_torchao
def test_quantize_fp8_refuses_a_torchao_float8_weight():
    from torchao.quantization import Float8Tensor, PerRow

    model = tiny_model()
    qkv = model.encoder.layers[0].self_attn.qkv
    qkv.weight = torch.nn.Parameter(Float8Tensor.from_hp(qkv.weight.detach(), granularity=PerRow()), requires_grad=False)
    with pytest.raises(ValueError, match="encoder.layers.0.self_attn.qkv.weight is already a Float8Tensor"):
        quantize_fp8(model)


SMALL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048, patch_size=14)
MIXED_GRID = torch.tensor([[1, 32, 32], [8, 16, 16], [1, 7, 9], [1, 24, 16], [4, 10, 12], [1, 1, 1]])


def small_model_and_reference(seed: int):
    """A random bf16 model on the GPU, a mixed image + video pack, and the model's bf16 outputs on it."""
    model = LlavaViTPackingModel(LlavaViTPackingConfig(**SMALL)).eval()
    randomize_(model, seed)
    model = model.to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(int(MIXED_GRID.prod(-1).sum()), model.config.patch_dim, generator=gen).cuda()
    return model, hs, model(hs, MIXED_GRID)


def check_converted(model, keep_bf16) -> None:
    from torchao.quantization import Float8Tensor

    converted = set(fp8_linear_names(model.config.num_hidden_layers, keep_bf16))
    for name, module in model.named_modules():
        if name.startswith("encoder.") and isinstance(module, torch.nn.Linear):
            weight = module.weight
            if name in converted:
                assert isinstance(weight, Float8Tensor) and weight.qdata.dtype == torch.float8_e4m3fn, name
                assert weight.scale.shape == (module.out_features, 1), name
            else:
                assert type(weight) is torch.nn.Parameter and weight.dtype == torch.bfloat16, name


def min_cosines(out, ref) -> tuple[float, float]:
    token = F.cosine_similarity(out.last_hidden_state.float(), ref.last_hidden_state.float(), dim=-1).min().item()
    pooled = F.cosine_similarity(out.pooler_output.float(), ref.pooler_output.float(), dim=-1).min().item()
    return token, pooled


@pytest.mark.cuda
@needs_torchao
@needs_fp8_gpu
@torch.no_grad()
def test_fp8_compiled_agrees_with_bf16_on_cuda():
    model, hs, ref = small_model_and_reference(seed=11)
    torch._dynamo.reset()
    assert quantize_fp8(model) is model
    check_converted(model, ())
    assert all(layer._compiled_call_impl is not None for layer in model.encoder.layers)
    token, pooled = min_cosines(model(hs, MIXED_GRID), ref)
    print(f"[cuda figure] fp8 compiled vs bf16 min cosine token/pooled: {token:.5f} / {pooled:.5f}")
    assert pooled >= 0.99
    with pytest.raises(ValueError, match="already a Float8Tensor"):
        quantize_fp8(model)


@pytest.mark.cuda
@needs_torchao
@needs_fp8_gpu
@torch.no_grad()
@pytest.mark.parametrize("keep_bf16", [(), {"fc2"}, {0, -1}])
def test_fp8_keep_bf16_leaves_the_chosen_linears_on_cuda(keep_bf16):
    model, hs, ref = small_model_and_reference(seed=12)
    quantize_fp8(model, keep_bf16=keep_bf16, compile=False)
    check_converted(model, keep_bf16)
    assert all(layer._compiled_call_impl is None for layer in model.encoder.layers)
    token, pooled = min_cosines(model(hs, MIXED_GRID), ref)
    print(f"[cuda figure] fp8 eager keep_bf16={sorted(map(str, keep_bf16))} vs bf16 min cosine token/pooled: "
          f"{token:.5f} / {pooled:.5f}")
    assert pooled >= 0.99
