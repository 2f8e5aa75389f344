"""The feature store: a folder of safetensors shards, each holding many encoded inputs, and its index.

Layout of a store folder::

    store.json                 what made the features: model identity, dtypes, processor settings
    index-<writer>.json        the shards one writer (one run of one process) completed, and the
                               inputs it could not read; replaced atomically after every shard
    <writer>-<n>.safetensors   a shard: many inputs, memory-mappable
    pictures/                  ``--visualize`` pictures, when asked for

A shard holds, for its ``n`` inputs (``T`` tokens and ``F`` frames in all):

======================  ============  ===================================================
``pooled``              ``(n, D)``    one attention-pooled vector per input (save pooled|all)
``patch_features``      ``(T, D)``    every input's patch features, concatenated (save patches|all)
``patch_offsets``       ``(n+1,)``    input ``i`` owns rows ``offsets[i]:offsets[i+1]`` (int64)
``patch_positions``     ``(T, 3)``    RoPE positions ``[t, h, w]`` of each row (int32)
``grid_thw``            ``(n, 3)``    patch grid ``[t, h, w]`` of each input (int32)
``original_size``       ``(n, 2)``    ``[height, width]`` of the file before resizing (int32)
``total_frames``        ``(n,)``      frames in the source (1 for images) (int32)
``is_video``            ``(n,)``      1 for videos (uint8)
``frame_indices``       ``(F,)``      encoded frames' indices in their source (int32)
``frame_offsets``       ``(n+1,)``    input ``i`` owns ``frame_indices[offsets[i]:offsets[i+1]]`` (int32)
======================  ============  ===================================================

and in its metadata the sources (relative to the store's ``root``), per-input warnings and picture
names. A shard is written under a temporary name and renamed when complete, then the writer's
index is replaced; a store interrupted at any point is a consistent store of completed shards.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

STORE_FILE = "store.json"
STORE_FORMAT = "llava-vit-feature-store/1"
SAVE_MODES = ("pooled", "patches", "all")
SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PICTURES = "pictures"
_INDEX = re.compile(r"^index-(?P<writer>[A-Za-z0-9_.-]+)\.json$")
SETTINGS_THAT_MUST_MATCH = ("model_sha256", "dtype", "save", "save_dtype", "processor")
"""A store is resumed only by a run that would write the same features the same way."""


class StoreError(ValueError):
    """A store that cannot be read, created or resumed as asked; the message says why and what to do."""


def weights_sha256(model: torch.nn.Module) -> str:
    """Identity of a model's weights: SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, path)


def read_settings(folder: Path) -> dict | None:
    """The ``store.json`` of ``folder``, or ``None`` when there is none."""
    path = folder / STORE_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{path} is not a readable store description: {error}") from error
    if settings.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is not a llava-vit feature store of format {STORE_FORMAT!r}")
    return settings


def check_resumable(settings: dict, wanted: dict, folder: Path) -> None:
    """Refuse to add features to a store that holds features made differently; name every difference."""
    differences = []
    for key in SETTINGS_THAT_MUST_MATCH:
        if key in wanted and settings.get(key) != wanted[key]:
            if key == "processor":
                keys = sorted(set(settings.get(key, {})) | set(wanted[key]))
                changed = [k for k in keys if settings.get(key, {}).get(k) != wanted[key].get(k)]
                differences += [f"processor {k}: store has {settings[key].get(k)!r}, this run {wanted[key].get(k)!r}"
                                for k in changed]
            else:
                differences.append(f"{key}: store has {settings.get(key)!r}, this run {wanted[key]!r}")
    if differences:
        raise StoreError(
            f"cannot resume {folder}: its features were made differently ({'; '.join(differences)}); "
            f"resume with the store's settings or write a new store"
        )


@dataclass
class EncodedInput:
    """One encoded input on its way into a shard."""

    source: Path
    kind: str
    grid_thw: tuple[int, int, int]
    original_size: tuple[int, int]
    total_frames: int
    frame_indices: tuple[int, ...]
    pooled: torch.Tensor | None
    patch_features: torch.Tensor | None
    patch_positions: torch.Tensor | None
    warnings: tuple[str, ...] = ()
    picture: str | None = None
    kept_indices: torch.Tensor | None = None
    """Codec-sampled videos: the kept patches' indices in ``sampled_grid_thw``."""
    sampled_grid_thw: tuple[int, int, int] | None = None


@dataclass
class WriterIndex:
    """What one writer has completed: its shards and the inputs it could not read."""

    writer: str
    shards: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    finished: bool = False


