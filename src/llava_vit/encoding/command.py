"""``llava-vit encode``: images and videos in, patch features and pooled vectors out.

Inputs are read and preprocessed in background threads while the model runs, packed greedily in
input order into forward passes of at most ``--max-tokens`` tokens (an input larger than that
runs alone), and written as one safetensors file per input plus ``index.json``. An input that
cannot be read is reported and skipped; the command exits non-zero when any input failed.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file
from tqdm import tqdm

from ..model.modeling import LlavaViTPackingModel
from ..processing import LlavaViTPackingImageProcessor, PackedSample, VIDEO_EXTENSIONS, is_video_file, split_packed
from ..validation import check_positive_int, resolve_device
from ..model.variants import PACKING_MODEL_NAMES, VARIANTS, packing_config

RANDOM_WEIGHTS_SEED = 0
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
"""Files picked from folders and glob patterns (files named one by one are always tried)."""
_PANEL = 320
"""Longest side, in pixels, of each frame and feature map in the pictures."""
_PAIRS_PER_ROW = 2


@dataclass
class Encoder:
    """A model ready to encode, with its processor and an honest description of its weights."""

    model: LlavaViTPackingModel
    processor: LlavaViTPackingImageProcessor
    name: str
    random_weights: bool

    @property
    def weights(self) -> str:
        return f"random weights (seed {RANDOM_WEIGHTS_SEED})" if self.random_weights else "checkpoint weights"


def load_encoder(model: str, device: torch.device, dtype: torch.dtype) -> Encoder:
    """A converted model folder (with its ``preprocessor_config.json`` when present), or a variant
    name (``small``, ``hf_llava_vit_packing_small_ln``, ...) built with seeded random weights."""
    folder = Path(model)
    if folder.is_dir():
        net = LlavaViTPackingModel.from_pretrained(folder)
        if (folder / PREPROCESSOR_CONFIG).is_file():
            processor = LlavaViTPackingImageProcessor.from_pretrained(folder)
        else:
            processor = LlavaViTPackingImageProcessor(patch_size=net.config.patch_size)
        name, random_weights = str(folder), False
    else:
        if model not in VARIANTS and model not in PACKING_MODEL_NAMES:
            raise ValueError(
                f"--model {model!r} is neither a model folder nor a variant name; variants: "
                f"{', '.join(VARIANTS)} (or hf_llava_vit_packing_<size>_ln)"
            )
        config = packing_config(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net = LlavaViTPackingModel(config)
        processor = LlavaViTPackingImageProcessor(patch_size=config.patch_size)
        name = model if model in PACKING_MODEL_NAMES else f"hf_llava_vit_packing_{model}_ln"
        random_weights = True
    if processor.patch_size != net.config.patch_size:
        raise ValueError(
            f"{PREPROCESSOR_CONFIG} has patch_size={processor.patch_size} but the model's is {net.config.patch_size}"
        )
    return Encoder(net.to(device=device, dtype=dtype).eval(), processor, name, random_weights)


def collect_inputs(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively, media files only) and glob patterns, in order and without
    repeats. Returns ``(files, failures)``; a name that matches nothing is a failure."""
    files: list[Path] = []
    failures: list[tuple[str, str]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = _media_files(p for p in path.rglob("*") if p.is_file())
        elif glob.has_magic(spec):
            found = _media_files(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        else:
            failures.append((spec, "no such file or folder"))
            continue
        if not found:
            failures.append((spec, "no image or video files found"))
        files += found
    unique: list[Path] = []
    seen: set[Path] = set()
    for file in files:
        if file.resolve() not in seen:
            seen.add(file.resolve())
            unique.append(file)
    return unique, failures


def _media_files(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if p.suffix.lower() in MEDIA_EXTENSIONS and not p.name.startswith("."))


def _prefetched(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """``fn`` over ``items`` in background threads, yielded in order, at most ``2 * workers`` ahead."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pca_colors(features: torch.Tensor) -> torch.Tensor:
    """``(n, 3)`` colours in ``[0, 1]``: the first three principal components of ``(n, D)`` features,
    each stretched between its 1st and 99th percentile."""
    x = features.double()
    x = x - x.mean(0)
    _, vectors = torch.linalg.eigh(x.T @ x)
    projected = x @ vectors[:, -3:].flip(-1)
    low, high = torch.quantile(projected, torch.tensor([0.01, 0.99], dtype=projected.dtype), dim=0)
    return ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1).float()


def feature_picture(frames: np.ndarray, features: torch.Tensor, grid_thw: Sequence[int], caption: str) -> Image.Image:
    """Each frame beside its patch features' first three principal components shown as RGB (PCA over
    all frames of the input together), ``_PAIRS_PER_ROW`` pairs a row, under a caption."""
    t, h, w = grid_thw
    colors = (pca_colors(features).reshape(t, h, w, 3) * 255).round().to(torch.uint8).numpy()
    height, width = frames.shape[1:3]
    scale = _PANEL / max(height, width)
    panel = (max(1, round(width * scale)), max(1, round(height * scale)))
    pairs = [
        (Image.fromarray(frame).resize(panel, Image.Resampling.BICUBIC),
         Image.fromarray(pca).resize(panel, Image.Resampling.NEAREST))
        for frame, pca in zip(frames, colors)
    ]
    font = ImageFont.load_default(13)
    text_box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), caption, font=font, spacing=2)
    gap, header = 4, text_box[3] + 8
    columns = min(len(pairs), _PAIRS_PER_ROW)
    rows = -(-len(pairs) // columns)
    pair_width = 2 * panel[0] + gap
    width = max(columns * (pair_width + 3 * gap) - 3 * gap, text_box[2] + 8)
    canvas = Image.new("RGB", (width, header + rows * (panel[1] + gap)), "white")
    for i, (frame, pca) in enumerate(pairs):
        x = (i % columns) * (pair_width + 3 * gap)
        y = header + (i // columns) * (panel[1] + gap)
        canvas.paste(frame, (x, y))
        canvas.paste(pca, (x + panel[0] + gap, y))
    ImageDraw.Draw(canvas).multiline_text((4, 3), caption, fill="black", font=font, spacing=2)
    return canvas


class _Writer:
    """Writes each encoded input (features, picture) and keeps the entries of ``index.json``."""

    def __init__(self, output: Path, encoder: Encoder, visualize: bool):
        self.output, self.encoder, self.visualize = output, encoder, visualize
        self.entries: list[dict] = []
        self._stems: set[str] = set()

    def _stem(self, path: Path) -> str:
        stem, n = path.stem, 1
        while stem in self._stems:
            stem, n = f"{path.stem}-{n}", n + 1
        self._stems.add(stem)
        return stem

    def write(self, path: Path, kind: str, sample: PackedSample, features: torch.Tensor,
              pooled: torch.Tensor | None) -> None:
        stem = self._stem(path)
        tensors = {
            "patch_features": features.contiguous(),
            "grid_thw": torch.tensor(sample.grid_thw, dtype=torch.long),
            "patch_positions": sample.patch_positions.contiguous(),
            "frame_indices": torch.tensor(sample.frame_indices, dtype=torch.long),
        }
        if pooled is not None:
            tensors["pooled"] = pooled.contiguous()
        height, width = sample.original_size
        metadata = {
            "source": str(path.resolve()),
            "kind": kind,
            "model": self.encoder.name,
            "weights": self.encoder.weights,
            "original_size": f"{width}x{height}",
            "total_frames": str(sample.total_frames),
        }
        save_file(tensors, str(self.output / f"{stem}.safetensors"), metadata=metadata)
        entry = {
            "source": metadata["source"],
            "kind": kind,
            "features": f"{stem}.safetensors",
            "grid_thw": list(sample.grid_thw),
            "tokens": sample.num_tokens,
            "frame_indices": list(sample.frame_indices),
        }
        if self.visualize:
            frames_note = f", frames {list(sample.frame_indices)} of {sample.total_frames}" if kind == "video" else ""
            caption = (
                f"{path.name}  {kind} {width}x{height}{frames_note} -> grid t,h,w = {tuple(sample.grid_thw)}\n"
                f"{self.encoder.name}, {self.encoder.weights} | left: input as encoded, "
                f"right: patch features' PCA 1-3 as RGB"
            )
            frames = self.encoder.processor.to_pixels(sample.hidden_states, sample.grid_thw)
            feature_picture(frames, features, sample.grid_thw, caption).save(self.output / f"{stem}.png")
            entry["picture"] = f"{stem}.png"
        self.entries.append(entry)


def _read(processor: LlavaViTPackingImageProcessor, num_frames: int | None, path: Path):
    """``(path, kind, sample or None, error or None)``. Any failure to read one input is reported,
    not raised, so that the other inputs go on."""
    kind = "video" if is_video_file(path) else "image"
    try:
        sample = processor.preprocess_video(path, num_frames) if kind == "video" else processor.preprocess_image(path)
    except Exception as error:  # noqa: BLE001 - one unreadable input must not stop the rest
        return path, kind, None, f"{type(error).__name__}: {error}"
    return path, kind, sample, None


def _batches(samples: Iterable[tuple[Path, str, PackedSample]], max_tokens: int) -> Iterator[list]:
    """Greedy packing in input order: a batch closes when the next sample would pass ``max_tokens``."""
    batch: list = []
    size = 0
    for item in samples:
        if batch and size + item[2].num_tokens > max_tokens:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[2].num_tokens
    if batch:
        yield batch


def run_encode(args: argparse.Namespace) -> int:
    """The ``encode`` subcommand (arguments: see :func:`llava_vit.cli.build_parser`). Returns the exit status."""
    try:
        check_positive_int("--max-tokens", args.max_tokens)
        if args.frames is not None:
            check_positive_int("--frames", args.frames)
        device = resolve_device(args.device)
        default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
        encoder = load_encoder(args.model, device, dtype)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"llava-vit encode: error: {error}", file=sys.stderr)
        return 2
    files, failures = collect_inputs(args.inputs)
    for spec, reason in failures:
        print(f"skipped {spec}: {reason}", file=sys.stderr)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    label = f"{encoder.name}, {encoder.weights}"
    if encoder.random_weights:
        label += " - RANDOM WEIGHTS: the features only exercise the pipeline"
    print(f"model: {label}\ndevice: {device}, dtype: {str(dtype).removeprefix('torch.')}; {len(files)} inputs")

    writer = _Writer(output, encoder, args.visualize)
    passes, tokens, start = 0, 0, time.perf_counter()
    with tqdm(total=len(files), unit="input", desc="encoding", file=sys.stderr) as bar:

        def readable() -> Iterator[tuple[Path, str, PackedSample]]:
            read = functools.partial(_read, encoder.processor, args.frames)
            for path, kind, sample, error in _prefetched(read, files, workers=min(8, os.cpu_count() or 1)):
                if error is None:
                    yield path, kind, sample
                    continue
                failures.append((str(path), error))
                bar.write(f"skipped {path}: {error}", file=sys.stderr)
                bar.update(1)

        for batch in _batches(readable(), args.max_tokens):
            inputs = encoder.processor.pack([sample for _, _, sample in batch])
            with torch.inference_mode():
                out = encoder.model(**inputs)
            features = split_packed(out.last_hidden_state.float().cpu(), inputs["grid_thw"])
            pooled = out.pooler_output.float().cpu() if out.pooler_output is not None else [None] * len(batch)
            for (path, kind, sample), feats, pool in zip(batch, features, pooled):
                writer.write(path, kind, sample, feats, pool)
            passes += 1
            tokens += inputs["hidden_states"].shape[0]
            bar.update(len(batch))
    elapsed = time.perf_counter() - start

    index = {
        "model": encoder.name,
        "weights": encoder.weights,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "max_tokens": args.max_tokens,
        "frames": args.frames or encoder.processor.num_frames,
        "inputs": writer.entries,
        "failed": [{"source": spec, "error": reason} for spec, reason in failures],
    }
    (output / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(
        f"encoded {len(writer.entries)} of {len(writer.entries) + len(failures)} inputs in {passes} forward "
        f"pass{'' if passes == 1 else 'es'} ({tokens} tokens, {elapsed:.1f} s) with {label}\nwrote {output}/ (index.json, one .safetensors"
        f"{' and .png' if args.visualize else ''} per input)"
    )
    if failures:
        print(f"FAILED {len(failures)}:", file=sys.stderr)
        for spec, reason in failures:
            print(f"  {spec}: {reason}", file=sys.stderr)
        return 1
    return 0
