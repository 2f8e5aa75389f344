"""Backend selection and agreement, including the flash-attn 2 and flash-attn-4 call paths (with stand-in modules)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import llava_vit.model.attention
import llava_vit.model.modeling
from llava_vit import LlavaViTPackingConfig, LlavaViTPackingModel
from llava_vit.model.attention import (
    FLASH_ATTN4_MIN_MEAN_LENGTH,
    PackedSeqs,
    auto_attn_implementation,
    check_attn_implementation,
    cuda_compute_capability,
    flash_attn4_available,
    flash_attn_available,
    resolve_attn_implementation,
    torch_varlen_available,
    varlen_attention,
)
from model_pairs import TINY, randomize_


def reference_attention(q, k, v, lengths_q, lengths_k):
    """Per-sample loop: the block-diagonal definition, written the slow obvious way."""
    out, sq, sk = [], 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q[sq:sq + lq], k[sk:sk + lk], v[sk:sk + lk])))
        out.append(o[0].transpose(0, 1))
        sq, sk = sq + lq, sk + lk
    return torch.cat(out)


def random_qkv(lengths, heads=2, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return [torch.randn(n, heads, dim, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("lengths", [(5,), (4, 4, 4), (3, 7, 3, 1, 7), (1,)])
def test_sdpa_varlen_is_block_diagonal(lengths):
    q, k, v = random_qkv(lengths)
    seqs = PackedSeqs.from_lengths(lengths, torch.device("cpu"))
    out = varlen_attention(q, k, v, seqs, seqs, "sdpa")
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths, lengths), rtol=1e-5, atol=1e-6)


def test_sdpa_varlen_single_query_per_sample():
    """The pooling head's shape: one query per sample against that sample's tokens."""
    lengths_k = (6, 2, 6, 9)
    q = torch.randn(4, 2, 32)
    _, k, v = random_qkv(lengths_k)
    out = varlen_attention(q, k, v, PackedSeqs.from_lengths([1] * 4, torch.device("cpu")),
                           PackedSeqs.from_lengths(lengths_k, torch.device("cpu")), "sdpa")
    torch.testing.assert_close(out, reference_attention(q, k, v, [1] * 4, lengths_k), rtol=1e-5, atol=1e-6)


def test_resolution_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attn_implementation(None, cpu, torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation("auto", cuda, torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="CUDA device and float16/bfloat16"):
        resolve_attn_implementation("varlen", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of"):
        check_attn_implementation("eager")


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
AUTO_CASES = [  # (device type, dtype, lengths, flash-attn installed, torch varlen present) -> backend
    ("cpu", FP32, (3, 5), True, True, "sdpa"),
    ("cpu", BF16, (3, 5), True, True, "sdpa"),
    ("cuda", FP32, (3, 5), True, True, "sdpa"),
    ("cuda", BF16, (4, 4, 4), True, True, "sdpa"),  # equal lengths seen before: one batched SDPA call (cuDNN)
    ("cuda", FP16, (7,), True, True, "sdpa"),
    ("cuda", BF16, (3, 5), True, True, "flash_attention_2"),
    ("cuda", FP16, (3, 5), True, False, "flash_attention_2"),
    ("cuda", BF16, (3, 5), False, True, "varlen"),
    ("cuda", BF16, (3, 5), False, False, "sdpa"),
    ("mps", FP16, (3, 5), True, True, "sdpa"),
]


@pytest.mark.parametrize("device_type, dtype, lengths, flash, varlen, expected", AUTO_CASES)
def test_auto_choice(device_type, dtype, lengths, flash, varlen, expected):
    assert auto_attn_implementation(device_type, dtype, lengths, flash, varlen) == expected


@pytest.mark.parametrize("flash, varlen, expected", [(True, True, "flash_attention_2"), (False, True, "varlen"),
                                                     (False, False, "sdpa")])
def test_auto_runs_a_new_equal_length_shape_without_cudnn(flash, varlen, expected):
    """cuDNN builds a plan per new shape: the first pack of a shape takes the varlen kernels."""
    assert auto_attn_implementation("cuda", BF16, (9, 9), flash, varlen, shape_seen=False) == expected


def installed_auto(device_type: str, dtype: torch.dtype, lengths: tuple[int, ...], shape_seen: bool = True) -> str:
    """:func:`auto_attn_implementation` with what this machine has installed."""
    device = torch.device(device_type)
    return auto_attn_implementation(device_type, dtype, lengths, flash_attn_available(), torch_varlen_available(),
                                    shape_seen, flash_attn4_available(), cuda_compute_capability(device))


MIN4 = FLASH_ATTN4_MIN_MEAN_LENGTH
H200, A100, B200 = (9, 0), (8, 0), (10, 0)
AUTO4_CASES = [  # (lengths, shape seen, flash-attn-4, capability, flash-attn 2, torch varlen) -> backend
    ((600, 700), True, True, H200, True, True, "flash_attention_4"),
    ((MIN4 - 1, MIN4 + 1), True, True, H200, True, True, "flash_attention_4"),  # mean exactly at the threshold
    ((MIN4 - 1, MIN4), True, True, H200, True, True, "flash_attention_2"),  # mean just below
    ((256, 300), True, True, H200, False, True, "varlen"),  # short samples: FA2 was 2x faster at 256 tokens
    ((4608, 700, 2100), True, True, B200, False, False, "flash_attention_4"),
    ((600, 700), True, True, A100, True, True, "flash_attention_2"),  # FA4 runs on 9.x/10.x only
    ((600, 700), True, True, (12, 0), False, True, "varlen"),
    ((600, 700), True, True, None, True, True, "flash_attention_2"),  # capability unknown
    ((600, 700), True, False, H200, True, True, "flash_attention_2"),  # FA4 not installed: the previous choice
    ((600, 700), True, False, H200, False, True, "varlen"),
    ((1024,) * 32, True, True, H200, True, True, "sdpa"),  # equal lengths seen before: cuDNN stays first
    ((1024,) * 32, False, True, H200, True, True, "flash_attention_4"),  # a new equal-length shape
    ((256,) * 256, False, True, H200, True, True, "flash_attention_2"),
    ((), True, True, H200, True, True, "flash_attention_2"),  # no lengths given: no mean to compare
]


@pytest.mark.parametrize("lengths, seen, flash4, capability, flash, varlen, expected", AUTO4_CASES)
def test_auto_choice_with_flash_attention_4(lengths, seen, flash4, capability, flash, varlen, expected):
    assert auto_attn_implementation("cuda", BF16, lengths, flash, varlen, seen, flash4, capability) == expected
    assert auto_attn_implementation("cuda", FP16, lengths, flash, varlen, seen, flash4, capability) == expected


@pytest.mark.parametrize("device_type, dtype", [("cpu", BF16), ("cuda", FP32), ("mps", FP16)])
def test_auto_takes_flash_attention_4_only_on_cuda_half_precision(device_type, dtype):
    assert auto_attn_implementation(device_type, dtype, (600, 700), True, True, True, True, H200) == "sdpa"


def test_auto_resolution_uses_the_installed_kernels():
    for device_type, dtype, lengths, *_ in AUTO_CASES:
        expected = installed_auto(device_type, dtype, lengths)
        resolve_attn_implementation("auto", torch.device(device_type), dtype, lengths)  # the shape is now seen
        assert resolve_attn_implementation("auto", torch.device(device_type), dtype, lengths) == expected


def test_auto_remembers_equal_length_shapes():
    cuda, shape = torch.device("cuda"), (11, 11, 11)
    first = resolve_attn_implementation("auto", cuda, BF16, shape)
    assert first == installed_auto("cuda", BF16, shape, shape_seen=False)
    assert resolve_attn_implementation("auto", cuda, BF16, shape) == "sdpa"
    assert resolve_attn_implementation("auto", cuda, BF16, (11, 11)) == first  # another count is another shape


def test_flash_attention_2_missing_package_raises_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else object())
    with pytest.raises(ImportError, match="pip install flash-attn"):
        check_attn_implementation("flash_attention_2")
    with pytest.raises(ImportError, match="pip install flash-attn"):
        LlavaViTPackingModel(LlavaViTPackingConfig(**TINY, attn_implementation="flash_attention_2"))


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A stand-in ``flash_attn`` with the real signature, recording its calls and computing with SDPA."""
    calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **kwargs):
        calls.append(dict(cu_q=cu_seqlens_q.clone(), cu_k=cu_seqlens_k.clone(), max_q=max_seqlen_q,
                          max_k=max_seqlen_k, dropout_p=dropout_p, causal=causal, shapes=(q.shape, k.shape)))
        lq = torch.diff(cu_seqlens_q).tolist()
        lk = torch.diff(cu_seqlens_k).tolist()
        return reference_attention(q, k, v, lq, lk)

    module = types.ModuleType("flash_attn")  # a regular package, as flash-attn 2 installs it
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, origin="/site-packages/flash_attn/__init__.py")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert flash_attn_available()
    llava_vit.model.attention._installed_kernels.cache_clear()  # auto looks the packages up again
    yield calls
    llava_vit.model.attention._installed_kernels.cache_clear()


