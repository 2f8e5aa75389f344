#!/usr/bin/env python3
"""Benchmark the packed LlavaViT encoder against the unpacked source model.

For every workload (a list of ``[t, height_px, width_px]`` samples): random pixels per sample,
patchified into one ``(seq, C*p*p)`` pack on the device, ``grid_thw`` on the CPU; the packed
model's forward is timed under ``torch.inference_mode`` with CUDA events (median, min and max
over ``--iters`` runs after ``--warmup``). In the same run, the unpacked source model with the
same weights encodes the same pixels as "batch identical shapes, loop over the rest" (one forward
per distinct ``[t, h, w]``; videos as ``(B, C, T, H, W)``, all frames visible), timed the same
way, and the two outputs are compared. MFU divides the analytic FLOPs (:data:`FLOP_FORMULA`) by
the time and by the bf16 matmul rate measured in this run. See docs/PERFORMANCE.md.

The workloads (``bench/workloads.json``, ViT-L/14): ``uniform_32x448`` (32 images 448x448),
``many_small_256x224`` (256 images 224x224), ``mixed_48img_4vid`` (48 images whose height then
width are drawn from 224..1008 in steps of 28 by ``random.Random(0).choice``, then four 8-frame
224x224 videos) and ``video_8f_448`` (one 8-frame 448x448 video).

Run from a checkout (the package need not be installed)::

    python bench/bench.py --out outputs/bench          # all workloads, H100
    python bench/bench.py --smoke --out /tmp/smoke     # tiny model on the CPU, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(BENCH_DIR))

import torch  # noqa: E402

from llava_vit.model.attention import ATTN_IMPLEMENTATIONS, resolve_attn_implementation  # noqa: E402
from llava_vit.model.configuration import LlavaViTConfig, LlavaViTPackingConfig  # noqa: E402
from llava_vit.convert.checkpoint import to_timm_source_state_dict  # noqa: E402
from llava_vit.model.modeling import LlavaViTPackingModel  # noqa: E402
from llava_vit.processing import patchify  # noqa: E402
from llava_vit.reference import LlavaViT  # noqa: E402
from llava_vit.model.variants import SOURCE_EPS, VARIANTS  # noqa: E402

WORKLOADS_FILE = BENCH_DIR / "workloads.json"
ANCHOR_FILE = BENCH_DIR / "anchor_h100.json"
RESULTS_NAME = "bench_results.json"
PLOT_NAME = "bench.png"

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, patch_size=14)
"""The ``--smoke`` architecture (head_dim 32, the smallest the 3D RoPE allows)."""

LATENCY_WORKLOADS: dict[str, list[list[int]]] = {"single_448": [[1, 448, 448]], "single_224": [[1, 224, 224]]}
"""One image per forward: the latency of a service that encodes requests as they come."""

SMOKE_WORKLOADS: dict[str, list[list[int]]] = {
    "smoke_images": [[1, 28, 42], [1, 28, 42], [1, 56, 28]],
    "smoke_mixed": [[1, 42, 28], [2, 28, 28], [2, 28, 28], [1, 28, 28]],
}

FLOP_FORMULA = (
    "multiply-adds count 2 FLOPs; N = total tokens, n_i = tokens of sample i, S = samples, D = hidden, "
    "I = MLP width, L = layers, C*p*p = patch vector. "
    "patch_embed = 2*N*(C*p*p)*D; "
    "per layer: qkv 2*N*D*3D + proj 2*N*D*D + mlp 2*2*N*D*I + attention 2*2*D*sum_i(n_i^2) (QK^T and AV); "
    "head: k/v projection 2*N*D*2D + probe attention 2*2*N*D + per sample (q projection 2*D*D, "
    "out_proj 2*D*D, mlp 2*2*D*I). Norms, RoPE, softmax, GELU, biases and residual adds are not counted."
)
MFU_DEFINITION = (
    "MFU = analytic FLOPs / median forward time / sustained matmul ceiling of this run: the fastest of "
    "50 timed n^3 torch.matmul calls on random data in the run's dtype after 10 warm-up calls "
    "(n = 8192, 256 with --smoke). mfu_datasheet divides by the card's datasheet dense peak instead "
    "(989 TFLOP/s bf16/fp16 for H100 SXM and H200), where the card is known"
)
PEAK_DEFINITION = (
    "torch.cuda.max_memory_allocated over the timed forwards (reset after warm-up), nothing subtracted: "
    "includes the weights (shared by both models), the input pixels of that model and the activations"
)

MATMUL_ITERS = 50
"""Timed runs of the matmul that gives the MFU denominator (about 1.5 ms each at 8192^3 on an H100)."""


def log(*parts: object) -> None:
    print(*parts, flush=True)


# ---- workloads and FLOPs --------------------------------------------------------------------------


def load_workloads(path: Path = WORKLOADS_FILE) -> tuple[int, dict[str, list[list[int]]]]:
    """``(patch_size, {name: [[t, height_px, width_px], ...]})`` from a workloads file."""
    data = json.loads(path.read_text())
    return data["patch_size"], data["workloads"]


def patch_grid(samples: Sequence[Sequence[int]], patch: int) -> list[tuple[int, int, int]]:
    """``[t, h, w]`` patch grids of ``[t, height_px, width_px]`` samples."""
    grids = []
    for t, height, width in samples:
        if height % patch or width % patch:
            raise ValueError(f"sample {[t, height, width]}: height and width must be multiples of the patch size {patch}")
        grids.append((t, height // patch, width // patch))
    return grids


def count_flops(lengths: Sequence[int], config: LlavaViTPackingConfig) -> dict[str, int]:
    """Analytic forward FLOPs of the packed model on samples of ``lengths`` tokens (see :data:`FLOP_FORMULA`)."""
    n, s = sum(lengths), len(lengths)
    d, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    flops = {
        "patch_embed": 2 * n * config.patch_dim * d,
        "linear": layers * (2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * i),
        "attention": layers * 2 * 2 * d * sum(m * m for m in lengths),
        "head": 2 * n * d * 2 * d + 2 * 2 * n * d + s * (2 * d * d + 2 * d * d + 2 * 2 * d * i),
    }
    flops["total"] = sum(flops.values())
    return flops


# ---- models ---------------------------------------------------------------------------------------


def build_models(
    arch: dict[str, int], attn: str, dtype: torch.dtype, device: torch.device, with_source: bool
) -> tuple[LlavaViTPackingModel, LlavaViT | None]:
    """The packed model with random weights (seed 0) and, if asked, the source model sharing them.

    Both use the source's norm epsilons, so the two compute the same function.
    """
    torch.manual_seed(0)
    with torch.device(device):
        packed = LlavaViTPackingModel(LlavaViTPackingConfig(**arch, **SOURCE_EPS["layer_norm"], attn_implementation=attn))
    packed = packed.to(dtype).eval()
    if not with_source:
        return packed, None
    with torch.device("meta"):
        source = LlavaViT(LlavaViTConfig(**arch, **SOURCE_EPS["layer_norm"]))
    source.load_state_dict(to_timm_source_state_dict(packed.state_dict()), strict=True, assign=True)
    return packed, source.eval()


# ---- inputs ---------------------------------------------------------------------------------------


def sample_pixels(samples: Sequence[Sequence[int]], channels: int, dtype, device, seed: int = 0) -> list[torch.Tensor]:
    """Random pixels ``(C, T, H, W)`` per ``[t, height_px, width_px]`` sample; the same for the same seed."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn((channels, *sample), generator=gen, dtype=dtype, device=device) for sample in samples]


