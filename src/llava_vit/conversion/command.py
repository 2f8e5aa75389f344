"""``llava-vit convert``: a source checkpoint to a packed model folder that has been checked.

The folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) is written
into a temporary folder beside the target, reloaded with ``from_pretrained`` and compared with
the source model built from the same file on a photo, a video in the 64-frame context and mixed
packs; only then is it renamed into place. Any failure leaves no output behind.

Exit codes: 0 written (and verified), 1 not converted (the message says why), 3 verification
failed (nothing written).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from ..model.configuration import LlavaViTConfig, LlavaViTPackingConfig
from .convert import (
    ARCH_FIELDS,
    ConversionError,
    build_source_model,
    convert_state_dict,
    infer_architecture,
    read_checkpoint,
)
from ..model.modeling import LlavaViTPackingModel
from ..model.positions import (
    SOURCE_TEMPORAL_CONTEXT,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)
from ..processing import CLIP_MEAN, CLIP_STD, LlavaViTPackingImageProcessor, patchify
from ..validation import resolve_device
from ..model.variants import PACKING_MODEL_NAMES, SOURCE_MODEL_NAMES, packing_config, source_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS_FIELDS = ("layer_norm_eps", "head_norm_eps")
FLOAT32_MAX_ABS = 1e-4
"""float32 passes when no output element differs from the source by more than this."""
LOW_PRECISION_MIN_COS = 0.999
"""bfloat16/float16 pass when every token and pooled vector has at least this cosine to the source."""


class VerificationError(ConversionError):
    """The written model does not reproduce the source model."""


# ---- architecture -----------------------------------------------------------------------------


def named_config(name: str) -> LlavaViTConfig | LlavaViTPackingConfig:
    """The architecture of a source (``llava_vit_<size>_ln``) or packed (``hf_llava_vit_packing_<size>_ln``) name."""
    if name in SOURCE_MODEL_NAMES:
        return source_config(name)
    if name in PACKING_MODEL_NAMES:
        return packing_config(name)
    raise ConversionError(
        f"--model-name {name!r} is not a known variant; expected one of "
        f"{sorted(SOURCE_MODEL_NAMES) + sorted(PACKING_MODEL_NAMES)}"
    )


def read_config_json(path: str | Path) -> dict:
    """Architecture fields of a ``--config`` JSON; other config fields are ignored, unknown ones refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"--config {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"--config {path} must hold a JSON object of config fields, got {type(data).__name__}")
    known = set(LlavaViTPackingConfig().to_dict()) | set(LlavaViTConfig().to_dict()) | {"auto_map", "torch_dtype"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConversionError(
            f"--config {path}: unknown fields {unknown}; expected LlavaViTPackingConfig fields "
            f"such as {list(ARCH_FIELDS)}"
        )
    return {k: v for k, v in data.items() if k in ARCH_FIELDS + EPS_FIELDS}


def architecture_override(
    state: dict[str, torch.Tensor], layout: str, hf_config: dict | None, model_name: str | None, config_file: str | None
) -> tuple[LlavaViTConfig | LlavaViTPackingConfig | None, str | None]:
    """The config given on the command line (a ``--config`` completes the tensor shapes), and its description.

    Refuses a head count that nothing decides: shapes of no known variant, no HF ``config.json``,
    and neither option giving ``num_attention_heads``.
    """
    if model_name:
        return named_config(model_name), f"--model-name {model_name}"
    shapes, how = infer_architecture(state, layout)
    if config_file:
        fields = {**shapes, **read_config_json(config_file)}
        if "num_attention_heads" not in fields:
            reason = f"--config {config_file} does not give num_attention_heads"
            raise ConversionError(_ambiguous_message(shapes, reason))
        try:
            return LlavaViTPackingConfig(**fields), f"--config {config_file} + tensor shapes"
        except ValueError as err:
            raise ConversionError(f"--config {config_file}: {err}") from err
    if how == "ambiguous" and hf_config is None:
        raise ConversionError(_ambiguous_message(shapes, "neither --model-name nor --config was given"))
    return None, None


def _ambiguous_message(shapes: dict, reason: str) -> str:
    return (
        f"ambiguous architecture: the head count is in no tensor shape, these shapes (hidden_size="
        f"{shapes['hidden_size']}, layers={shapes['num_hidden_layers']}, intermediate_size="
        f"{shapes['intermediate_size']}, patch_size={shapes['patch_size']}) match no known variant, and {reason}; "
        f'pass --config FILE.json with e.g. {{"num_attention_heads": {max(1, shapes["hidden_size"] // 64)}}}'
    )


@dataclass
class ConvertedSource:
    """A checkpoint in the packed layout (the model holds the checkpoint's tensors), and how it was read."""

    model: LlavaViTPackingModel
    layout: str
    architecture_from: str
    eps_from: str
    temporal_context: int = SOURCE_TEMPORAL_CONTEXT

    def lines(self) -> list[str]:
        """What was read, the architecture and where it came from, the norm epsilons and where they came from."""
        c = self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        norm = "RMSNorm" if c.layer_norm_type == "rms_norm" else "LayerNorm"
        return [
            f"source layout: {self.layout} ({params / 1e6:.1f}M parameters, {dtype})",
            f"architecture ({self.architecture_from}): hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
            f"{c.num_attention_heads} heads, MLP {c.intermediate_size}, patch {c.patch_size}, {norm}, "
            f"{'attention-pooling head' if c.use_head else 'no pooling head'}",
            f"norm eps ({self.eps_from}): body {_eps(c.layer_norm_eps)}, head {_eps(c.head_norm_eps)}",
        ]


def convert_source(src: str | Path, model_name: str | None = None, config_file: str | None = None) -> ConvertedSource:
    """Read ``src`` and convert it, the architecture from ``--model-name``/``--config`` or the checkpoint itself."""
    state, layout, hf_config = read_checkpoint(src)
    if layout == "packing":
        raise ConversionError(
            f"{src} is already in the packed layout (patch_embed.proj.weight); load it with "
            f"LlavaViTPackingModel.from_pretrained instead of converting it"
        )
    config, given = architecture_override(state, layout, hf_config, model_name, config_file)
    try:
        model, found = convert_state_dict(state, layout, hf_config, config, what=f"checkpoint {src}")
    except ConversionError as err:
        raise ConversionError(f"{err} (architecture from {given})" if given else str(err)) from err
    if layout == "timm_source":
        eps_from = "the timm source's PyTorch defaults"
    elif hf_config is not None:
        eps_from = "the folder's config.json"
    else:
        eps_from = f"{given}: HF-layout weights without a config.json" if given else "HF default: no config.json given"
    temporal_context = (hf_config or {}).get("rope_temporal_size", SOURCE_TEMPORAL_CONTEXT)
    return ConvertedSource(model, layout, given or found, eps_from, temporal_context)


def _eps(value: float | None) -> str:
    return "None = machine epsilon" if value is None else f"{value:g}"


# ---- writing ----------------------------------------------------------------------------------


def write_packing_folder(
    model: LlavaViTPackingModel, folder: Path, dtype: torch.dtype, temporal_context: int = SOURCE_TEMPORAL_CONTEXT
) -> int:
    """Write ``config.json``, ``model.safetensors`` in ``dtype`` and ``preprocessor_config.json``.

    The preprocessor config is :class:`LlavaViTPackingImageProcessor`'s defaults (CLIP mean/std,
    8 frames) with the model's patch size and the source's temporal context (an HF folder's
    ``rope_temporal_size``, else 64 frames).

    Returns the size of the weights in bytes. Memory peaks at the model plus its cast copy (none
    when the dtype is unchanged).
    """
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config.save_pretrained(folder)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    LlavaViTPackingImageProcessor(patch_size=config.patch_size, temporal_context=temporal_context).save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_output_dir(output_dir: str | Path, src: str | Path, overwrite: bool) -> Path:
    """The absolute output folder, refused when it is a file, non-empty without ``overwrite``, or holds the source."""
    output = Path(output_dir).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"--output-dir {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"--output-dir {output} exists and is not empty; pass --overwrite to replace it")
        source = Path(src).expanduser().resolve()
        if source == output or output in source.parents:
            raise ConversionError(f"--output-dir {output} holds the source {src}: --overwrite would delete it")
    return output


@contextlib.contextmanager
def staged_folder(output: Path) -> Iterator[Path]:
    """A fresh folder beside ``output`` that replaces ``output`` when the block succeeds.

    On any error it is removed, with any parent folders created for it, and an existing
    ``output`` stays as it was.
    """
    created = next((p for p in reversed([output.parent, *output.parent.parents]) if not p.exists()), None)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    try:
        yield staging
        _make_readable(staging)
        _replace_folder(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """Give written files the umask's default mode (safetensors creates its file owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_folder(staging: Path, output: Path) -> None:
    if not output.exists():
        os.rename(staging, output)
        return
    old = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.old")
    os.rename(output, old)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old)


# ---- verification -----------------------------------------------------------------------------


@dataclass
class Sample:
    """Normalized pixels ``(T, C, H, W)`` of one verification input (an image when ``T == 1``)."""

    name: str
    pixels: torch.Tensor

    def grid(self, patch_size: int) -> tuple[int, int, int]:
        t, _, height, width = self.pixels.shape
        return t, height // patch_size, width // patch_size


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


def _normalized(image: Image.Image, box: tuple[float, float, float, float], size_hw: tuple[int, int]) -> torch.Tensor:
    """CLIP-normalized ``(C, H, W)`` pixels of ``box`` (left, top, right, bottom fractions) at ``size_hw``."""
    width, height = image.size
    crop = image.crop((round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)))
    resized = crop.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).reshape(size_hw[0], size_hw[1], 3)
    pixels = pixels.permute(2, 0, 1).float() / 255
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def _pan(image: Image.Image, frames: int, side: float, size_hw: tuple[int, int]) -> torch.Tensor:
    """A ``frames``-frame video panning a window of ``side`` (fraction) from the top-left to the bottom-right corner."""
    steps = [i / max(frames - 1, 1) * (1 - side) for i in range(frames)]
    return torch.stack([_normalized(image, (s, s, s + side, s + side), size_hw) for s in steps])


def verification_samples(patch_size: int) -> tuple[list[Sample], str]:
    """The photo at about 224 px, two crops of it, an 8-frame and a 4-frame video panning over it."""
    image, source = load_photo()
    width, height = image.size
    p = patch_size
    photo = (max(1, round(16 * height / width)) * p, 16 * p)
    samples = [
        Sample(f"photo {photo[0]}x{photo[1]}", _normalized(image, (0, 0, 1, 1), photo)[None]),
        Sample(f"video 8x{8 * p}x{8 * p}", _pan(image, 8, 0.6, (8 * p, 8 * p))),
        Sample(f"crop {10 * p}x{14 * p}", _normalized(image, (0.0, 0.1, 0.7, 0.6), (10 * p, 14 * p))[None]),
        Sample(f"crop {6 * p}x{9 * p}", _normalized(image, (0.5, 0.55, 1.0, 0.9), (6 * p, 9 * p))[None]),
        Sample(f"video 4x{6 * p}x{10 * p}", _pan(image, 4, 0.5, (6 * p, 10 * p))),
    ]
    return samples, f"{source}; videos pan over it"


def _context_slots(frames: int) -> torch.Tensor:
    """``[1, frames]`` slots of the frames in the source's 64-frame temporal context."""
    return interpolate_frame_indices(torch.arange(frames)[None], torch.tensor([frames]))


@torch.no_grad()
def source_outputs(
    model: torch.nn.Module, sample: Sample, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tokens (N, D), pooled (1, D) or None)`` of the source model, fed as the seed's consistency example does.

    An image goes in as ``(1, C, H, W)``; a video as the 64-frame context with its frames at their
    slots (zeros elsewhere) plus ``visible_indices`` selecting the frames' tokens.
    """
    t, h, w = sample.grid(model.config.patch_size)
    pixels = sample.pixels.to(device)
    if t == 1:
        out = model(pixels)
    else:
        slots = _context_slots(t)[0].to(device)
        padded = pixels.new_zeros(1, pixels.shape[1], SOURCE_TEMPORAL_CONTEXT, *pixels.shape[2:])
        padded[0, :, slots] = pixels.transpose(0, 1)
        visible = (slots[:, None] * h * w + torch.arange(h * w, device=device)).reshape(1, -1)
        out = model(padded, visible_indices=visible)
    if "visible_embeddings" in out:
        return out["visible_embeddings"][0], out.get("head_output")
    return out.last_hidden_state[0], out.pooler_output


def pack_samples(samples: list[Sample], patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``hidden_states``, ``grid_thw``, ``patch_positions`` (videos at their 64-frame slots)."""
    rows, grids, positions = [], [], []
    p = patch_size
    for sample in samples:
        t, h, w = sample.grid(p)
        rows.append(patchify(sample.pixels.transpose(0, 1), p))
        grids.append((t, h, w))
        positions.append(compute_patch_positions_with_interpolated_temporal(_context_slots(t), h, w))
    return torch.cat(rows), torch.tensor(grids), torch.cat(positions)


@torch.no_grad()
def verify_folder(
    folder: Path, src: str | Path, dtype: torch.dtype, device: torch.device, log=print
) -> list[CheckResult]:
    """Reload ``folder`` and compare it with the source model of ``src`` on four packs; return one result per pack.

    The source runs in float32 and is the reference. On CUDA, TF32 is switched off meanwhile so a
    float32 comparison measures the conversion, not the matmul precision.
    """
    packed_config = LlavaViTPackingConfig.from_pretrained(folder)
    if packed_config.num_channels != 3:
        raise ConversionError(
            f"verification feeds RGB pictures but the model has {packed_config.num_channels} input channels; "
            f"pass --no-verify to convert without it"
        )
    samples, inputs = verification_samples(packed_config.patch_size)
    log(f"verifying on {device} ({str(dtype).removeprefix('torch.')} vs float32 source); inputs: {inputs}")
    photo, video, crop_a, crop_b, video_b = samples
    checks = [
        ("photo", [photo]),
        ("8-frame video in the 64-frame context", [video]),
        ("image + video pack", [photo, video]),
        ("3 images + 2 videos pack", [photo, crop_a, crop_b, video, video_b]),
    ]
    with _no_tf32():
        source = build_source_model(src, config=packed_config).to(device)
        expected = {s.name: source_outputs(source, s, device) for s in samples}
        del source
        packed = LlavaViTPackingModel.from_pretrained(folder, dtype=dtype).to(device).eval()
        results = []
        for name, members in checks:
            hidden_states, grid_thw, positions = pack_samples(members, packed_config.patch_size)
            out = packed(hidden_states.to(device), grid_thw, positions)
            tokens = torch.cat([expected[s.name][0] for s in members])
            outputs = {"last_hidden_state": Stats.compare(out.last_hidden_state, tokens)}
            if out.pooler_output is not None:
                pooled = torch.cat([expected[s.name][1] for s in members])
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


# ---- command ----------------------------------------------------------------------------------


def convert_to_folder(
    src: str | Path,
    output_dir: str | Path,
    *,
    model_name: str | None = None,
    config_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    verify: bool = True,
    overwrite: bool = False,
) -> int:
    """Convert ``src`` into the packed folder ``output_dir``, verify it, and report; return the exit code."""
    start = time.perf_counter()
    try:
        torch_dtype = DTYPES[dtype]
        verify_on = resolve_device(device) if verify else None
        output = check_output_dir(output_dir, src, overwrite)
        print(f"reading {src}")
        converted = convert_source(src, model_name, config_file)
        for line in converted.lines():
            print(line)
        with staged_folder(output) as staging:
            print(f"writing {output} ({dtype})")
            size = write_packing_folder(converted.model, staging, torch_dtype, temporal_context=converted.temporal_context)
            del converted  # free the weights before verification loads two models
            print(f"  config.json, model.safetensors ({size / 2**20:.1f} MiB), preprocessor_config.json")
            if verify_on is not None:
                results = verify_folder(staging, src, torch_dtype, verify_on)
                failed = [r.name for r in results if not r.passed]
                if failed:
                    rule = (f"max|diff| <= {FLOAT32_MAX_ABS:g}" if torch_dtype == torch.float32
                            else f"cos min >= {LOW_PRECISION_MIN_COS}")
                    raise VerificationError(f"verification failed ({rule}) for: {', '.join(failed)}")
    except VerificationError as err:
        print(f"error: {err}; nothing was written", file=sys.stderr)
        return 3
    except (ConversionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    status = "verified and written" if verify else "written without verification (--no-verify)"
    print(f"{status}: {output} in {time.perf_counter() - start:.1f} s")
    return 0


def run_convert(args) -> int:
    """``llava-vit convert`` (arguments from :func:`llava_vit.cli.build_parser`); returns the exit code."""
    return convert_to_folder(
        args.src,
        args.output_dir,
        model_name=args.model_name,
        config_file=args.config,
        dtype=args.dtype,
        device=args.device,
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )
