"""``llava-vit encode`` under torchrun: one process per GPU, on one machine or many, all writing
into one feature store.

torchrun starts the processes and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``; :func:`~llava_vit.encoding.pipeline.encode_files` sees them and encodes
only this process's share. Each process uses the GPU ``cuda:LOCAL_RANK`` (``nccl``), or the CPU
(``gloo``), and writes its own shards and its own index file (``index-run<K>-rank<R>.json``,
replaced atomically after each shard) into the store; a reader takes the union of the index files,
so no merged index is written: it would be a second copy of what the ranks' files already say,
and one more file that could disagree with them after a crash.

Collectives happen only at the start and at the end, never per batch:

1. a barrier once every rank has checked the options, the inputs and the output folder (so no rank
   mistakes the store that rank 0 then creates for a non-empty output);
2. rank 0 creates or checks the store, decides the run number ``K`` and the inputs left to encode,
   and broadcasts them with a digest of its input list, which every rank compares with its own;
3. each rank reads the headers of every ``WORLD_SIZE``-th input left (image sizes, video frame
   counts; nothing is decoded) and an all-gather gives every rank all the token estimates, from
   which each computes the same split;
4. at the end, the ranks' summaries are gathered on rank 0, which prints the totals.

The unit of the split is the shard, a run of ``shard_size`` consecutive inputs left: the planner
cuts its look-ahead windows afresh at every shard, so each forward pass holds exactly the inputs
it would hold in one process, and the features are bit-equal to a one-process run with the same
``--shard-size`` and ``--max-tokens`` (and, on the CPU, the same number of threads). Whole shards
go, largest estimated token count first, to the rank with the fewest tokens so far.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import av
import torch
import torch.distributed as dist
from PIL import Image

from ..processing import VIDEO_EXTENSIONS, LlavaViTPackingImageProcessor
from ..processing.video import ANIMATED_IMAGE_FORMATS
from . import store as feature_store
from .store import StoreError, StoreWriter

if TYPE_CHECKING:
    from .pipeline import EncodeSummary

SHARDS_PER_RANK = 8
"""Without ``--shard-size``, shards are made small enough that each rank gets about this many, so
the split (whole shards) stays balanced; a shard never exceeds the one-process default."""
COLLECTIVE_TIMEOUT = timedelta(days=30)
"""How long a collective may wait: the final gather waits for the slowest rank to finish its share."""
HEADER_THREADS = 16
"""Threads per rank reading headers for the token estimates (I/O bound, and Pillow and PyAV release the GIL)."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job, as torchrun's environment variables say."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def from_environment(environ=os.environ) -> Ranks | None:
    """The torchrun job this process belongs to, or ``None`` outside torchrun (no ``RANK`` and ``WORLD_SIZE``)."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local, local_world = int(environ.get("LOCAL_RANK", rank)), int(environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError as error:
        raise ValueError(f"torchrun environment: RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be "
                         f"integers: {error}") from error
    if not 0 <= rank < world or not 0 <= local < local_world:
        raise ValueError(f"torchrun environment: RANK={rank} must be in [0, WORLD_SIZE={world}) and "
                         f"LOCAL_RANK={local} in [0, LOCAL_WORLD_SIZE={local_world})")
    return Ranks(rank, world, local, local_world)


def rank_device(ranks: Ranks, device: str | None) -> str | None:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``None`` or ``"cuda"`` when CUDA is available,
    else ``device`` as given (``cpu``, or an explicit ``cuda:N``)."""
    if device not in (None, "cuda") or not torch.cuda.is_available():
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={ranks.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"start at most {torch.cuda.device_count()} processes per node (--nproc-per-node)")
    return f"cuda:{ranks.local_rank}"