def make_pack(samples: Sequence[Sequence[int]], channels: int, patch: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """:func:`sample_pixels`, patchified and concatenated: ``(seq, C*p*p)``."""
    return torch.cat([patchify(pixels, patch) for pixels in sample_pixels(samples, channels, dtype, device, seed)])


def shape_groups(grids: Sequence[tuple[int, int, int]]) -> dict[tuple[int, int, int], list[int]]:
    """Sample indices per distinct patch grid, in order of first appearance."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for index, grid in enumerate(grids):
        groups.setdefault(grid, []).append(index)
    return groups


def source_batches(
    samples: Sequence[Sequence[int]], channels: int, patch: int, dtype, device, seed: int = 0
) -> list[tuple[list[int], torch.Tensor]]:
    """``(sample indices, pixels)`` per distinct patch grid, the pixels of :func:`make_pack` with the
    same seed: ``(B, C, H, W)`` images, ``(B, C, T, H, W)`` videos."""
    pixels = sample_pixels(samples, channels, dtype, device, seed)
    batches = []
    for grid, indices in shape_groups(patch_grid(samples, patch)).items():
        batch = torch.stack([pixels[i] for i in indices])
        batches.append((indices, batch[:, :, 0] if grid[0] == 1 else batch))
    return batches


# ---- timing ---------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> tuple[list[float], float | None]:
    """Seconds of each of ``iters`` calls after ``warmup`` calls, and the peak GiB over them (CUDA only).

    CUDA: an event pair around each call, one synchronize at the end. CPU: ``perf_counter``.
    """
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events], torch.cuda.max_memory_allocated(device) / 2**30


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls after ``warmup`` (see :func:`time_fn`)."""
    return statistics.median(time_fn(fn, warmup, iters, device)[0]) * 1e3


DATASHEET_TFLOPS = {"H100 80GB HBM3": 989.4, "H200": 989.4}
"""Dense bf16/fp16 tensor-core peak of the cards whose datasheet we quote, by device-name fragment."""


def datasheet_tflops(device: torch.device) -> float | None:
    """The datasheet dense half-precision peak of this CUDA card, if known (H100 SXM, H200)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in DATASHEET_TFLOPS.items() if fragment in name), None)


def summarize(times: list[float], peak_gib: float | None, flops: int, tokens: int, matmul_flops_per_s: float,
              datasheet_flops_per_s: float | None = None) -> dict:
    median = statistics.median(times)
    return {
        "median_ms": median * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "tokens_per_s": tokens / median,
        "tflops": flops / median / 1e12,
        "mfu": flops / median / matmul_flops_per_s,
        "mfu_datasheet": flops / median / datasheet_flops_per_s if datasheet_flops_per_s else None,
        "peak_gib": peak_gib,
    }


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, warmup: int, iters: int) -> dict:
    """Rate of an ``n x n x n`` ``torch.matmul`` on random data in ``dtype``: ``tflops`` is the sustained
    ceiling (the fastest of ``iters`` timed calls after ``warmup``; a card that throttles as it warms
    runs its later calls slower, which a median would count against the ceiling), with the median
    and every call's time alongside."""
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, generator=gen, dtype=dtype, device=device)
    b = torch.randn(n, n, generator=gen, dtype=dtype, device=device)
    times, _ = time_fn(lambda: torch.matmul(a, b), warmup, iters, device)
    median, best = statistics.median(times), min(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": median * 1e3, "best_ms": best * 1e3,
            "times_ms": [t * 1e3 for t in times], "tflops": 2 * n**3 / best / 1e12,
            "median_tflops": 2 * n**3 / median / 1e12, "datasheet_tflops": datasheet_tflops(device)}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- numerics -------------------------------------------------------------------------------------


