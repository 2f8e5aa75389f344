"""Encode a dataset: files in, a feature store out, with the GPU kept busy.

Four stages run at once, joined by bounded queues, so memory stays bounded whatever the number of
inputs:

1. **read**: a :class:`torch.utils.data.DataLoader` whose worker processes decode and preprocess
   files, in input order;
2. **plan** (a thread): inputs are cut into shards (consecutive runs of ``shard_size`` inputs) and
   each shard into look-ahead windows; a window's inputs are packed largest first into forward
   passes of at most ``max_tokens`` tokens (first-fit decreasing), then copied into pinned memory;
3. **encode** (the calling thread): host-to-device copies, the forward, and device-to-host copies
   of the results into pinned memory, none of which waits for the device;
4. **write** (a thread): waits for each pass's results, puts them in input order, and writes a
   shard (atomically, then the store's index) as soon as all its inputs are in.

Attention never crosses inputs, so packing changes a result only by float rounding; and the plan
depends only on the inputs in order, so a resumed run packs the inputs it has left exactly as a
whole run would (bit-equal features).
"""

from __future__ import annotations

import glob
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..model.modeling import LlavaViTPackingModel
from ..model.variants import PACKING_MODEL_NAMES, VARIANTS, packing_config
from ..processing import VIDEO_EXTENSIONS, LlavaViTPackingImageProcessor, PackedSample
from ..validation import check_positive_int, resolve_device
from . import distributed
from . import store as feature_store
from .store import SAVE_DTYPES, SAVE_MODES, EncodedInput, StoreWriter
from .visualize import feature_picture
from ..processing.codec import draw_kept_patches

RANDOM_WEIGHTS_SEED = 0
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
"""Files picked from folders and glob patterns (files named one by one are always tried)."""
DEFAULT_SHARD_SIZE = {"pooled": 4096, "patches": 1024, "all": 1024}
SHARD_FEATURE_BYTES = 1 << 30
"""A shard also closes once its patch features reach this size, which bounds the writer's memory."""
WINDOW_PASSES = 8
FIRST_WINDOW_PASSES = 2
"""A shard's first window is smaller, so the GPU starts as soon as a few inputs are read."""
READER_NICENESS = 10
PLANNER_STOP_SECONDS = 60.0
"""How long a stopped run waits for the planner thread (and the readers it owns) to wind down:
a thread still inside PyTorch when the interpreter exits aborts the process."""
GIL_SWITCH_SECONDS = 5e-4
"""While encoding, a thread asks for the GIL back after at most this long (Python's default: 5 ms).
Every PyTorch call releases the GIL, so the thread launching the GPU's work re-acquires it
hundreds of times a pass; the planner and writer threads must not keep it for milliseconds."""
"""A look-ahead window holds inputs for about this many full forward passes."""


class EncodeError(ValueError):
    """A problem with the inputs, options or output of an encode run, found before any work."""


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


def check_model_name(model: str | os.PathLike) -> None:
    """A model folder (with ``config.json``) or a variant name, checked before anything loads."""
    folder = Path(model)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise EncodeError(f"--model {model}: the folder has no config.json (expected a converted model folder)")
    elif str(model) not in VARIANTS and str(model) not in PACKING_MODEL_NAMES:
        raise EncodeError(
            f"--model {str(model)!r} is neither a model folder nor a variant name; variants: "
            f"{', '.join(VARIANTS)} (or hf_llava_vit_packing_<size>_ln)"
        )


