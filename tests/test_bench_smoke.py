"""The benchmark harness (bench/bench.py): a CPU smoke run, the FLOP formula, the weight mapping."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llava_vit.model.configuration import LlavaViTPackingConfig
from llava_vit.conversion.convert import to_packing_state_dict, to_timm_source_state_dict

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _load_bench():
    spec = importlib.util.spec_from_file_location("llava_vit_bench", BENCH_DIR / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

TIMING_FIELDS = ("median_ms", "min_ms", "max_ms", "times_ms", "tokens_per_s", "tflops", "mfu", "peak_gib")


def test_smoke_run_writes_complete_results(tmp_path):
    report = bench.main(["--smoke", "--out", str(tmp_path), "--warmup", "1"])
    saved = json.loads((tmp_path / bench.RESULTS_NAME).read_text())
    assert saved["workloads"].keys() == report["workloads"].keys() == bench.SMOKE_WORKLOADS.keys()
    assert saved["method"]["flop_formula"] == bench.FLOP_FORMULA
    assert saved["matmul"]["tflops"] > 0
    for name, result in saved["workloads"].items():
        samples = bench.SMOKE_WORKLOADS[name]
        assert result["attn_backend"] == "sdpa"  # auto on the CPU
        assert result["samples"] == len(samples)
        assert result["tokens"] == sum(t * (h // 14) * (w // 14) for t, h, w in samples)
        assert result["gflop"] > 0 and all(v > 0 for v in result["gflop_breakdown"].values())
        assert result["gflop"] == pytest.approx(sum(result["gflop_breakdown"].values()))
        for run in ("packed", "baseline"):
            assert set(TIMING_FIELDS) <= result[run].keys()
            assert len(result[run]["times_ms"]) == 10
            assert 0 < result[run]["min_ms"] <= result[run]["median_ms"] <= result[run]["max_ms"]
            assert result[run]["mfu"] > 0 and result[run]["tokens_per_s"] > 0
        assert result["baseline"]["forwards"] == result["distinct_shapes"]
        assert result["speedup_vs_baseline"] > 0
        assert result["numerics"]["cosine_last_hidden_state"] > 0.999
        assert result["numerics"]["min_pooled_cosine"] > 0.99
    assert (tmp_path / bench.PLOT_NAME).stat().st_size > 0


def test_flops_hand_count_one_sample():
    config = LlavaViTPackingConfig(**bench.TINY)  # D=64, I=256, L=2, C*p*p=588
    flops = bench.count_flops([6], config)  # one 28x42 image: 2x3 patches
    # patch embed 2*6*588*64; per layer qkv 2*6*64*192 + proj 2*6*64*64 + mlp 4*6*64*256, attention 4*64*6^2;
    # head: k/v 2*6*64*128 + probe attention 4*6*64 + q 2*64*64 + out_proj 2*64*64 + mlp 4*64*256
    assert flops["patch_embed"] == 451_584
    assert flops["linear"] == 2 * (147_456 + 49_152 + 393_216)
    assert flops["attention"] == 2 * 9_216
    assert flops["head"] == 98_304 + 1_536 + 8_192 + 8_192 + 65_536
    assert flops["total"] == 1_831_424


def test_attention_flops_are_per_sample():
    config = LlavaViTPackingConfig(**bench.TINY)
    split, joined = bench.count_flops([6, 6], config), bench.count_flops([12], config)
    assert joined["attention"] == 2 * split["attention"]
    assert joined["linear"] == split["linear"] and joined["patch_embed"] == split["patch_embed"]


def test_flops_match_the_anchor_counts():
    patch, workloads = bench.load_workloads()
    anchors = json.loads(bench.ANCHOR_FILE.read_text())["results"]
    config = LlavaViTPackingConfig(**bench.VARIANTS["large"])
    assert workloads.keys() == anchors.keys()
    for name, samples in workloads.items():
        lengths = [t * h * w for t, h, w in bench.patch_grid(samples, patch)]
        assert lengths and sum(lengths) == anchors[name]["tokens"]
        assert bench.count_flops(lengths, config)["total"] == round(anchors[name]["gflop"] * 1e9), name


def test_workloads_file_is_the_shared_one():
    patch, workloads = bench.load_workloads()
    assert patch == 14
    assert list(workloads) == ["uniform_32x448", "many_small_256x224", "mixed_48img_4vid", "video_8f_448"]


def test_source_state_dict_inverts_the_converter():
    packed, source = bench.build_models(dict(bench.TINY), "sdpa", torch.float32, torch.device("cpu"), True)
    state = packed.state_dict()
    back = to_packing_state_dict(to_timm_source_state_dict(state), "timm_source")
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)
    assert source.conv1.weight.data_ptr() == packed.patch_embed.proj.weight.data_ptr()  # weights shared


def test_source_batches_reassemble_the_pixels():
    samples = bench.SMOKE_WORKLOADS["smoke_mixed"]
    grids = bench.patch_grid(samples, 14)
    pack = bench.make_pack(samples, 3, 14, torch.float32, torch.device("cpu"))
    batches = bench.source_batches(pack, grids, 14)
    assert [indices for indices, _ in batches] == [[0], [1, 2], [3]]
    assert [tuple(pixels.shape) for _, pixels in batches] == [(1, 3, 42, 28), (2, 3, 2, 28, 28), (1, 3, 28, 28)]
    video = batches[1][1][1]  # sample 2 (C, T, H, W), rows 6 + 8 .. 6 + 16 of the pack
    assert torch.equal(bench.patchify(video, 14), pack[14:22])