def compare_outputs(packed: torch.Tensor, source: torch.Tensor, packed_pool: torch.Tensor,
                    source_pool: torch.Tensor) -> dict[str, float]:
    """Cosine of the whole ``last_hidden_state``, the worst token's cosine and the worst pooled vector's."""
    a, b = packed.float(), source.float()
    dots, na, nb = ((a * b).sum(-1).double(), (a * a).sum(-1).double(), (b * b).sum(-1).double())
    return {
        "cosine_last_hidden_state": float(dots.sum() / (na.sum() * nb.sum()).sqrt()),
        "min_token_cosine": float((dots / (na * nb).sqrt()).min()),
        "max_abs_diff": float((a - b).abs().max()),
        "min_pooled_cosine": float(torch.nn.functional.cosine_similarity(
            packed_pool.float(), source_pool.float(), dim=-1).min()),
    }


# ---- one workload -----------------------------------------------------------------------------------


def bench_workload(
    name: str,
    samples: list[list[int]],
    packed_fn: Callable,
    source: LlavaViT | None,
    config: LlavaViTPackingConfig,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    matmul_flops_per_s: float,
    anchor: dict | None,
) -> dict:
    """Time the packed model (and the source baseline) on one workload; compare their outputs."""
    patch = config.patch_size
    grids = patch_grid(samples, patch)
    lengths = [t * h * w for t, h, w in grids]
    tokens = sum(lengths)
    flops = count_flops(lengths, config)
    result: dict = {
        "samples": len(samples), "tokens": tokens, "distinct_shapes": len(shape_groups(grids)),
        "gflop": flops["total"] / 1e9, "gflop_breakdown": {k: v / 1e9 for k, v in flops.items() if k != "total"},
    }
    line = (f"[{name}] {len(samples)} samples, {result['distinct_shapes']} shapes, {tokens} tokens, "
            f"{result['gflop']:.1f} GFLOP")
    if anchor is not None:
        result["anchor_gflop"] = anchor["gflop"]
        result["gflop_vs_anchor"] = result["gflop"] / anchor["gflop"] - 1
        line += f" (anchor {anchor['gflop']:.1f}, {100 * result['gflop_vs_anchor']:+.4f}%)"
    log(line)

    grid_thw = torch.tensor(grids, dtype=torch.int64)  # stays on the CPU: no device sync per call
    pack = make_pack(samples, config.num_channels, patch, dtype, device)
    free_memory(device)
    timed = dict(args=args, device=device, flops=flops["total"], tokens=tokens, matmul_flops_per_s=matmul_flops_per_s)
    result["packed"] = time_model("packed", lambda pack=pack: packed_fn(pack, grid_thw), **timed)
    result["attn_backend"] = resolve_attn_implementation(config._attn_implementation, device, dtype, tuple(lengths))
    log(f"  attention backend of the timed forwards: {result['attn_backend']}")
    if source is None:
        return result
    check = "error" not in result["packed"]
    if check:  # the reference output, kept on the host, out of the baseline's memory
        out = packed_fn(pack, grid_thw)
        packed_hidden, packed_pool = out.last_hidden_state.cpu(), out.pooler_output.cpu()
        del out
    del pack
    batches = source_batches(samples, config.num_channels, patch, dtype, device)
    free_memory(device)

    def run_source() -> None:
        for _, pixels in batches:
            source(pixels)

    result["baseline"] = time_model("baseline", run_source, **timed)
    if "error" in result["baseline"]:
        return result
    result["baseline"]["forwards"] = len(batches)
    if check:
        result["speedup_vs_baseline"] = result["baseline"]["median_ms"] / result["packed"]["median_ms"]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        source_hidden, source_pool = torch.empty_like(packed_hidden), torch.empty_like(packed_pool)
        for indices, pixels in batches:
            out = source(pixels)
            hidden, pool = out["visible_embeddings"].cpu(), out["head_output"].cpu()
            for j, i in enumerate(indices):
                source_hidden[starts[i]:starts[i + 1]] = hidden[j]
                source_pool[i] = pool[j]
        result["numerics"] = compare_outputs(packed_hidden, source_hidden, packed_pool, source_pool)
        log("  packed vs baseline ({}): ".format(str(dtype).removeprefix("torch."))
            + ", ".join(f"{k} {v:.5f}" for k, v in result["numerics"].items()))
    return result