def load_processor(model: str | os.PathLike, **overrides) -> LlavaViTPackingImageProcessor:
    """The model's processor (its folder's ``preprocessor_config.json``, else the defaults for its
    patch size) with ``overrides`` (``None`` values ignored) applied."""
    folder = Path(model)
    if folder.is_dir() and (folder / PREPROCESSOR_CONFIG).is_file():
        settings = LlavaViTPackingImageProcessor.from_pretrained(folder).to_dict()
    else:
        patch_size = (LlavaViTPackingModel.config_class.from_pretrained(folder).patch_size if folder.is_dir()
                      else packing_config(str(model)).patch_size)
        settings = LlavaViTPackingImageProcessor(patch_size=patch_size).to_dict()
    settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
    if overrides.get("resize_mode") not in (None, settings.get("resize_mode")):
        for bound in ("size", "min_pixels", "max_pixels"):  # the old mode's bounds do not carry over
            settings.pop(bound, None)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return LlavaViTPackingImageProcessor(**settings)


def load_encoder(model: str | os.PathLike, processor: LlavaViTPackingImageProcessor, device: torch.device,
                 dtype: torch.dtype) -> tuple[Encoder, str]:
    """The model (a converted folder, or a variant with seeded random weights) on ``device`` in
    ``dtype``, and the SHA-256 of its weights as loaded."""
    folder = Path(model)
    if folder.is_dir():
        net = LlavaViTPackingModel.from_pretrained(folder)
        name, random_weights = str(folder), False
    else:
        config = packing_config(str(model))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net = LlavaViTPackingModel(config)
        name = str(model) if str(model) in PACKING_MODEL_NAMES else f"hf_llava_vit_packing_{model}_ln"
        random_weights = True
    if processor.patch_size != net.config.patch_size:
        raise EncodeError(
            f"{PREPROCESSOR_CONFIG} has patch_size={processor.patch_size} but the model's is {net.config.patch_size}"
        )
    identity = feature_store.weights_sha256(net)
    net = net.to(device=device, dtype=dtype).eval()
    if device.type == "cuda":
        _warm_up(net)
    return Encoder(net, processor, name, random_weights), identity


def _warm_up(model: LlavaViTPackingModel) -> None:
    """One small forward through each attention path, so that kernel compilation and library set-up
    happen while the model loads, not in the first pass of the run."""
    patch_dim = model.config.patch_dim
    with torch.inference_mode():
        for grids in ([[1, 2, 2], [1, 2, 2]], [[1, 2, 2], [2, 2, 3]]):  # equal lengths, then varlen
            tokens = sum(t * h * w for t, h, w in grids)
            model(hidden_states=torch.zeros(tokens, patch_dim, device=model.device, dtype=model.dtype),
                  grid_thw=torch.tensor(grids))
    torch.cuda.synchronize(model.device)