class StoreWriter:
    """Writes one writer's shards into a store folder (which :func:`open_store` created or checked)."""

    def __init__(self, folder: Path, root: Path, writer: str):
        self.folder, self.root, self.index = folder, root, WriterIndex(writer)
        self.bytes_written = 0

    @property
    def run(self) -> str:
        """``run<K>``: the run this writer belongs to (every rank of a torchrun run has the same)."""
        return self.index.writer.split("-")[0]

    def _relative(self, source: Path) -> str:
        return os.path.relpath(source, self.root)

    def write_shard(self, inputs: Sequence[EncodedInput], failed: Sequence[tuple[str, str]]) -> None:
        """Write ``inputs`` as the writer's next shard (none when empty), then record it and ``failed``
        in the writer's index, atomically."""
        if inputs:
            name = f"{self.index.writer}-{len(self.index.shards):05d}.safetensors"
            parts, metadata = _shard_tensors(inputs, self._relative)
            temporary = self.folder / f".{name}.tmp"
            write_safetensors(temporary, parts, metadata)
            os.replace(temporary, self.folder / name)
            self.bytes_written += (self.folder / name).stat().st_size
            self.index.shards.append({"file": name, "inputs": len(inputs),
                                      "tokens": int(sum(math.prod(x.grid_thw) for x in inputs))})
        self.index.failed += [{"source": source, "error": error} for source, error in failed]
        self.save_index()

    def save_index(self, finished: bool = False) -> None:
        self.index.finished = finished
        path = self.folder / f"index-{self.index.writer}.json"
        _write_json_atomically(path, asdict(self.index))


