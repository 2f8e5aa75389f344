"""``llava-vit convert``: a source checkpoint to a packed model folder that has been checked.

The folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``) is written
into a temporary folder beside the target and verified against the source model built from the
same loaded tensors (:mod:`llava_vit.convert.verify`); only then is it renamed into place.
Any failure leaves no output behind.

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
from safetensors.torch import save_file

from ..model.configuration import LlavaViTConfig, LlavaViTPackingConfig
from ..model.modeling import LlavaViTPackingModel
from ..model.positions import SOURCE_TEMPORAL_CONTEXT
from ..model.variants import PACKING_MODEL_NAMES, SOURCE_MODEL_NAMES, packing_config, source_config
from ..processing import LlavaViTPackingImageProcessor
from ..validation import resolve_device
from .checkpoint import (
    ARCH_FIELDS,
    ConversionError,
    already_packed_error,
    ambiguous_architecture_error,
    convert_state_dict,
    infer_architecture,
    read_checkpoint,
    source_model,
)
from .verify import VerificationError, pass_rule, reference_outputs, verify_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS_FIELDS = ("layer_norm_eps", "head_norm_eps")


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
    state: dict[str, torch.Tensor], layout: str, model_name: str | None, config_file: str | None
) -> tuple[LlavaViTConfig | LlavaViTPackingConfig | None, str | None]:
    """The config given on the command line (a ``--config`` completes the tensor shapes), and its description.

    ``(None, None)`` without options: the checkpoint decides, and conversion refuses a head count
    that nothing decides.
    """
    if model_name:
        return named_config(model_name), f"--model-name {model_name}"
    if not config_file:
        return None, None
    shapes, _ = infer_architecture(state, layout)
    fields = {**shapes, **read_config_json(config_file)}
    if "num_attention_heads" not in fields:
        raise ambiguous_architecture_error(shapes, f"--config {config_file} does not give num_attention_heads")
    try:
        return LlavaViTPackingConfig(**fields), f"--config {config_file} + tensor shapes"
    except (TypeError, ValueError) as err:
        raise ConversionError(f"--config {config_file}: {err}") from err


@dataclass
class ConvertedSource:
    """A checkpoint in the packed layout and how it was read; ``state`` is the loaded checkpoint,
    whose tensors the model holds, kept to build the source model for verification."""

    model: LlavaViTPackingModel
    state: dict[str, torch.Tensor]
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
    what = f"checkpoint {src}"
    if layout == "packing":
        raise already_packed_error(what)
    config, given = architecture_override(state, layout, model_name, config_file)
    try:
        conversion = convert_state_dict(state, layout, hf_config, config, what=what)
    except ConversionError as err:
        raise ConversionError(f"{err} (architecture from {given})" if given else str(err)) from err
    temporal_context = (hf_config or {}).get("rope_temporal_size", SOURCE_TEMPORAL_CONTEXT)
    return ConvertedSource(conversion.model, state, layout, given or conversion.architecture_from,
                           conversion.eps_from, temporal_context)


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
        reference = None
        if verify_on is not None:
            print(f"running the source model (float32, {verify_on}) on the verification inputs")
            source = source_model(converted.state, converted.layout, converted.model.config, what=f"checkpoint {src}")
            reference = reference_outputs(source, verify_on)
            del source
        with staged_folder(output) as staging:
            print(f"writing {output} ({dtype})")
            size = write_packing_folder(converted.model, staging, torch_dtype, temporal_context=converted.temporal_context)
            del converted  # free the weights before the folder is loaded back
            print(f"  config.json, model.safetensors ({size / 2**20:.1f} MiB), preprocessor_config.json")
            if reference is not None:
                results = verify_folder(staging, reference, torch_dtype, verify_on)
                failed = [r.name for r in results if not r.passed]
                if failed:
                    raise VerificationError(f"verification failed ({pass_rule(torch_dtype)}) for: {', '.join(failed)}")
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