@pytest.mark.parametrize("backend, fake, defaults", [
    ("flash_attention_2", "fake_flash_attn", {"dropout_p": 0.0, "causal": False}),
    ("flash_attention_4", "fake_flash_attn4", {"softmax_scale": None, "causal": False}),
])
@torch.no_grad()
def test_flash_attention_path_calls_varlen_func(backend, fake, defaults, request, monkeypatch):
    """The layers and the pooling head call the package's varlen function with the pack's lengths."""
    calls = request.getfixturevalue(fake)
    config = LlavaViTPackingConfig(**TINY, attn_implementation=backend)
    model = LlavaViTPackingModel(config).eval()
    randomize_(model, 0)
    assert model.config._attn_implementation == backend
    grid = torch.tensor([[1, 3, 5], [2, 2, 2], [1, 4, 4]])
    hs = torch.randn(int((grid.prod(-1)).sum()), config.patch_dim)
    with pytest.raises(ValueError, match="CUDA device"):  # FlashAttention kernels cannot run on CPU float32 ...
        model(hs, grid)
    monkeypatch.setattr(llava_vit.model.modeling, "resolve_attn_implementation", lambda *a: "sdpa")
    expected = model(hs, grid)
    monkeypatch.setattr(llava_vit.model.modeling, "resolve_attn_implementation", lambda *a: backend)
    out = model(hs, grid)  # ... so force the dispatch to check the call itself
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output)
    layer_calls = [c for c in calls if c["max_q"] == 16]
    head_calls = [c for c in calls if c["max_q"] == 1]
    assert len(layer_calls) == config.num_hidden_layers and len(head_calls) == 1
    assert len(calls) == config.num_hidden_layers + 1
    for c in layer_calls:
        assert c["cu_q"].tolist() == [0, 15, 23, 39] and c["cu_k"].tolist() == [0, 15, 23, 39]
        assert c["cu_q"].dtype == c["cu_k"].dtype == torch.int32 and c["max_k"] == 16
    assert head_calls[0]["cu_q"].tolist() == [0, 1, 2, 3] and head_calls[0]["cu_k"].tolist() == [0, 15, 23, 39]
    assert head_calls[0]["max_k"] == 16
    assert all(c[key] == value for c in calls for key, value in defaults.items())


@pytest.fixture
def only_path(monkeypatch, tmp_path):
    """``sys.path`` reduced to an empty ``tmp_path`` (and no ``flash_attn`` imported): lay out packages in it."""
    for name in ("flash_attn", "flash_attn.cute"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    importlib.invalidate_caches()
    return tmp_path


def make_package(root, dotted: str, regular: bool) -> None:
    folder = root.joinpath(*dotted.split("."))
    folder.mkdir(parents=True)
    if regular:
        (folder / "__init__.py").write_text("raise AssertionError('a check imported this package')\n")


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(only_path):
    """flash-attn-4 installs flash_attn/cute/ under a namespace package flash_attn (no __init__.py)."""
    make_package(only_path, "flash_attn.cute", regular=True)
    assert importlib.util.find_spec("flash_attn") is not None  # what the old check looked at
    assert not flash_attn_available()
    assert flash_attn4_available()
    with pytest.raises(ImportError, match="pip install flash-attn"):
        check_attn_implementation("flash_attention_2")
    assert check_attn_implementation("flash_attention_4") == "flash_attention_4"
    installed = flash_attn_available(), True, True, flash_attn4_available(), H200
    assert auto_attn_implementation("cuda", BF16, (600, 700), *installed) == "flash_attention_4"
    assert auto_attn_implementation("cuda", BF16, (3, 5), *installed) == "varlen"  # short samples: not FA2


def test_flash_attn_2_package_is_detected_without_importing_it(only_path):
    make_package(only_path, "flash_attn", regular=True)
    assert flash_attn_available() and not flash_attn4_available()
    make_package(only_path, "flash_attn.cute", regular=True)  # flash-attn 2 and 4 installed together
    importlib.invalidate_caches()
    assert flash_attn_available() and flash_attn4_available()
    assert "flash_attn" not in sys.modules


def test_no_flash_attn_at_all(only_path):
    assert not flash_attn_available()
    assert not flash_attn4_available()  # a missing parent package is an answer, not an error


@pytest.fixture
def fake_flash_attn4(monkeypatch):
    """A stand-in flash-attn-4: namespace ``flash_attn`` and a ``flash_attn.cute`` whose
    ``flash_attn_varlen_func`` has the real signature's leading parameters, records its calls and
    returns ``(out, lse)`` computed with SDPA per sample."""
    calls = []

    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, min_seqlen_k=None, seqused_q=None, seqused_k=None,
                               gather_kv_indices=None, page_table=None, softmax_scale=None, causal=False,
                               window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
                               pack_gqa=None, deterministic=False, return_lse=False):
        assert qv is None and seqused_q is None and seqused_k is None and page_table is None
        calls.append({"cu_q": cu_seqlens_q.clone(), "cu_k": cu_seqlens_k.clone(), "max_q": max_seqlen_q,
                      "max_k": max_seqlen_k, "softmax_scale": softmax_scale, "causal": causal})
        lq = torch.diff(cu_seqlens_q).tolist()
        lk = torch.diff(cu_seqlens_k).tolist()
        out = reference_attention(q, k, v, lq, lk)
        lse = torch.cat([
            torch.logsumexp(torch.einsum("qhd,khd->hqk", qs, ks) * q.shape[-1] ** -0.5, dim=-1)
            for qs, ks in zip(q.split(lq), k.split(lk))
        ], dim=1)
        return out, lse

    parent = types.ModuleType("flash_attn")
    parent.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    parent.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.__spec__ = importlib.machinery.ModuleSpec("flash_attn.cute", None)
    cute.flash_attn_varlen_func = flash_attn_varlen_func
    parent.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", parent)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    assert flash_attn4_available() and not flash_attn_available()
    llava_vit.model.attention._installed_kernels.cache_clear()  # auto looks the packages up again
    yield calls
    llava_vit.model.attention._installed_kernels.cache_clear()