def bench_cuda_graph(samples: list[list[int]], model: LlavaViTPackingModel, args: argparse.Namespace,
                     device: torch.device, dtype: torch.dtype, matmul_flops_per_s: float) -> dict:
    """The packed model's forward on one fixed-size pack, captured once and replayed as a CUDA graph."""
    from llava_vit.model.cuda_graphs import CUDAGraphEncoder

    config = model.config
    grids = patch_grid(samples, config.patch_size)
    lengths = [t * h * w for t, h, w in grids]
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    pack = make_pack(samples, config.num_channels, config.patch_size, dtype, device)
    graph = CUDAGraphEncoder(model, grid_thw)
    eager = model(pack, grid_thw).pooler_output.float()
    replayed = graph(pack).pooler_output.float()
    result = time_model("graph", lambda: graph(pack), args, device, count_flops(lengths, config)["total"],
                        sum(lengths), matmul_flops_per_s)
    result["pooled_cosine_vs_eager"] = float(torch.nn.functional.cosine_similarity(eager, replayed, dim=-1).min())
    return result


def time_model(label: str, fn: Callable[[], object], args: argparse.Namespace, device: torch.device, flops: int,
               tokens: int, matmul_flops_per_s: float) -> dict:
    """:func:`time_fn` of one model's forward(s), summarized and printed; ``{"error": ...}`` when out of memory."""
    try:
        times, peak = time_fn(fn, args.warmup, args.iters, device)
    except torch.OutOfMemoryError as err:
        log(f"  {label:8s} OUT OF MEMORY: {err}")
        return {"error": f"out of memory: {err}"}
    datasheet = datasheet_tflops(device)
    r = summarize(times, peak, flops, tokens, matmul_flops_per_s, datasheet * 1e12 if datasheet else None)
    log(f"  {label:8s} {r['median_ms']:9.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f})  "
        f"MFU {100 * r['mfu']:5.1f}% (datasheet {_pct(r['mfu_datasheet'])})  {r['tokens_per_s']:,.0f} tok/s  "
        f"peak {_gib(r['peak_gib'])}")
    return r


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


