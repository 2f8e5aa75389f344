"""Verification of a written packed folder against the source model it was converted from.

The source model runs every sample unpacked, in float32, and is the reference
(:func:`reference_outputs`); the written folder is then reloaded with ``from_pretrained`` and
run on packs of the same pictures (:func:`verify_folder`): a photo, two crops of it, an 8-frame
and a 4-frame video panning over it (videos in the source's 64-frame temporal context), alone
and packed together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..model.modeling import LlavaViTPackingModel
from ..model.positions import compute_patch_positions_with_interpolated_temporal, interpolate_frame_indices
from ..processing import CLIP_MEAN, CLIP_STD, patchify
from ..reference import video_in_context
from .checkpoint import ConversionError

FLOAT32_MAX_ABS = 1e-4
"""float32 passes when no output element differs from the source by more than this."""
LOW_PRECISION_MIN_COS = 0.999
"""bfloat16/float16 pass when every token and pooled vector has at least this cosine to the source."""


class VerificationError(ConversionError):
    """The written model does not reproduce the source model."""


def pass_rule(dtype: torch.dtype) -> str:
    """The pass rule of a written dtype, in words."""
    return f"max|diff| <= {FLOAT32_MAX_ABS:g}" if dtype == torch.float32 else f"cos min >= {LOW_PRECISION_MIN_COS}"


@dataclass
class Sample:
    """Normalized pixels ``(T, C, H, W)`` of one verification input (an image when ``T == 1``)."""

    name: str
    pixels: torch.Tensor

    def grid(self, patch_size: int) -> tuple[int, int, int]:
        t, _, height, width = self.pixels.shape
        return t, height // patch_size, width // patch_size

    def slots(self) -> torch.Tensor:
        """``[1, T]`` slots of the frames in the source's 64-frame temporal context."""
        t = self.pixels.shape[0]
        return interpolate_frame_indices(torch.arange(t)[None], torch.tensor([t]))


@dataclass
class Stats:
    """How far one output is from the source's: max abs difference, min and mean cosine over rows."""

    max_abs: float
    cos_min: float
    cos_mean: float

    @classmethod
    def compare(cls, actual: torch.Tensor, expected: torch.Tensor) -> Stats:
        actual, expected = actual.float(), expected.float()
        cos = F.cosine_similarity(actual, expected, dim=-1)
        return cls((actual - expected).abs().max().item(), cos.min().item(), cos.mean().item())

    def passes(self, dtype: torch.dtype) -> bool:
        if dtype == torch.float32:
            return self.max_abs <= FLOAT32_MAX_ABS
        return self.cos_min >= LOW_PRECISION_MIN_COS


@dataclass
class CheckResult:
    """One verification pack: its samples, token count, per-output statistics and verdict."""

    name: str
    samples: list[str]
    tokens: int
    outputs: dict[str, Stats]
    passed: bool

    def lines(self) -> list[str]:
        head = f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {', '.join(self.samples)} ({self.tokens} tokens)"
        return [head] + [
            f"       {name:<18} max|diff| {s.max_abs:.2e}  cos min {s.cos_min:.6f}  mean {s.cos_mean:.6f}"
            for name, s in self.outputs.items()
        ]


def load_photo() -> tuple[Image.Image, str]:
    """matplotlib's sample photo ``grace_hopper.jpg``, or without matplotlib a deterministic synthetic image."""
    try:
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        return Image.open(path).convert("RGB"), "photo grace_hopper.jpg (matplotlib sample data)"
    except (ImportError, OSError, ValueError):
        height, width = 600, 512
        y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
        noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
        rgb = 0.8 * torch.stack((x, y, 0.5 + 0.5 * torch.sin(12 * x + 7 * y))) + 0.2 * noise
        pixels = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels), "synthetic image (matplotlib is not installed, so no sample photo)"


def normalized_crop(image: Image.Image, box: tuple[float, float, float, float], size_hw: tuple[int, int]) -> torch.Tensor:
    """CLIP-normalized ``(C, H, W)`` pixels of ``box`` (left, top, right, bottom fractions) at ``size_hw``."""
    width, height = image.size
    crop = image.crop((round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)))
    resized = crop.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).reshape(size_hw[0], size_hw[1], 3)
    pixels = pixels.permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def panning_video(image: Image.Image, frames: int, side: float, size_hw: tuple[int, int]) -> torch.Tensor:
    """``(T, C, H, W)``: a window of ``side`` (fraction) panning from the top-left to the bottom-right corner."""
    steps = [i / max(frames - 1, 1) * (1 - side) for i in range(frames)]
    return torch.stack([normalized_crop(image, (s, s, s + side, s + side), size_hw) for s in steps])