def test_fake_flash_attn4_matches_the_reference(fake_flash_attn4):
    """The stand-in itself: block-diagonal output and a log-sum-exp of shape (heads, total_q)."""
    lengths_q, lengths_k = (1, 1, 1), (6, 2, 9)
    q, _, _ = random_qkv(lengths_q, seed=1)
    _, k, v = random_qkv(lengths_k, seed=2)
    from flash_attn.cute import flash_attn_varlen_func

    cu = [PackedSeqs.from_lengths(n, torch.device("cpu")).cu_seqlens for n in (lengths_q, lengths_k)]
    out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1], max_seqlen_q=1, max_seqlen_k=9)
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths_q, lengths_k), rtol=1e-5, atol=1e-6)
    assert lse.shape == (q.shape[1], q.shape[0])


def test_flash_attention_4_missing_package_raises_install_hint(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r'pip install "llava-vit\[flash4\]"'):
        check_attn_implementation("flash_attention_4")
    with pytest.raises(ImportError, match=r'pip install "llava-vit\[flash4\]"'):
        LlavaViTPackingModel(LlavaViTPackingConfig(**TINY, attn_implementation="flash_attention_4"))


@pytest.mark.parametrize("device, dtype", [("cpu", BF16), ("cpu", FP32), ("cuda", FP32)])
def test_flash_attention_4_needs_cuda_half_precision(fake_flash_attn4, device, dtype):
    with pytest.raises(ValueError, match="CUDA device and float16/bfloat16"):
        resolve_attn_implementation("flash_attention_4", torch.device(device), dtype)


