#!/usr/bin/env python3
"""End-to-end encoding against the model alone: files in, a feature store out.

Generates a dataset (JPEGs of COCO-like size: sides 320-1024, and H.264 clips), then for each
case runs ``encode_files`` in a fresh process (so its peak host memory is its own) and, in this
process, the model alone on exactly the passes that run made (same grids, random pixels, inputs
already on the device, passes back to back). Reports end-to-end inputs/s against model-only
inputs/s, how busy the model was, bytes written per input and peak host memory (the encoding
process and its reader processes).

    python bench/encode_e2e.py --out outputs/e2e                    # ViT-L, bf16, one GPU
    python bench/encode_e2e.py --smoke --out /tmp/e2e               # tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent / "src"))

CASES = {  # name: (media, encode options)
    "images_pooled": ("images", {"save": "pooled"}),
    "images_all_bf16": ("images", {"save": "all", "save_dtype": "bfloat16"}),
    "videos_pooled": ("videos", {"save": "pooled"}),
    "videos_codec": ("videos", {"save": "pooled", "video_sampling": "codec", "patch_budget": 4096}),
    "images_pooled_quarter": ("images_quarter", {"save": "pooled"}),
}


def _image(args: tuple[int, Path]) -> int:
    """One JPEG of a random COCO-like size with smooth structure and texture (compresses like a photo)."""
    from PIL import Image

    seed, path = args
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(320, 1025, 2))
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(picture, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return (height // 14) * (width // 14)


def _clip(args: tuple[int, Path]) -> int:
    """One H.264 clip, 48-96 frames of 256-640 px: a textured background panned under a moving square."""
    from llava_vit.demo import write_video

    seed, path = args
    rng = np.random.default_rng(seed)
    width, height = (int(v) // 2 * 2 for v in rng.integers(256, 641, 2))
    frames_n = int(rng.integers(48, 97))
    background = np.clip(rng.normal(128, 40, (height + 64, width + 64, 3)), 0, 255).astype(np.uint8)
    frames = []
    for f in range(frames_n):
        frame = background[f % 64:f % 64 + height, f % 48:f % 48 + width].copy()
        x, y = (f * 5) % max(1, width - 64), (f * 3) % max(1, height - 64)
        frame[y:y + 64, x:x + 64] = (255, 40, 40)
        frames.append(frame)
    write_video(path, frames, fps=24)
    return frames_n


def make_dataset(folder: Path, images: int, videos: int, workers: int) -> dict:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "videos").mkdir(exist_ok=True)
    (folder / "images_quarter").mkdir(exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        tokens = list(pool.map(_image, [(i, folder / "images" / f"{i:06d}.jpg") for i in range(images)], chunksize=16))
        list(pool.map(_clip, [(10**6 + i, folder / "videos" / f"{i:05d}.mp4") for i in range(videos)]))
    for i in range(images // 4):
        (folder / "images_quarter" / f"{i:06d}.jpg").symlink_to(folder / "images" / f"{i:06d}.jpg")
    return {"images": images, "videos": videos, "image_tokens_floor": int(sum(tokens)),
            "seconds_to_make": round(time.perf_counter() - start, 1)}


def run_one(args: argparse.Namespace) -> None:
    """Child process: one ``encode_files`` run; prints its figures as JSON on the last line."""
    from llava_vit import encode_files
    from llava_vit.encoding.pipeline import collect_inputs, load_processor, read_samples

    options = json.loads(args.options)
    files, _ = collect_inputs([args.inputs])
    processor = load_processor(args.model, max_tokens=args.max_tokens, video_sampling=options.get("video_sampling"),
                               patch_budget=options.get("patch_budget"))
    workers = min(16, max(1, (os.cpu_count() or 2) - 2))
    start = time.perf_counter()
    read = sum(1 for _, sample, _ in read_samples(files, processor, None, workers) if sample is not None)
    readers_only = read / (time.perf_counter() - start)
    summary = encode_files(args.inputs, model=args.model, output=args.store, max_tokens=args.max_tokens,
                           device=args.device, progress=False, **options)
    codec_seconds = {}
    if options.get("video_sampling") == "codec":  # the cost of codec sampling, per clip, in this process
        costs = [processor.preprocess_file(f).codec.seconds for f in files[:8]]
        codec_seconds = {step: sum(c[step] for c in costs) / len(costs) for step in costs[0]}
    store_bytes = sum(f.stat().st_size for f in Path(args.store).rglob("*") if f.is_file())
    print(json.dumps({
        "encoded": summary.encoded, "failed": len(summary.failed), "passes": summary.passes,
        "tokens": summary.tokens, "seconds": summary.seconds, "busy": summary.busy,
        "inputs_per_s": summary.inputs_per_second, "store_bytes": store_bytes,
        "readers_only_inputs_per_s": readers_only, "codec_seconds_per_clip": codec_seconds, "startup_seconds": summary.startup_seconds, "starved_seconds": summary.starved_seconds,
        "bytes_per_input": store_bytes / max(1, summary.encoded),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reader_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "pass_grids": summary.pass_grids,
    }))


def model_only(model_name: str, device: str, pass_grids: list, frames_context: int, repeats: int = 2) -> list[float]:
    """Seconds for the model alone on ``pass_grids`` in order (inputs staged on the device beforehand),
    ``repeats`` times after the warm-up an encode run does: the first is what an encode run faces
    (every shape new), the later ones have every cuDNN plan cached."""
    import torch

    from llava_vit import LlavaViTPackingModel, packing_config
    from llava_vit.model.positions import compute_patch_positions_with_interpolated_temporal, interpolate_frame_indices

    config = packing_config(model_name) if not Path(model_name).is_dir() else None
    model = (LlavaViTPackingModel(config) if config else LlavaViTPackingModel.from_pretrained(model_name))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    p = model.config.patch_size
    staged = []
    for grids in pass_grids:
        positions = []
        for t, h, w in grids:
            slots = interpolate_frame_indices(torch.arange(t)[None], t, frames_context)
            positions.append(compute_patch_positions_with_interpolated_temporal(slots, h, w))
        n = sum(t * h * w for t, h, w in grids)
        staged.append((torch.randn(n, 3 * p * p, device=device, dtype=dtype),
                       torch.tensor(grids, dtype=torch.long), torch.cat(positions).to(device)))
    from llava_vit.encoding.pipeline import _warm_up
    from llava_vit.model import attention

    if device.startswith("cuda"):
        _warm_up(model)
    attention._EQUAL_SHAPES.clear()  # as in a fresh encode run: no shape seen yet
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for hidden, grid, positions in staged:
                out = model(hidden_states=hidden, grid_thw=grid, patch_positions=positions)
                if device.startswith("cuda"):  # what the pipeline adds: results to the host
                    out.pooler_output.to("cpu", non_blocking=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: OUT/data; made if missing)")
    parser.add_argument("--model", default="large")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few inputs")
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        return run_one(args)
    if args.smoke:
        args.model, args.device, args.images, args.videos = "small", "cpu", 24, 4
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    dataset = (json.loads((data / "dataset.json").read_text()) if (data / "dataset.json").is_file()
               else make_dataset(data, args.images, args.videos, os.cpu_count() or 1))
    (data / "dataset.json").write_text(json.dumps(dataset))
    import torch

    results = {"machine": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                           "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
               "model": args.model, "device": args.device, "max_tokens": args.max_tokens, "dataset": dataset,
               "cases": {}}
    for name in args.cases:
        media, options = CASES[name]
        store = args.out / f"store_{name}"
        subprocess.run(["rm", "-rf", str(store)], check=True)
        child = subprocess.run(
            [sys.executable, __file__, "--run-one", "--inputs", str(data / media), "--store", str(store),
             "--model", args.model, "--device", args.device, "--max-tokens", str(args.max_tokens),
             "--options", json.dumps(options), "--out", str(args.out)],
            capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"{name}: encode failed:\n{child.stderr[-4000:]}")
        run = json.loads(child.stdout.strip().splitlines()[-1])
        seconds, *again = model_only(args.model, args.device, run.pop("pass_grids"), 64)
        run.update(model_only_seconds=seconds, model_only_seconds_again=again,
                   model_only_inputs_per_s=run["encoded"] / seconds,
                   e2e_over_model=(run["encoded"] / run["seconds"]) / (run["encoded"] / seconds),
                   options=options)
        results["cases"][name] = run
        print(f"{name:<24} {run['encoded']:>5} inputs  e2e {run['inputs_per_s']:7.1f}/s  model-only "
              f"{run['model_only_inputs_per_s']:7.1f}/s  ratio {run['e2e_over_model']:.1%}  busy {run['busy']:.0%}  "
              f"{run['bytes_per_input'] / 1e3:9.2f} kB/input  peak RSS {run['peak_rss_mib']:.0f} MiB "
              f"(+ readers {run['reader_peak_rss_mib']:.0f} MiB each)  readers alone {run['readers_only_inputs_per_s']:.0f}/s  startup {run['startup_seconds']:.2f} s  "
              f"starved {run['starved_seconds']:.2f} s", flush=True)
        subprocess.run(["rm", "-rf", str(store)], check=True)
    (args.out / "encode_e2e.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