def verification_samples(patch_size: int) -> tuple[list[Sample], str]:
    """The photo at about 224 px, two crops of it, an 8-frame and a 4-frame video panning over it."""
    image, source = load_photo()
    width, height = image.size
    p = patch_size
    photo = (max(1, round(16 * height / width)) * p, 16 * p)
    samples = [
        Sample(f"photo {photo[0]}x{photo[1]}", normalized_crop(image, (0, 0, 1, 1), photo)[None]),
        Sample(f"video 8x{8 * p}x{8 * p}", panning_video(image, 8, 0.6, (8 * p, 8 * p))),
        Sample(f"crop {10 * p}x{14 * p}", normalized_crop(image, (0.0, 0.1, 0.7, 0.6), (10 * p, 14 * p))[None]),
        Sample(f"crop {6 * p}x{9 * p}", normalized_crop(image, (0.5, 0.55, 1.0, 0.9), (6 * p, 9 * p))[None]),
        Sample(f"video 4x{6 * p}x{10 * p}", panning_video(image, 4, 0.5, (6 * p, 10 * p))),
    ]
    return samples, f"{source}; videos pan over it"


@torch.no_grad()
def source_outputs(
    model: torch.nn.Module, sample: Sample, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens (N, D), pooled (1, D) or None)`` of the source model on one sample.

    An image goes in as ``(1, C, H, W)``; a video as the source saw it in training: the 64-frame
    context with the frames at their slots (:func:`llava_vit.reference.video_in_context`).
    """
    pixels = sample.pixels.to(device)
    if pixels.shape[0] == 1:
        out = model(pixels)
    else:
        padded, visible = video_in_context(pixels.transpose(0, 1)[None], sample.slots().to(device), model.config.patch_size)
        out = model(padded, visible_indices=visible)
    if "visible_embeddings" in out:
        return out["visible_embeddings"][0], out.get("head_output")
    return out.last_hidden_state[0], out.pooler_output


def pack_samples(samples: list[Sample], patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``hidden_states``, ``grid_thw``, ``patch_positions`` (videos at their 64-frame slots)."""
    rows, grids, positions = [], [], []
    for sample in samples:
        t, h, w = sample.grid(patch_size)
        rows.append(patchify(sample.pixels.transpose(0, 1), patch_size))
        grids.append((t, h, w))
        positions.append(compute_patch_positions_with_interpolated_temporal(sample.slots(), h, w))
    return torch.cat(rows), torch.tensor(grids), torch.cat(positions)


@dataclass
class Reference:
    """The source model's outputs on the verification samples: per sample name ``(tokens, pooled)``."""

    samples: list[Sample]
    description: str
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]]


@torch.no_grad()
def reference_outputs(source: torch.nn.Module, device: torch.device) -> Reference:
    """Run ``source`` (float32, from :func:`llava_vit.convert.checkpoint.source_model`) on every sample.

    Computed before the packed folder is loaded, so the two models are never on ``device``
    together (``source`` is released when the caller keeps no reference to it). On CUDA, TF32 is
    off meanwhile so a float32 comparison measures the conversion, not the matmul precision.
    """
    config = source.config
    if config.num_channels != 3:
        raise ConversionError(
            f"verification feeds RGB pictures but the model has {config.num_channels} input channels; "
            f"pass --no-verify to convert without it"
        )
    samples, description = verification_samples(config.patch_size)
    with _no_tf32():
        source = source.to(device)
        return Reference(samples, description, {s.name: source_outputs(source, s, device) for s in samples})


@torch.no_grad()
def verify_folder(
    folder: Path, reference: Reference, dtype: torch.dtype, device: torch.device, log=print
) -> list[CheckResult]:
    """Reload ``folder`` in ``dtype`` on ``device`` and compare it with the source's ``reference``
    outputs on four packs; return one result per pack."""
    log(f"verifying on {device} ({str(dtype).removeprefix('torch.')} vs float32 source); inputs: {reference.description}")
    photo, video, crop_a, crop_b, video_b = reference.samples
    checks = [
        ("photo", [photo]),
        ("8-frame video in the 64-frame context", [video]),
        ("image + video pack", [photo, video]),
        ("3 images + 2 videos pack", [photo, crop_a, crop_b, video, video_b]),
    ]
    with _no_tf32():
        packed = LlavaViTPackingModel.from_pretrained(folder, dtype=dtype).to(device).eval()
        results = []
        for name, members in checks:
            hidden_states, grid_thw, positions = pack_samples(members, packed.config.patch_size)
            out = packed(hidden_states.to(device), grid_thw, positions)
            tokens = torch.cat([reference.outputs[s.name][0] for s in members])
            outputs = {"last_hidden_state": Stats.compare(out.last_hidden_state, tokens)}
            if out.pooler_output is not None:
                pooled = torch.cat([reference.outputs[s.name][1] for s in members])
                outputs["pooler_output"] = Stats.compare(out.pooler_output, pooled)
            passed = all(s.passes(dtype) for s in outputs.values())
            results.append(CheckResult(name, [s.name for s in members], hidden_states.shape[0], outputs, passed))
            for line in results[-1].lines():
                log("  " + line)
    return results


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