def estimate_tokens(path: str | os.PathLike, processor: LlavaViTPackingImageProcessor, num_frames: int) -> int:
    """Tokens ``processor`` will make of the file at ``path``, from its header alone: an image's size
    (Pillow reads only the header), a video's frame count and size from its container (a container
    that records no count is taken to hold at least ``num_frames``). 0 for a file whose header cannot
    be read: reading it will fail fast, and say why."""
    p = processor.patch_size
    try:
        if Path(path).suffix.lower() in VIDEO_EXTENSIONS:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames, height, width = stream.frames or num_frames, stream.codec_context.height, stream.codec_context.width
            video = True
        else:
            with Image.open(path) as image:
                width, height = image.size
                video = image.format in ANIMATED_IMAGE_FORMATS and bool(getattr(image, "is_animated", False))
                frames = image.n_frames if video else 1
        if not video:
            height, width = processor.target_size(height, width)
            return (height // p) * (width // p)
        used = min(frames, num_frames)
        if processor.video_sampling == "codec":
            height, width = processor.target_size(height, width)
            return min(processor.patch_budget, used * (height // p) * (width // p))
        height, width = processor.target_size(height, width, used)
        return used * (height // p) * (width // p)
    except Exception:  # noqa: BLE001 - an estimate only balances the split; the read reports the error
        return 0


def balance(loads: Sequence[int], bins: int) -> list[int]:
    """The bin of each load: largest load first, each to the bin with the smallest total so far
    (ties: the earlier load, the lower bin)."""
    owners = [0] * len(loads)
    totals = [(0, b) for b in range(bins)]
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        total, b = heapq.heappop(totals)
        owners[i] = b
        heapq.heappush(totals, (total + loads[i], b))
    return owners


def split(tokens: Sequence[int], shard_size: int, world_size: int) -> list[list[int]]:
    """Positions of the inputs each rank encodes: runs of ``shard_size`` consecutive inputs (the
    shards one process would write), balanced by ``tokens``, each rank's in input order."""
    starts = range(0, len(tokens), shard_size)
    owners = balance([sum(tokens[s:s + shard_size]) for s in starts], world_size)
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for start, owner in zip(starts, owners):
        shares[owner] += range(start, min(start + shard_size, len(tokens)))
    return shares


def _digest(files: Sequence[Path]) -> str:
    return hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()


class Group:
    """The process group of a torchrun encode, started (and, at :meth:`finish`, ended) by this module
    unless the caller had already started one."""

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks, self.device = ranks, device
        self.cuda = device.type == "cuda"
        self.owned = not dist.is_initialized()
        if self.cuda:
            torch.cuda.set_device(device)
        if self.owned:
            dist.init_process_group("nccl" if self.cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
        dist.barrier(device_ids=[device.index] if self.cuda else None)

    @property
    def leader(self) -> bool:
        return self.ranks.leader

    @property
    def backend(self) -> str:
        return dist.get_backend()

    def open_store(self, folder: Path, settings: dict, resume: bool,
                   files: Sequence[Path]) -> tuple[StoreWriter, list[Path]]:
        """Rank 0 opens the store (:func:`~llava_vit.encoding.store.open_store`) and tells the others
        the run and the inputs left; returns this rank's writer and the inputs left (all ranks')."""
        message: list = [None]
        if self.leader:
            try:
                writer, accounted = feature_store.open_store(folder, settings, resume, rank=0)
                todo = [i for i, f in enumerate(files) if str(f) not in accounted]
                message = [(writer.run, str(writer.root), todo, _digest(files))]
            except StoreError as error:
                message = [str(error)]
        dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], str):
            raise StoreError(message[0])
        run, root, todo, digest = message[0]
        if digest != _digest(files):
            raise StoreError(f"rank {self.ranks.rank} found other inputs than rank 0 (the input folders changed while "
                             f"the ranks listed them, or the ranks see different file systems); run again")
        if not self.leader:
            writer = StoreWriter(folder, Path(root), feature_store.writer_name(run, self.ranks.rank))
        return writer, [files[i] for i in todo]

    def share(self, todo: Sequence[Path], processor: LlavaViTPackingImageProcessor, num_frames: int,
              shard_size: int, auto: bool) -> tuple[list[Path], int]:
        """This rank's inputs (whole shards of ``todo``, balanced by estimated tokens) and the shard size:
        ``shard_size``, or with ``auto`` and several ranks at most that, small enough to give each rank
        about :data:`SHARDS_PER_RANK` shards."""
        world, rank = self.ranks.world_size, self.ranks.rank
        if auto and world > 1:
            shard_size = max(1, min(shard_size, math.ceil(len(todo) / (world * SHARDS_PER_RANK))))
        with ThreadPoolExecutor(HEADER_THREADS) as pool:
            mine = list(pool.map(lambda f: estimate_tokens(f, processor, num_frames), todo[rank::world]))
        parts: list = [None] * world
        dist.all_gather_object(parts, mine)
        tokens = [0] * len(todo)
        for r, part in enumerate(parts):
            tokens[r::world] = part
        return [todo[i] for i in split(tokens, shard_size, world)[rank]], shard_size

    def finish(self, summary: EncodeSummary) -> EncodeSummary:
        """Rank 0: the run's totals over every rank; the others: their own summary. A rank interrupted
        before (then it does not wait: some ranks may be gone) or while it waits keeps its own summary."""
        summary = replace(summary, ranks=self.ranks.world_size)
        try:
            if not summary.interrupted:
                parts: list | None = [None] * self.ranks.world_size if self.leader else None
                dist.gather_object(summary, parts, dst=0)
                if self.leader:
                    summary = combined(parts)
        except (RuntimeError, KeyboardInterrupt):  # a rank died (gloo says so at once), or torchrun stops the job
            summary = replace(summary, interrupted=True)
        finally:
            if self.owned:
                dist.destroy_process_group()
        return summary


def combined(parts: Sequence[EncodeSummary]) -> EncodeSummary:
    """One summary for a run made of ``parts`` (one per rank, rank 0 first): counts and bytes added,
    the wall time and the startup of the slowest rank, the mean busy and starved time per rank."""
    return replace(
        parts[0],
        encoded=sum(p.encoded for p in parts),
        failed=[f for p in parts for f in p.failed],
        passes=sum(p.passes for p in parts),
        tokens=sum(p.tokens for p in parts),
        seconds=max(p.seconds for p in parts),
        busy_seconds=sum(p.busy_seconds for p in parts) / len(parts),
        startup_seconds=max(p.startup_seconds for p in parts),
        starved_seconds=sum(p.starved_seconds for p in parts) / len(parts),
        bytes_written=sum(p.bytes_written for p in parts),
        shards=sum(p.shards for p in parts),
        pass_grids=[g for p in parts for g in p.pass_grids],
    )
