"""The benchmark harness (bench/bench.py): a CPU smoke run, the FLOP formula, the weight mapping."""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from llava_vit.model.configuration import LlavaViTPackingConfig
from llava_vit.convert.checkpoint import to_packing_state_dict, to_timm_source_state_dict

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
    matmul = saved["matmul"]
    assert matmul["n"] == 256 and len(matmul["times_ms"]) == bench.MATMUL_ITERS
    assert matmul["median_ms"] == pytest.approx(statistics.median(matmul["times_ms"]))
    assert matmul["best_ms"] == pytest.approx(min(matmul["times_ms"]))  # the sustained ceiling: the fastest call
    assert matmul["tflops"] == pytest.approx(2 * 256**3 / (matmul["best_ms"] * 1e-3) / 1e12)
    assert matmul["median_tflops"] == pytest.approx(2 * 256**3 / (matmul["median_ms"] * 1e-3) / 1e12)
    config = LlavaViTPackingConfig(**bench.TINY)
    for name, result in saved["workloads"].items():
        samples = bench.SMOKE_WORKLOADS[name]
        lengths = [t * (h // 14) * (w // 14) for t, h, w in samples]
        flops = bench.count_flops(lengths, config)
        assert result["attn_backend"] == "sdpa"  # auto on the CPU
        assert result["samples"] == len(samples) and result["tokens"] == sum(lengths)
        assert result["distinct_shapes"] == len({tuple(s) for s in samples})
        assert result["gflop"] == pytest.approx(flops["total"] / 1e9)
        assert result["gflop_breakdown"] == pytest.approx({k: v / 1e9 for k, v in flops.items() if k != "total"})
        for run in ("packed", "baseline"):
            r = result[run]
            assert set(TIMING_FIELDS) <= r.keys() and len(r["times_ms"]) == 10
            assert (r["min_ms"], r["max_ms"]) == (min(r["times_ms"]), max(r["times_ms"]))
            assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
            seconds = r["median_ms"] * 1e-3
            assert r["tokens_per_s"] == pytest.approx(sum(lengths) / seconds)
            assert r["tflops"] == pytest.approx(flops["total"] / seconds / 1e12)
            assert r["mfu"] == pytest.approx(flops["total"] / seconds / (matmul["tflops"] * 1e12))
            assert r["peak_gib"] is None  # no CUDA memory statistics on the CPU
        assert result["baseline"]["forwards"] == result["distinct_shapes"]
        assert result["speedup_vs_baseline"] == pytest.approx(result["baseline"]["median_ms"] / result["packed"]["median_ms"])
        numerics = result["numerics"]  # float32 on the CPU: the same function, to rounding
        assert numerics["max_abs_diff"] <= 1e-4
        assert numerics["cosine_last_hidden_state"] > 0.99999 and numerics["min_token_cosine"] > 0.9999
        assert numerics["min_pooled_cosine"] > 0.9999
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


def test_workloads_file_follows_the_documented_recipe():
    """bench/workloads.json holds the workloads bench/bench.py's docstring describes, rebuilt here."""
    rng = random.Random(0)  # mixed: each image's height then width drawn from 224..1008 in steps of 28
    mixed = [[1, rng.choice(range(224, 1009, 28)), rng.choice(range(224, 1009, 28))] for _ in range(48)]
    documented = {
        "uniform_32x448": [[1, 448, 448]] * 32,
        "many_small_256x224": [[1, 224, 224]] * 256,
        "mixed_48img_4vid": mixed + [[8, 224, 224]] * 4,
        "video_8f_448": [[8, 448, 448]],
    }
    patch, workloads = bench.load_workloads()
    assert patch == 14
    assert workloads == documented
    assert list(workloads) == list(documented)


def test_source_state_dict_inverts_the_converter():
    packed, source = bench.build_models(dict(bench.TINY), "sdpa", torch.float32, torch.device("cpu"), True)
    state = packed.state_dict()
    back = to_packing_state_dict(to_timm_source_state_dict(state), "timm_source")
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)
    assert source.conv1.weight.data_ptr() == packed.patch_embed.proj.weight.data_ptr()  # weights shared


def test_source_batches_hold_the_packed_pixels():
    samples = bench.SMOKE_WORKLOADS["smoke_mixed"]
    pack = bench.make_pack(samples, 3, 14, torch.float32, torch.device("cpu"))
    batches = bench.source_batches(samples, 3, 14, torch.float32, torch.device("cpu"))
    assert [indices for indices, _ in batches] == [[0], [1, 2], [3]]
    assert [tuple(pixels.shape) for _, pixels in batches] == [(1, 3, 42, 28), (2, 3, 2, 28, 28), (1, 3, 28, 28)]
    rows = torch.cat([bench.patchify(pixels[0][:, None], 14) for pixels in (batches[0][1], batches[2][1])]
                     + [bench.patchify(video, 14) for video in batches[1][1]])
    starts = [0, 6, 14, 22, 26]  # sample i is pack[starts[i]:starts[i + 1]]
    order = [0, 3, 1, 2]  # rows above: sample 0, sample 3, then the two videos
    expected = torch.cat([pack[starts[i]:starts[i + 1]] for i in order])
    assert torch.equal(rows, expected)


def test_smoke_training_table_has_every_checkpointing_setting(tmp_path):
    """--train times one step per checkpointing setting and counts 3x the forward FLOPs."""
    report = bench.main(["--smoke", "--out", str(tmp_path), "--warmup", "1", "--no-baseline", "--train",
                         "--checkpoint-every", "0", "1", "2", "--workloads", "smoke_mixed"])
    training = report["training"]["smoke_mixed"]
    assert list(training["checkpointing"]) == ["none", "every layer", "every 2 layers"]
    lengths = [t * (h // 14) * (w // 14) for t, h, w in bench.SMOKE_WORKLOADS["smoke_mixed"]]
    flops = 3 * bench.count_flops(lengths, LlavaViTPackingConfig(**bench.TINY))["total"]
    assert training["gflop_step"] == pytest.approx(flops / 1e9)
    matmul = report["matmul"]["tflops"] * 1e12
    for row in training["checkpointing"].values():
        assert len(row["times_ms"]) == 10
        assert row["mfu"] == pytest.approx(flops / (row["median_ms"] * 1e-3) / matmul)