def collect_inputs(specs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (recursively, media files only) and glob patterns, in order and without
    repeats. Returns ``(resolved files, failures)``; a name that matches nothing is a failure."""
    files: list[Path] = []
    failures: list[tuple[str, str]] = []
    for spec in map(str, specs):
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
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, failures


def _media_files(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if p.suffix.lower() in MEDIA_EXTENSIONS and not p.name.startswith("."))


def check_output_outside_inputs(output: Path, specs: Sequence[str | os.PathLike], files: Sequence[Path]) -> None:
    """The store must never be an input folder or inside one (its pictures would become inputs, and
    could overwrite the user's files), nor hold any input."""
    out = output.resolve()
    for spec in map(str, specs):
        folder = Path(spec) if Path(spec).is_dir() else None
        if folder is None and glob.has_magic(spec) and "**" in spec:
            folder = Path(spec[: spec.index("**")] or ".")
        if folder is not None and (out == folder.resolve() or folder.resolve() in out.parents):
            raise EncodeError(
                f"--output {output} is {'the' if out == folder.resolve() else 'inside the'} input folder {spec}; "
                f"choose an output folder outside the inputs"
            )
    inside = next((f for f in files if out in f.parents), None)
    if inside is not None:
        raise EncodeError(f"--output {output} contains the input {inside}; choose an output folder outside the inputs")


class _Reads(Dataset):
    """Input ``i`` preprocessed in a DataLoader worker: ``(i, sample, None)`` or ``(i, None, error)``.
    A file that cannot be read is reported, not raised, so the other inputs go on."""

    def __init__(self, files: Sequence[Path], processor: LlavaViTPackingImageProcessor, num_frames: int | None):
        self.files, self.processor, self.num_frames = files, processor, num_frames

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, PackedSample | None, str | None]:
        try:
            return i, self.processor.preprocess_file(self.files[i], self.num_frames), None
        except Exception as error:  # noqa: BLE001 - one unreadable input must not stop the rest
            return i, None, f"{type(error).__name__}: {error}"


def _unbatched(item):
    return item


def _yield_cpu(worker_id: int) -> None:
    """Readers run at a lower priority than the process that feeds the GPU: when the cores are all
    busy decoding, kernel launches and copies must not wait for a time slice."""
    os.nice(READER_NICENESS)


def read_samples(files: Sequence[Path], processor: LlavaViTPackingImageProcessor, num_frames: int | None,
                 workers: int) -> Iterator[tuple[int, PackedSample | None, str | None]]:
    """``(i, sample, None)`` or ``(i, None, error)`` for each file, in order, preprocessed by
    ``workers`` DataLoader processes (0: in this process) at most ``4 * workers`` inputs ahead."""
    loader = DataLoader(_Reads(files, processor, num_frames), batch_size=None, shuffle=False, num_workers=workers,
                        collate_fn=_unbatched, prefetch_factor=4 if workers else None, worker_init_fn=_yield_cpu)
    yield from loader


def pack_window(tokens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Positions in ``tokens`` grouped into passes of at most ``max_tokens`` tokens, largest first
    (first-fit decreasing; ties in input order). An input larger than ``max_tokens`` runs alone."""
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    passes: list[list[int]] = []
    room: list[int] = []
    for i in order:
        slot = next((p for p, free in enumerate(room) if tokens[i] <= free), None)
        if slot is None:
            passes.append([i])
            room.append(max_tokens - tokens[i])
        else:
            passes[slot].append(i)
            room[slot] -= tokens[i]
    return passes


@dataclass
class _Pass:
    """One forward pass: which inputs, and their packed inputs in (pinned) host memory."""

    items: list[tuple[int, PackedSample]]
    tokens: list[int]
    hidden_states: torch.Tensor
    grid_thw: torch.Tensor
    patch_positions: torch.Tensor


@dataclass
class _ShardEnd:
    """All passes of a shard have been queued: its inputs in order and the ones that failed."""

    indices: list[int]
    failed: list[tuple[str, str]]


@dataclass
class _Done:
    """The plan is complete (or was stopped)."""


@dataclass
class _Result:
    """A pass's outputs on their way to the host (ready once ``ready`` has happened)."""

    items: list[tuple[int, PackedSample]]
    tokens: list[int]
    pooled: torch.Tensor | None
    patches: torch.Tensor | None
    ready: torch.cuda.Event | None
    timing: tuple[torch.cuda.Event, torch.cuda.Event] | float


@dataclass
class EncodeSummary:
    """What an encode run did; ``interrupted`` runs stored only their completed shards."""

    output: Path
    inputs: int
    encoded: int
    already_stored: int
    failed: list[tuple[str, str]]
    passes: int
    tokens: int
    seconds: float
    busy_seconds: float
    bytes_written: int
    shards: int
    interrupted: bool = False
    startup_seconds: float = 0.0
    """From the start until the first forward pass began (the readers filling the first window)."""
    starved_seconds: float = 0.0
    """Time the forward loop waited for packed inputs after the first pass (input-bound time)."""
    ranks: int = 1
    """Processes of a torchrun run: rank 0's summary holds every rank's totals (its own only when interrupted)."""
    pass_grids: list[list[tuple[int, int, int]]] = field(default_factory=list, repr=False)

    @property
    def inputs_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def busy(self) -> float:
        """Share of the run's time the model was computing."""
        return min(1.0, self.busy_seconds / self.seconds) if self.seconds else 0.0

    def line(self) -> str:
        """The one-line summary the command prints."""
        rate = (f"{self.inputs_per_second:.1f} inputs/s, {self.tokens_per_second / 1e3:.1f}k tokens/s, "
                f"model busy {self.busy:.0%}")
        stored = f"{self.shards} shard{'s' if self.shards != 1 else ''}, {_megabytes(self.bytes_written)}"
        if self.interrupted and self.ranks > 1:
            return (f"interrupted: rank 0 stored {self.encoded} inputs in {stored} of {self.output}/ in "
                    f"{self.seconds:.1f} s ({rate}); each other rank stops after the shard it is writing; run again "
                    f"with --resume (on any number of processes) to encode the rest")
        if self.interrupted:
            left = self.inputs - self.already_stored - self.encoded - len(self.failed)
            return (f"interrupted: {self.encoded} inputs stored in {stored} of {self.output}/ in {self.seconds:.1f} s "
                    f"({rate}); run again with --resume to encode the other {left}")
        if self.already_stored == self.inputs:
            return f"nothing to encode: the {self.inputs} inputs are all in {self.output}/ already"
        resumed = f", {self.already_stored} already stored" if self.already_stored else ""
        failed = f", {len(self.failed)} failed" if self.failed else ""
        processes = f" on {self.ranks} processes" if self.ranks > 1 else ""
        return (f"encoded {self.encoded} of {self.inputs} inputs{resumed}{failed} in {self.passes} forward "
                f"pass{'' if self.passes == 1 else 'es'}{processes} ({self.tokens} tokens, {self.seconds:.1f} s: "
                f"{rate}); wrote {stored} to {self.output}/")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def encode_files(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike,
    output: str | os.PathLike,
    save: str = "pooled",
    save_dtype: str | None = None,
    shard_size: int | None = None,
    max_tokens: int = 16384,
    frames: int | None = None,
    resize_mode: str | None = None,
    size: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    video_sampling: str | None = None,
    patch_budget: int | None = None,
    resume: bool = False,
    visualize: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    log=print,
) -> EncodeSummary:
    """Encode image and video files (files, folders, glob patterns) into a feature store at ``output``.

    ``model`` is a converted model folder or a variant name (seeded random weights). ``save`` is
    ``"pooled"`` (one vector per input), ``"patches"`` or ``"all"``; ``save_dtype`` defaults to the
    model's dtype (bfloat16 on CUDA, float32 on the CPU). ``max_tokens`` bounds a forward pass and
    every input: larger ones are scaled down to fit (recorded as a warning). ``frames``,
    ``resize_mode``, ``size``, ``min_pixels``, ``max_pixels``, ``video_sampling`` (``"uniform"`` or
    ``"codec"``) and ``patch_budget`` override the model's processor.
    With ``resume``, inputs the store already holds are skipped; without it, ``output`` must be
    empty or new. Everything is checked before the model loads (:class:`EncodeError`,
    :class:`~llava_vit.encoding.store.StoreError`). Ctrl-C stops after the shard being written;
    the summary says ``interrupted``. Under torchrun, each process encodes its share into the same
    store (see :mod:`llava_vit.encoding.distributed`).
    """
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise EncodeError("no inputs given: pass image/video files, folders or glob patterns")
    check_choice("--save", save, SAVE_MODES)
    check_choice("--save-dtype", save_dtype, SAVE_DTYPES, optional=True)
    check_choice("--dtype", dtype, SAVE_DTYPES, optional=True)
    max_tokens = _positive("--max-tokens", max_tokens)
    auto_shard_size = shard_size is None
    shard_size = DEFAULT_SHARD_SIZE[save] if shard_size is None else _positive("--shard-size", shard_size)
    try:
        ranks = distributed.from_environment()  # None outside torchrun
        run_device = resolve_device(device if ranks is None else distributed.rank_device(ranks, device))
        check_model_name(model)
        processor = load_processor(model, num_frames=frames, resize_mode=resize_mode, size=size,
                                   min_pixels=min_pixels, max_pixels=max_pixels, max_tokens=max_tokens,
                                   video_sampling=video_sampling, patch_budget=patch_budget)
        if processor.video_sampling == "codec" and processor.patch_budget > max_tokens:
            raise ValueError(f"--patch-budget {processor.patch_budget} is more than --max-tokens {max_tokens}: "
                             f"a codec-sampled video must fit in one forward pass")
    except (TypeError, ValueError, OSError) as error:
        raise EncodeError(str(error)) from error
    cores = (os.cpu_count() or 2) // (1 if ranks is None else ranks.local_world_size)
    workers = min(16, max(1, cores - 2)) if workers is None else workers
    if not isinstance(workers, int) or workers < 0:
        raise EncodeError(f"--workers must be a non-negative integer, got {workers!r}")
    model_dtype = model_dtype_for(dtype, run_device)
    save_dtype = save_dtype or str(model_dtype).removeprefix("torch.")

    files, failures = collect_inputs(specs)
    if not files:
        reasons = "; ".join(f"{spec}: {reason}" for spec, reason in failures)
        raise EncodeError(f"no image or video files to encode ({reasons})")
    out = Path(output)
    check_output_outside_inputs(out, specs, files)
    feature_store.check_output_folder(out, resume)
    group = None if ranks is None else distributed.Group(ranks, run_device)

    encoder, identity = load_encoder(model, processor, run_device, model_dtype)
    settings = {
        "format": feature_store.STORE_FORMAT,
        "model": encoder.name,
        "weights": encoder.weights,
        "model_sha256": identity,
        "hidden_size": encoder.model.config.hidden_size,
        "dtype": str(model_dtype).removeprefix("torch."),
        "save": save,
        "save_dtype": save_dtype,
        "processor": json.loads(json.dumps(processor.to_dict())),  # as the store will read it back
        "root": os.path.commonpath([str(f.parent) for f in files]),
    }
    # frames a video gives: --frames, else the processor's (uniform) or the temporal context (codec)
    num_frames = frames or (processor.temporal_context if processor.video_sampling == "codec" else processor.num_frames)
    if group is None:
        writer, accounted = feature_store.open_store(out, settings, resume)
        todo = share = [f for f in files if str(f) not in accounted]
    else:
        writer, todo = group.open_store(out, settings, resume, files)
        share, shard_size = group.share(todo, processor, num_frames, shard_size, auto_shard_size)
        failures = failures if group.leader else []  # rank 0 records the names that matched nothing
        log, progress = (log, progress) if group.leader else (_quiet, False)
    label = f"{encoder.name}, {encoder.weights}"
    if encoder.random_weights:
        label += " - RANDOM WEIGHTS: the features only exercise the pipeline"
    log(f"model: {label}\ndevice: {run_device}, dtype: {settings['dtype']}, saving {save} as {save_dtype}; "
        f"{len(files)} inputs" + (f", {len(files) - len(todo)} already stored" if len(files) > len(todo) else "")
        + (f"\ntorchrun: {ranks.world_size} process{'es' if ranks.world_size > 1 else ''} ({group.backend}); "
           f"rank 0 encodes {len(share)} of the "
           f"{len(todo)} inputs left, in shards of {shard_size}" if group else ""))

    run = _Run(encoder, writer, share, max_tokens, shard_size, save, SAVE_DTYPES[save_dtype], visualize,
               workers, frames, progress, report_skips=group is None)
    summary = run.execute()
    summary.inputs, summary.already_stored = len(files), len(files) - len(todo)
    if failures and not summary.interrupted:
        writer.write_shard([], failures)
    summary.failed = failures + summary.failed
    if not summary.interrupted:
        writer.save_index(finished=True)
    return summary if group is None else group.finish(summary)


def _quiet(*args, **kwargs) -> None:
    """The log of a torchrun rank other than 0."""


def check_choice(flag: str, value, choices, optional: bool = False) -> None:
    """``value`` must be one of ``choices`` (or ``None`` when ``optional``)."""
    if not (optional and value is None) and value not in choices:
        raise EncodeError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")


def model_dtype_for(dtype: str | None, device: torch.device) -> torch.dtype:
    """The dtype named ``dtype``, else bfloat16 on CUDA and float32 elsewhere."""
    if dtype:
        return SAVE_DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _positive(flag: str, value) -> int:
    try:
        return check_positive_int(flag, value)
    except (TypeError, ValueError) as error:
        raise EncodeError(str(error)) from error


class _Run:
    """One run of the four stages over ``files`` (see the module docstring)."""

    def __init__(self, encoder: Encoder, writer: StoreWriter, files: list[Path], max_tokens: int, shard_size: int,
                 save: str, save_dtype: torch.dtype, visualize: bool, workers: int, num_frames: int | None, progress: bool,
                 report_skips: bool = True):
        self.encoder, self.writer, self.files = encoder, writer, files
        self.report_skips = report_skips  # under torchrun, rank 0 lists every rank's skips at the end instead
        self.max_tokens, self.shard_size, self.save, self.save_dtype = max_tokens, shard_size, save, save_dtype
        self.visualize, self.workers, self.num_frames, self.progress = visualize, workers, num_frames, progress
        self.device = next(encoder.model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.keep_patches = save != "pooled" or visualize
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.summary = EncodeSummary(writer.folder, len(files), 0, 0, [], 0, 0, 0.0, 0.0, 0, 0)
        self._pictures: set[str] = set()

    # --- plan -----------------------------------------------------------------------------------
    def _plan(self, passes: queue.Queue) -> None:
        """Cut the samples into shards and windows, and queue each window's passes, then its shard's end."""
        try:
            window: list[tuple[int, PackedSample]] = []
            shard: list[int] = []
            failed: list[tuple[str, str]] = []
            shard_bytes = 0
            window_tokens = 0
            first_window = True
            bytes_per_token = self.encoder.model.config.hidden_size * self.save_dtype.itemsize
            for i, sample, error in read_samples(self.files, self.encoder.processor, self.num_frames,
                                                 self.workers):
                if self.stop.is_set():
                    return
                shard.append(i)
                if sample is None:
                    failed.append((str(self.files[i]), error))
                else:
                    window.append((i, sample))
                    window_tokens += sample.num_tokens
                    if self.save != "pooled":
                        shard_bytes += sample.num_tokens * bytes_per_token
                shard_full = len(shard) == self.shard_size or shard_bytes >= SHARD_FEATURE_BYTES
                passes_ahead = FIRST_WINDOW_PASSES if first_window else WINDOW_PASSES
                if window and (shard_full or window_tokens >= passes_ahead * self.max_tokens):
                    self._queue_window(window, passes)
                    window, window_tokens, first_window = [], 0, False
                if shard_full:
                    self._put(passes, _ShardEnd(shard, failed))
                    shard, failed, shard_bytes, first_window = [], [], 0, True
            if window:
                self._queue_window(window, passes)
            if shard:
                self._put(passes, _ShardEnd(shard, failed))
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.errors.append(error)
        finally:
            self._put(passes, _Done(), force=True)

    def _queue_window(self, window: list[tuple[int, PackedSample]], passes: queue.Queue) -> None:
        for group in pack_window([s.num_tokens for _, s in window], self.max_tokens):
            items = sorted((window[g] for g in group), key=lambda item: item[0])
            inputs = self.encoder.processor.pack([s for _, s in items], pin_memory=self.cuda)
            tokens = [s.num_tokens for _, s in items]
            if not self.visualize:  # the pixels are only needed again for pictures
                items = [(i, replace(s, hidden_states=s.hidden_states[:0])) for i, s in items]
            job = _Pass(items, tokens, inputs["hidden_states"], inputs["grid_thw"], inputs["patch_positions"])
            if not self._put(passes, job):
                return

    def _put(self, q: queue.Queue, item, force: bool = False) -> bool:
        """Queue ``item`` unless the run was stopped (``force`` queues it anyway, without blocking forever)."""
        while not self.stop.is_set() or force:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if force and self.stop.is_set():
                    return False
        return False

    # --- encode -----------------------------------------------------------------------------------
    def _forward(self, job: _Pass) -> _Result:
        model = self.encoder.model
        hidden = job.hidden_states.to(self.device, non_blocking=True)
        positions = job.patch_positions.to(self.device, non_blocking=True)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            began = time.perf_counter()
        with torch.inference_mode():
            out = model(hidden_states=hidden.to(model.dtype), grid_thw=job.grid_thw, patch_positions=positions)
        pooled = out.pooler_output if self.save != "patches" else None
        patches = out.last_hidden_state if self.keep_patches else None
        if self.cuda:
            end.record()
            pooled, patches = (_to_host(x, self.save_dtype) for x in (pooled, patches))
            ready = torch.cuda.Event()
            ready.record()
            return _Result(job.items, job.tokens, pooled, patches, ready, (start, end))
        pooled, patches = (None if x is None else x.to(self.save_dtype) for x in (pooled, patches))
        return _Result(job.items, job.tokens, pooled, patches, None, time.perf_counter() - began)

    # --- write ------------------------------------------------------------------------------------
    def _write(self, results: queue.Queue, bar: tqdm) -> None:
        """Collect results in input order and write each shard once all of it is in."""
        try:
            done: dict[int, EncodedInput] = {}
            while True:
                item = results.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, _ShardEnd):
                    encoded = [done.pop(i) for i in item.indices if i in done]
                    self.writer.write_shard(encoded, item.failed)
                    self.summary.shards += bool(encoded)
                    self.summary.encoded += len(encoded)
                    self.summary.failed += item.failed
                    self.summary.bytes_written = self.writer.bytes_written
                    for source, error in item.failed if self.report_skips else ():
                        bar.write(f"skipped {source}: {error}")
                    bar.update(len(item.failed))
                    continue
                if item.ready is not None:
                    item.ready.synchronize()
                    start, end = item.timing
                    self.summary.busy_seconds += start.elapsed_time(end) / 1e3
                    # out of pinned memory at once, so the next passes reuse it instead of pinning more
                    item.pooled, item.patches = (None if x is None else torch.empty_like(x).copy_(x)
                                                 for x in (item.pooled, item.patches))
                else:
                    self.summary.busy_seconds += item.timing
                for (i, sample), pooled, patches in zip(item.items, _rows(item.pooled, len(item.items)),
                                                        _split(item.patches, item.tokens)):
                    done[i] = self._encoded(i, sample, pooled, patches)
                self.summary.passes += 1
                self.summary.tokens += sum(item.tokens)
                self.summary.pass_grids.append([s.grid_thw for _, s in item.items])
                bar.update(len(item.items))
                elapsed = time.perf_counter() - self.started
                bar.set_postfix_str(f"{self.summary.tokens / elapsed / 1e3:.0f}k tok/s, "
                                    f"busy {min(1.0, self.summary.busy_seconds / elapsed):.0%}", refresh=False)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.errors.append(error)
            self.stop.set()

    def _encoded(self, i: int, sample: PackedSample, pooled, patches) -> EncodedInput:
        source = self.files[i]
        picture = self._picture(source, sample, patches) if self.visualize else None
        return EncodedInput(
            source=source, kind=sample.kind, grid_thw=tuple(sample.grid_thw), original_size=sample.original_size,
            total_frames=sample.total_frames, frame_indices=sample.frame_indices,
            pooled=pooled, patch_features=patches if self.save != "pooled" else None,
            patch_positions=sample.patch_positions if self.save != "pooled" else None,
            warnings=sample.warnings, picture=picture, kept_indices=sample.kept_indices,
            sampled_grid_thw=sample.sampled_grid_thw,
        )

    def _picture(self, source: Path, sample: PackedSample, patches: torch.Tensor) -> str:
        folder = self.writer.folder / feature_store.PICTURES
        folder.mkdir(exist_ok=True)
        name, n = f"{source.stem}.png", 1
        while name in self._pictures or (folder / name).exists():
            name, n = f"{source.stem}-{n}.png", n + 1
        self._pictures.add(name)
        height, width = sample.original_size
        frames_note = (f", frames {list(sample.frame_indices)} of {sample.total_frames}"
                       if sample.kind == "video" else "")
        caption = (f"{source.name}  {sample.kind} {width}x{height}{frames_note} -> grid t,h,w = "
                   f"{tuple(sample.grid_thw)}\n{self.encoder.name}, {self.encoder.weights} | left: input as "
                   f"encoded, right: patch features' PCA 1-3 as RGB")
        if sample.kept_indices is not None:  # codec-sampled: the kept patches over the sampled frames
            draw_kept_patches(sample, self.encoder.processor).save(folder / name)
            return name
        frames = self.encoder.processor.to_pixels(sample.hidden_states, sample.grid_thw)
        feature_picture(frames, patches.float(), sample.grid_thw, caption).save(folder / name)
        return name

    # --- all together -----------------------------------------------------------------------------
    def execute(self) -> EncodeSummary:
        passes: queue.Queue = queue.Queue(maxsize=3)
        results: queue.Queue = queue.Queue(maxsize=4)
        self.started = time.perf_counter()
        bar = tqdm(total=len(self.files), unit="input", desc="encoding", disable=not self.progress, smoothing=0.1)
        planner = threading.Thread(target=self._plan, args=(passes,), name="llava-vit-plan", daemon=True)
        writer = threading.Thread(target=self._write, args=(results, bar), name="llava-vit-write", daemon=True)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        planner.start()
        writer.start()
        try:
            while True:
                waited = time.perf_counter()
                job = passes.get()
                if self.summary.passes or self.summary.startup_seconds:
                    self.summary.starved_seconds += time.perf_counter() - waited
                else:
                    self.summary.startup_seconds = time.perf_counter() - self.started
                if self.errors:
                    raise self.errors[0]
                if isinstance(job, _Pass):
                    job = self._forward(job)
                results.put(job)
                if isinstance(job, _Done):
                    break
            writer.join()
            if self.errors:
                raise self.errors[0]
        except KeyboardInterrupt:
            self.summary.interrupted = True
            self.stop.set()
            _drain(passes)
            results.put(_Done())  # the writer finishes the shard it is writing, if any, then stops
            writer.join()
            _drain(passes)
            planner.join(PLANNER_STOP_SECONDS)  # it stops after the input it is reading
        except BaseException:
            self.stop.set()
            _drain(passes)
            planner.join(PLANNER_STOP_SECONDS)
            raise
        finally:
            sys.setswitchinterval(switch_interval)
            bar.close()
            self.summary.seconds = time.perf_counter() - self.started
        return self.summary


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _to_host(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Start copying ``x`` (as ``dtype``) into pinned host memory; valid once the stream has reached this point."""
    if x is None:
        return None
    x = x.to(dtype)
    host = torch.empty(x.shape, dtype=dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


def _rows(pooled: torch.Tensor | None, n: int) -> list:
    return [None] * n if pooled is None else list(pooled)


def _split(patches: torch.Tensor | None, tokens: list[int]) -> list:
    return [None] * len(tokens) if patches is None else list(torch.split(patches, tokens))


def interrupt_on_sigterm() -> None:
    """Stop like Ctrl-C on ``kill``, so a killed run ends with a consistent store and a summary."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