# ---- training step ----------------------------------------------------------------------------------


TRAIN_DEFINITION = (
    "one step = forward + backward of mean(last_hidden_state^2) + mean(pooled^2) in the model's dtype, "
    "gradients set to None between steps, no optimizer; MFU counts 3x the forward FLOPs (recomputation "
    "under gradient checkpointing is not counted as useful work); peak = max_memory_allocated"
)


def bench_training(name: str, samples: list[list[int]], model: LlavaViTPackingModel, every: list[int],
                   args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                   matmul_flops_per_s: float) -> dict:
    """Training-step time and peak memory of the packed model for each checkpointing setting
    (``0`` none, ``k`` every k-th layer through ``gradient_checkpointing_kwargs={"every_k_layers": k}``)."""
    config = model.config
    grids = patch_grid(samples, config.patch_size)
    lengths = [t * h * w for t, h, w in grids]
    flops = 3 * count_flops(lengths, config)["total"]
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    pack = make_pack(samples, config.num_channels, config.patch_size, dtype, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        out = model(pack, grid_thw)
        loss = out.last_hidden_state.float().square().mean() + out.pooler_output.float().square().mean()
        loss.backward()
        for p in params:
            p.grad = None

    rows = {}
    model.train()
    for k in every:
        if k:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "every_k_layers": k})
        else:
            model.gradient_checkpointing_disable()
        free_memory(device)
        label = "none" if not k else ("every layer" if k == 1 else f"every {k} layers")
        rows[label] = time_model(f"train, checkpointing {label}", step, args, device, flops, sum(lengths),
                                 matmul_flops_per_s)
    model.gradient_checkpointing_disable()
    model.eval()
    return {"tokens": sum(lengths), "gflop_step": flops / 1e9, "checkpointing": rows}


# ---- report -----------------------------------------------------------------------------------------


def format_table(workloads: dict[str, dict]) -> str:
    """Workload, packed ms / MFU, baseline ms / MFU, the original packing anchor, speedups, cosine."""
    header = ("workload", "tokens", "packed ms", "MFU", "base ms", "MFU", "orig-pack ms*", "x base", "x orig*", "cosine")
    rows = []
    for name, r in workloads.items():
        packed, base, anchor = r.get("packed", {}), r.get("baseline", {}), r.get("anchor")
        orig_ms = anchor["original_packing"]["median_ms"] if anchor else None
        rows.append((
            name, str(r["tokens"]), _num(packed.get("median_ms")), _pct(packed.get("mfu")),
            _num(base.get("median_ms")), _pct(base.get("mfu")), _num(orig_ms),
            _num(r.get("speedup_vs_baseline"), "{:.2f}x"),
            _num(orig_ms / packed["median_ms"] if orig_ms and "median_ms" in packed else None, "{:.2f}x"),
            _num(r.get("numerics", {}).get("cosine_last_hidden_state"), "{:.5f}"),
        ))
    widths = [max(len(row[k]) for row in (header, *rows)) for k in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("* the original implementation's figures on an H100 (bench/anchor_h100.json), not this run")
    return "\n".join(lines)


def format_training_table(training: dict[str, dict]) -> str:
    """Workload, checkpointing setting, step ms, MFU (3x forward FLOPs) and peak GiB."""
    header = ("workload", "checkpointing", "step ms", "MFU", "peak GiB")
    rows = [(name, label, _num(r.get("median_ms")), _pct(r.get("mfu")), _num(r.get("peak_gib")))
            for name, w in training.items() for label, r in w["checkpointing"].items()]
    widths = [max(len(row[k]) for row in (header, *rows)) for k in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if k > 1 else cell.ljust(w) for k, (cell, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def anchor_entry(anchors: dict, name: str) -> dict | None:
    """The original implementation's figures for a workload, in this script's units."""
    if name not in anchors.get("results", {}):
        return None
    entry = anchors["results"][name]
    out = {"device": anchors.get("device"), "torch": anchors.get("torch"), "gflop": entry["gflop"]}
    for key, label in (("upstream_packing", "original_packing"), ("upstream_unpacked_source", "unpacked_source")):
        fig = entry[key]
        out[label] = {"median_ms": fig["median_s"] * 1e3, "min_ms": fig["min_s"] * 1e3, "max_ms": fig["max_s"] * 1e3,
                      "tokens_per_s": fig["tokens_per_s"], "mfu": fig["mfu_vs_ceiling"], "peak_gib": fig["peak_gib"]}
    return out


def environment(device: torch.device) -> dict:
    import timm
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "timm": timm.__version__, "python": platform.python_version(), "git_commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


# ---- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=None,
                        help="workload names (space or comma separated); default: all of bench/workloads.json")
    parser.add_argument("--variant", default="large", choices=sorted(VARIANTS), help="model size (default: large)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards before timing (default 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed forwards, at least 10 (default 10)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench", help="folder for JSON results and plot")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the unpacked source model and compare outputs (default: on)")
    parser.add_argument("--compile", action="store_true",
                        help="packed model through its compile_fused() path; baseline eager")
    parser.add_argument("--attn", default="auto", choices=ATTN_IMPLEMENTATIONS, help="packed attention backend")
    parser.add_argument("--fp8", action="store_true",
                        help="packed model with FP8 linear layers (llava_vit.model.fp8.quantize_fp8, needs torchao); baseline bf16")
    parser.add_argument("--fp8-keep-bf16", nargs="+", default=(), metavar="NAME_OR_LAYER",
                        help="with --fp8: linears (qkv, proj, fc1, fc2) or layer numbers (negative from the end) left in bf16")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time the latency workloads replayed as CUDA graphs (llava_vit.model.cuda_graphs)")
    parser.add_argument("--train", action="store_true",
                        help="also time a training step per batch workload (not the latency ones) for each --checkpoint-every setting")
    parser.add_argument("--checkpoint-every", type=int, nargs="+", default=[0, 1, 2, 4],
                        help="gradient checkpointing settings for --train: 0 none, k every k-th layer (default 0 1 2 4)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and workloads on the CPU (CI check of this script)")
    args = parser.parse_args(argv)
    if args.iters < 10:
        parser.error("--iters must be at least 10")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    if args.workloads is not None:
        args.workloads = [w for item in args.workloads for w in item.split(",") if w]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        device, arch, matmul_n = torch.device("cpu"), dict(TINY), 256
        patch, workloads = TINY["patch_size"], SMOKE_WORKLOADS
        anchors: dict = {}
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: this benchmark times GPU forwards (use --smoke for a CPU check of the script)")
        device, arch, matmul_n = torch.device("cuda"), dict(VARIANTS[args.variant]), 8192
        patch, workloads = load_workloads()
        workloads = {**workloads, **LATENCY_WORKLOADS}
        anchors = json.loads(ANCHOR_FILE.read_text()) if args.variant == "large" else {}
        if arch["patch_size"] != patch:
            sys.exit(f"variant {args.variant} has patch size {arch['patch_size']}; the workloads need {patch}")
    names = args.workloads or list(workloads)
    unknown = [n for n in names if n not in workloads]
    if unknown:
        sys.exit(f"unknown workloads {unknown}; known: {sorted(workloads)}")
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)

    report: dict = {
        "environment": environment(device),
        "settings": {"variant": "tiny" if args.smoke else args.variant, "arch": arch, "dtype": args.dtype,
                     "attn_requested": args.attn, "compile": args.compile, "warmup": args.warmup,
                     "iters": args.iters, "baseline": args.baseline, "smoke": args.smoke, "fp8": args.fp8,
                     "fp8_keep_bf16": list(args.fp8_keep_bf16),
                     "cuda_graphs": args.cuda_graphs, "train": args.train},
        "method": {"flop_formula": FLOP_FORMULA, "mfu": MFU_DEFINITION, "peak_memory": PEAK_DEFINITION,
                   "timing": "CUDA events around each forward under torch.inference_mode; median, min, max",
                   "baseline": "unpacked source model, same weights: one forward per distinct [t, h, w], "
                               "videos as (B, C, T, H, W) with all frames visible"},
        "workloads": {},
    }
    log(f"llava-vit bench on {report['environment']['device']} | torch {torch.__version__} | "
        f"{report['settings']['variant']} {args.dtype} | attn {args.attn} | compile {args.compile} | fp8 {args.fp8}")

    with torch.inference_mode():
        matmul_iters = max(args.iters, MATMUL_ITERS)
        report["matmul"] = matmul_rate(matmul_n, dtype, device, max(args.warmup, 10), matmul_iters)
    matmul_flops_per_s = report["matmul"]["tflops"] * 1e12
    log(f"matmul {matmul_n}^3 {args.dtype}: {report['matmul']['tflops']:.1f} TFLOP/s sustained "
        f"(fastest of {matmul_iters}; the MFU denominator), median {report['matmul']['median_tflops']:.1f}; "
        f"datasheet {report['matmul']['datasheet_tflops'] or 'unknown'}")
    free_memory(device)

    packed, source = build_models(arch, args.attn, dtype, device, args.baseline)  # outside inference mode: --train
    config = packed.config
    report["weights_gib"] = sum(p.numel() * p.element_size() for p in packed.parameters()) / 2**30
    log(f"model: {sum(p.numel() for p in packed.parameters()) / 1e6:.1f}M parameters, "
        f"{report['weights_gib']:.2f} GiB")
    if args.fp8:
        from llava_vit.model.fp8 import quantize_fp8

        keep = [int(item) if item.lstrip("-").isdigit() else item for item in args.fp8_keep_bf16]
        quantize_fp8(packed, keep_bf16=keep, compile=args.compile)
    elif args.compile:
        packed.compile_fused()

    with torch.inference_mode():
        for name in names:
            anchor = anchor_entry(anchors, name)
            result = bench_workload(name, workloads[name], packed, source, config, args, device, dtype,
                                    matmul_flops_per_s, anchor)
            if anchor is not None:
                result["anchor"] = anchor
            if args.cuda_graphs and name in LATENCY_WORKLOADS:
                result["cuda_graph"] = bench_cuda_graph(workloads[name], packed, args, device, dtype, matmul_flops_per_s)
            report["workloads"][name] = result
            (args.out / RESULTS_NAME).write_text(json.dumps(report, indent=2))
            free_memory(device)
    if args.train:
        report["method"]["training_step"] = TRAIN_DEFINITION
        report["training"] = {}
        for name in (n for n in names if n not in LATENCY_WORKLOADS):
            log(f"[{name}] training step")
            report["training"][name] = bench_training(name, workloads[name], packed, args.checkpoint_every, args,
                                                      device, dtype, matmul_flops_per_s)
            (args.out / RESULTS_NAME).write_text(json.dumps(report, indent=2))
            free_memory(device)

    log("\n" + format_table(report["workloads"]))
    if args.train:
        log("\n" + format_training_table(report["training"]))
    log(f"results: {args.out / RESULTS_NAME}")
    try:
        from plot import plot_results
    except ImportError as err:
        log(f"no plot ({err}); make it later with: python bench/plot.py {args.out / RESULTS_NAME}")
    else:
        plot_results(report, args.out / PLOT_NAME)
        log(f"plot: {args.out / PLOT_NAME}")
    return report


if __name__ == "__main__":
    main()