@pytest.mark.parametrize("capability, message", [((8, 0), "found compute capability 8.0"),
                                                 ((12, 1), "found compute capability 12.1"),
                                                 (None, "found no usable CUDA device")])
def test_flash_attention_4_refuses_other_gpus(fake_flash_attn4, monkeypatch, capability, message):
    monkeypatch.setattr(llava_vit.model.attention, "cuda_compute_capability", lambda device: capability)
    with pytest.raises(ValueError, match=rf"9\.x \(Hopper\) or 10\.x \(Blackwell\); {message}"):
        resolve_attn_implementation("flash_attention_4", torch.device("cuda"), BF16, (600, 700))


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (10, 3)])
def test_flash_attention_4_resolves_on_hopper_and_blackwell(fake_flash_attn4, monkeypatch, capability):
    monkeypatch.setattr(llava_vit.model.attention, "cuda_compute_capability", lambda device: capability)
    assert resolve_attn_implementation("flash_attention_4", torch.device("cuda"), FP16) == "flash_attention_4"


def test_auto_resolution_takes_installed_flash_attention_4(fake_flash_attn4, monkeypatch):
    monkeypatch.setattr(llava_vit.model.attention, "cuda_compute_capability", lambda device: H200)
    cuda = torch.device("cuda")
    assert resolve_attn_implementation("auto", cuda, BF16, (600, 700, 3000)) == "flash_attention_4"
    short = resolve_attn_implementation("auto", cuda, BF16, (200, 300))
    assert short == auto_attn_implementation("cuda", BF16, (200, 300), False, torch_varlen_available())
    assert resolve_attn_implementation("auto", torch.device("cpu"), BF16, (600, 700)) == "sdpa"
    monkeypatch.setattr(llava_vit.model.attention, "cuda_compute_capability", lambda device: A100)
    assert resolve_attn_implementation("auto", cuda, BF16, (600, 700)) != "flash_attention_4"


def test_attn_implementation_from_pretrained_kwarg(tmp_path):
    model = LlavaViTPackingModel(LlavaViTPackingConfig(**TINY))
    model.save_pretrained(tmp_path)
    loaded = LlavaViTPackingModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert loaded.config._attn_implementation == "sdpa"
    assert LlavaViTPackingModel.from_pretrained(tmp_path).config._attn_implementation == "auto"


def test_training_after_inference_mode_on_the_same_pack_shapes():
    """Cached SDPA index tensors made under inference_mode must not poison a later backward."""
    from model_pairs import source_and_packed

    _, model = source_and_packed(seed=4)
    grid = torch.tensor([[1, 2, 3], [1, 3, 3], [1, 2, 3]])
    hs = torch.randn(int(grid.prod(-1).sum()), model.config.patch_dim)
    with torch.inference_mode():
        model(hs, grid)
    model.train()
    out = model(hs, grid)
    (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