def _offsets(lengths: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.zeros(len(lengths) + 1, dtype=dtype)
    offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0).to(dtype)
    return offsets


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                       torch.int32: "I32", torch.int16: "I16", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, list[torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write a safetensors file whose tensor ``name`` is the concatenation (along dim 0) of the parts
    ``tensors[name]``, straight from the parts, then flush it to disk.

    The same file ``safetensors.torch.save_file`` would write for the concatenated tensors, without
    concatenating them and without the copy into a Python ``bytes`` that ``save_file`` makes while
    holding the GIL (which stalls the thread that feeds the GPU); ``write`` releases the GIL.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, parts in tensors.items():
        shape = [sum(part.shape[0] for part in parts), *parts[0].shape[1:]]
        size = math.prod(shape) * parts[0].element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[parts[0].dtype], "shape": shape,
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for parts in tensors.values():
            for part in parts:
                if part.numel():
                    f.write(part.contiguous().view(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())


def _shard_tensors(inputs: Sequence[EncodedInput], relative) -> tuple[dict[str, list[torch.Tensor]], dict[str, str]]:
    tensors: dict[str, list[torch.Tensor]] = {}
    if inputs[0].pooled is not None:
        tensors["pooled"] = [x.pooled[None] for x in inputs]
    if inputs[0].patch_features is not None:
        tensors["patch_features"] = [x.patch_features for x in inputs]
        tensors["patch_offsets"] = [_offsets([x.patch_features.shape[0] for x in inputs], torch.int64)]
        tensors["patch_positions"] = [x.patch_positions.to(torch.int32) for x in inputs]
    tensors["grid_thw"] = [torch.tensor([x.grid_thw for x in inputs], dtype=torch.int32)]
    tensors["original_size"] = [torch.tensor([x.original_size for x in inputs], dtype=torch.int32)]
    tensors["total_frames"] = [torch.tensor([x.total_frames for x in inputs], dtype=torch.int32)]
    tensors["is_video"] = [torch.tensor([x.kind == "video" for x in inputs], dtype=torch.uint8)]
    tensors["frame_indices"] = [torch.tensor([i for x in inputs for i in x.frame_indices], dtype=torch.int32)]
    tensors["frame_offsets"] = [_offsets([len(x.frame_indices) for x in inputs], torch.int32)]
    if any(x.kept_indices is not None for x in inputs):  # codec-sampled videos in the shard
        kept = [x.kept_indices if x.kept_indices is not None else torch.empty(0, dtype=torch.long) for x in inputs]
        tensors["kept_indices"] = [k.to(torch.int32) for k in kept]
        tensors["kept_offsets"] = [_offsets([len(k) for k in kept], torch.int64)]
        tensors["sampled_grid_thw"] = [torch.tensor([x.sampled_grid_thw or x.grid_thw for x in inputs],
                                                    dtype=torch.int32)]
    metadata = {"format": STORE_FORMAT, "sources": json.dumps([relative(x.source) for x in inputs])}
    warnings = {str(i): list(x.warnings) for i, x in enumerate(inputs) if x.warnings}
    if warnings:
        metadata["warnings"] = json.dumps(warnings)
    pictures = {str(i): x.picture for i, x in enumerate(inputs) if x.picture}
    if pictures:
        metadata["pictures"] = json.dumps(pictures)
    return tensors, metadata


_PER_INPUT = frozenset({"grid_thw", "original_size", "total_frames", "is_video", "frame_indices", "frame_offsets",
                        "patch_offsets", "kept_offsets", "sampled_grid_thw"})
"""A shard's small tensors (a few integers per input), read whole when the shard is first opened."""
_OPEN_SHARDS = 4
"""Shards a reader keeps open (memory-mapped) at once."""


@dataclass(frozen=True)
class _Shard:
    file: Path
    sources: tuple[str, ...]
    warnings: dict[int, list[str]]
    pictures: dict[int, str]


class FeatureStore:
    """Read a feature store without a GPU, lazily: shards are memory-mapped and only the rows asked
    for are read.

    ``len(store)`` inputs, ``store.sources`` their paths in store order, ``store[i]`` one input as a
    dict, ``store.pooled()`` every pooled vector as one ``(N, D)`` tensor (no patch features read),
    ``store.failed`` the inputs that could not be encoded, ``store.settings`` what made the features.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        settings = read_settings(self.folder)
        if settings is None:
            raise StoreError(f"{self.folder} is not a feature store (it has no {STORE_FILE})")
        self.settings = settings
        self.root = Path(settings["root"])
        self._shards: list[_Shard] = []
        self.failed: list[dict] = []
        for index in self._indexes():
            for shard in index["shards"]:
                self._shards.append(self._open_shard(self.folder / shard["file"]))
            self.failed += index["failed"]
        self._starts = [0]
        for shard in self._shards:
            self._starts.append(self._starts[-1] + len(shard.sources))
        self._open_shards: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._positions: dict[str, int] | None = None

    def _indexes(self) -> Iterator[dict]:
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name):
            if _INDEX.match(path.name):
                yield json.loads(path.read_text())

    @staticmethod
    def _open_shard(path: Path) -> _Shard:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            sources = json.loads(metadata["sources"])
        except Exception as error:  # noqa: BLE001 - any unreadable shard gets the same clear message
            raise StoreError(
                f"{path} is listed in the store's index but cannot be read ({type(error).__name__}: {error}); "
                f"the store was damaged outside llava-vit (a shard is only listed once complete)"
            ) from error
        return _Shard(
            file=path,
            sources=tuple(sources),
            warnings={int(k): v for k, v in json.loads(metadata.get("warnings", "{}")).items()},
            pictures={int(k): v for k, v in json.loads(metadata.get("pictures", "{}")).items()},
        )

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def sources(self) -> list[str]:
        """Every stored input's path, in store order."""
        return [str(self.root / source) for shard in self._shards for source in shard.sources]

    @property
    def save(self) -> str:
        return self.settings["save"]

    def _locate(self, i: int) -> tuple[int, int]:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"a store is indexed by an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"input {i} is out of range for a store of {n} inputs")
        i %= n
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def _open(self, shard: int) -> tuple[safe_open, dict[str, torch.Tensor]]:
        """The open (memory-mapped) shard and its small per-input tensors, kept for the last few shards."""
        if shard not in self._open_shards:
            handle = safe_open(str(self._shards[shard].file), framework="pt")
            small = {key: handle.get_tensor(key) for key in handle.keys() if key in _PER_INPUT}
            self._open_shards[shard] = (handle, small)
            if len(self._open_shards) > _OPEN_SHARDS:
                self._open_shards.popitem(last=False)
        self._open_shards.move_to_end(shard)
        return self._open_shards[shard]

    def __getitem__(self, i: int) -> dict:
        """Input ``i``: ``source``, ``kind``, ``grid_thw``, ``original_size`` ``(height, width)``,
        ``total_frames``, ``frame_indices``, ``warnings``, and ``pooled`` / ``patch_features`` +
        ``patch_positions`` as the store holds them; ``kept_indices`` and ``sampled_grid_thw`` for
        codec-sampled videos; ``picture`` when one was drawn."""
        s, row = self._locate(i)
        shard = self._shards[s]
        f, small = self._open(s)
        frames = small["frame_offsets"][row:row + 2].tolist()
        item = {
            "source": str(self.root / shard.sources[row]),
            "kind": "video" if int(small["is_video"][row]) else "image",
            "grid_thw": tuple(small["grid_thw"][row].tolist()),
            "original_size": tuple(small["original_size"][row].tolist()),
            "total_frames": int(small["total_frames"][row]),
            "frame_indices": small["frame_indices"][frames[0]:frames[1]].tolist(),
            "warnings": shard.warnings.get(row, []),
        }
        if "kept_offsets" in small:
            start, end = small["kept_offsets"][row:row + 2].tolist()
            if end > start:
                item["kept_indices"] = f.get_slice("kept_indices")[start:end]
                item["sampled_grid_thw"] = tuple(small["sampled_grid_thw"][row].tolist())
        if self.save != "patches":
            item["pooled"] = f.get_slice("pooled")[row:row + 1][0]
        if "patch_offsets" in small:
            start, end = small["patch_offsets"][row:row + 2].tolist()
            item["patch_features"] = f.get_slice("patch_features")[start:end]
            item["patch_positions"] = f.get_slice("patch_positions")[start:end]
        if row in shard.pictures:
            item["picture"] = str(self.folder / PICTURES / shard.pictures[row])
        return item

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def pooled(self) -> torch.Tensor:
        """``(N, D)``: every input's pooled vector in store order, read without any patch features."""
        if self.save == "patches":
            raise StoreError(f"{self.folder} holds patch features only (saved with --save patches), no pooled vectors")
        parts = []
        for shard in self._shards:
            with safe_open(str(shard.file), framework="pt") as f:
                parts.append(f.get_tensor("pooled"))  # one read per shard; patch features stay on disk
        if not parts:
            return torch.empty(0, self.settings["hidden_size"], dtype=SAVE_DTYPES[self.settings["save_dtype"]])
        return torch.cat(parts)

    def index_of(self, source: str | os.PathLike) -> int:
        """Store position of the input read from ``source`` (any spelling of its path)."""
        if self._positions is None:
            self._positions = {source: self._starts[s] + row for s, shard in enumerate(self._shards)
                               for row, source in enumerate(shard.sources)}
        wanted = os.path.relpath(Path(source).resolve(), self.root)
        if wanted not in self._positions:
            raise KeyError(f"{source} is not in the store {self.folder}")
        return self._positions[wanted]

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.folder)!r}: {len(self)} inputs in {len(self._shards)} shards, "
                f"save={self.save}, {self.settings['save_dtype']}, model {self.settings['model']})")


def check_output_folder(folder: Path, resume: bool) -> None:
    """Before any work: ``folder`` must be a folder we can write, empty or (with ``resume``) a store."""
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"--output {folder} is a file; expected a folder for the feature store")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"--output {folder}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"--output {folder}: cannot write in {existing} (permission denied)")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not resume:
        what = "a feature store" if (folder / STORE_FILE).is_file() else f"{sum(1 for _ in folder.iterdir())} entries"
        raise StoreError(
            f"--output {folder} is not empty (it holds {what}); pass --resume to add the inputs it lacks, "
            f"or choose a new folder"
        )
    if read_settings(folder) is None:
        raise StoreError(f"--resume: {folder} is not empty but holds no feature store ({STORE_FILE} is missing)")


def open_store(folder: Path, settings: dict, resume: bool, rank: int | None = None) -> tuple[StoreWriter, set[str]]:
    """Create the store (or check, with ``resume``, that it holds features made the same way) and a
    writer for this run; returns it and the resolved paths of the inputs the store already accounts
    for (stored, or recorded as unreadable)."""
    existing = read_settings(folder)
    if existing is None:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(folder / STORE_FILE, settings)
        existing = settings
    elif not resume:
        raise StoreError(f"--output {folder} already holds a feature store; pass --resume to add to it")
    else:
        check_resumable(existing, settings, folder)
    root = Path(existing["root"])
    accounted: set[str] = set()
    runs: set[str] = set()
    for path in folder.iterdir():
        match = _INDEX.match(path.name)
        if not match:
            continue
        runs.add(match["writer"].split("-")[0])
        index = json.loads(path.read_text())
        for shard in index["shards"]:
            sources = FeatureStore._open_shard(folder / shard["file"]).sources
            accounted.update(os.path.normpath(root / s) for s in sources)
        accounted.update(f["source"] for f in index["failed"])
    run = f"run{len(runs) + 1:03d}"
    for stale in folder.glob(".run*.tmp"):
        if not stale.name.startswith(f".{run}"):
            stale.unlink(missing_ok=True)
    return StoreWriter(folder, root, writer_name(run, rank)), accounted


def writer_name(run: str, rank: int | None) -> str:
    """``run<K>`` for a one-process run, ``run<K>-rank<R>`` for rank ``R`` of a torchrun run."""
    return run if rank is None else f"{run}-rank{rank:03d}"
