"""Codec-style sparse video sampling: the salient patches of many frames instead of every patch of a few.

A clip is sampled uniformly at up to 64 frames (the model's temporal context). Every patch of
every sampled frame gets a saliency score that fuses two signals a stock decoder gives:

- **motion**: the motion vectors the decoder exports (FFmpeg's ``export_mvs``: H.264 and MPEG-4
  part 2 export them; HEVC and intra-only codecs such as MJPEG and FFV1 do not). Every decoded frame
  between the previous sampled frame (exclusive) and this one (inclusive) is decoded, its vectors'
  magnitudes are painted over their blocks, and the patch's motion is the mean over those
  inter-coded frames (I-frames carry no vectors and are left out of the mean) of the patch's
  mean block motion, in pixels of the resized frame per decoded frame. A mean, not a sum: jitter
  of a few quarter-pixels on a static, noisy scene does not grow with the gap between sampled
  frames.
- **residual proxy**: the root-mean-square difference of the patch's luma (BT.601, pixels in
  ``[0, 1]``) to the same patch of the previous sampled frame (the first frame is compared with
  the second). It sees what motion vectors miss: intra-coded blocks, skipped blocks, lighting
  changes, and clips without vectors at all.

``score = motion_weight * min(motion / patch_size, 1) + residual_weight * residual``: both terms
lie in ``[0, 1]`` (motion of one patch side per frame saturates). The first sampled frame is kept
whole (``keep_first_frame``, the anchor the later patches are changes against), and the rest of
the ``patch_budget`` goes to a global top-K over the patches of the later frames whose score is
above ``min_score``, ties broken by the lower index in the ``(T, h, w)`` grid. Kept patches are
returned in ascending grid order (frame, row, column), the order the source model's
``visible_indices`` use.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageDraw

from ..validation import check_positive_int
from .video import (
    _count_decodable,
    _count_frames,
    _until_error,
    _video_stream,
    apply_display_matrix,
    describe_read_error,
    media_read_error,
    sample_frame_indices,
    upright_frame,
)

MOTION_CELL = 4
"""Side in pixels of the cells motion vectors are painted on (H.264's smallest partition)."""
MOTION_QUANTUM = 1024
"""Motion magnitudes are summed in whole 1/1024 pixels (exact, order-independent sums)."""
_LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))
"""BT.601 luma weights of R, G, B."""


@dataclass(frozen=True)
class MotionVideo:
    """Frames sampled from a video file, resized, with the motion the decoder exported for them."""

    frames: np.ndarray
    """``(T, H, W, 3)`` uint8 RGB frames, resized to the processor's target size."""
    motion: np.ndarray
    """``(T, h, w)`` float32 mean motion-vector magnitude of each patch, in pixels of the resized
    frame per decoded frame, over the decoded frames since the previous sampled frame."""
    frame_indices: tuple[int, ...]
    """Index of each sampled frame in the file (0-based, display order)."""
    total_frames: int
    """Frames in the file (from its metadata, or counted)."""
    original_size: tuple[int, int]
    """``(height, width)`` of the decoded frames, upright (display matrix applied)."""
    has_motion_vectors: bool
    """Whether the decoder exported any motion vector (False: intra-only or a codec without export)."""
    decoded_frames: int
    """Frames decoded to read the sample (all frames up to the last sampled one)."""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class CodecSaliency:
    """How a codec-sampled video's patches were scored and what it cost."""

    scores: torch.Tensor
    """``(T, h, w)`` float32 fused score of every patch of the sampled frames."""
    motion: torch.Tensor
    """``(T, h, w)`` float32 motion term before weighting (mean pixels per decoded frame)."""
    residual: torch.Tensor
    """``(T, h, w)`` float32 residual proxy (RMS luma difference to the previous sampled frame)."""
    has_motion_vectors: bool
    """False when the score rests on the residual proxy alone."""
    decoded_frames: int
    """Frames decoded (0 for in-memory frames)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Cost of this clip: ``decode`` (decoding every frame with motion vectors, converting and
    resizing the sampled ones), ``score`` (residual and fusion), ``select`` (top-K and
    patch extraction)."""


def read_video_with_motion(
    path: str | Path,
    num_frames: int,
    patch_size: int,
    target_size: Callable[[int, int], tuple[int, int]] | None = None,
    resize: Callable[[np.ndarray, tuple[int, int]], np.ndarray] | None = None,
) -> MotionVideo:
    """Decode the video at ``path`` with motion-vector export and sample ``num_frames`` frames
    uniformly (all, if it has fewer), with each sampled frame's per-patch motion.

    Every frame up to the last sampled one is decoded (motion vectors exist only for decoded
    frames); only the sampled ones are converted to RGB and resized. ``target_size(height, width)``
    gives the resized size of an upright frame (default: unchanged, which must then be a multiple
    of ``patch_size``) and ``resize(rgb, size)`` resizes (the processor's PIL resize).

    As :func:`~llava_vit.processing.video.read_video` reads a video: frame indices come from
    timestamps; frames are turned as the stream's display matrix says, and the motion maps with
    them; when the stream ends or fails before its header's frame count, the sample is drawn from
    the frames that do decode (a second pass), ``total_frames`` is their count and a warning says
    so; no frame is used twice. A file that cannot be read raises an error naming it.
    """
    num_frames = check_positive_int("num_frames", num_frames)
    patch_size = check_positive_int("patch_size", patch_size)
    try:
        with av.open(str(path)) as container:
            stream = _motion_stream(container, path)
            claimed = stream.frames or _count_frames(path)
            if claimed == 0:
                raise ValueError(f"cannot read video {path}: the video stream has no frames")
            reader = _MotionReader(path, patch_size, target_size, resize)
            if reader.read(container, stream, sample_frame_indices(claimed, num_frames)):
                return reader.result(claimed)
        decodable, error = _count_decodable(path)
        reason = f" ({describe_read_error(error)})" if error is not None else ""
        if decodable == 0:
            raise ValueError(f"cannot read video {path}: no frame could be decoded{reason}") from error
        with av.open(str(path)) as container:
            reader = _MotionReader(path, patch_size, target_size, resize)
            reader.read(container, _motion_stream(container, path), sample_frame_indices(decodable, num_frames))
    except (av.error.FFmpegError, OSError) as error:
        raise media_read_error(path, "video", error) from error
    if not reader.frames:
        raise ValueError(f"cannot read video {path}: no frame could be decoded on a second pass{reason}") from error
    note = (
        f"truncated or damaged video: only {decodable} of the {claimed} frames its header lists could be "
        f"decoded{reason}; {len(reader.frames)} frames sampled from those {decodable}"
    )
    return reader.result(decodable, note)


def _motion_stream(container, path):
    """The first video stream, set to export motion vectors."""
    stream = _video_stream(container, path)
    # Frame threading exports motion vectors that vary from run to run (seen with H.264);
    # slice threading keeps them exact.
    stream.thread_type = "SLICE"
    stream.codec_context.options = {"flags2": "+export_mvs"}
    return stream


class _MotionReader:
    """Decodes a stream, accumulates motion over the decoded frames, and collects the sampled
    frames (upright, resized) with the motion since the previous one."""

    def __init__(self, path, patch_size, target_size, resize):
        self.path, self.patch_size = path, patch_size
        self.target_size, self.resize = target_size, resize
        self.frames: list[np.ndarray] = []
        self.motion: list[np.ndarray] = []
        self.indices: list[int] = []
        self.notes: set[str] = set()
        self.has_motion_vectors = False
        self.coded_size: tuple[int, int] | None = None
        self.decoded = 0
        self._inter_frames = 0

    def read(self, container, stream, wanted: list[int]) -> bool:
        """Decode until every index of the sorted ``wanted`` is sampled (``True``) or the stream
        ends or fails (``False``). A wanted index that a timestamp gap skips takes the next frame,
        which is not taken again for a later index."""
        rate, time_base, start = stream.average_rate, stream.time_base, stream.start_time or 0
        timed = bool(rate) and time_base is not None
        errors: list[BaseException] = []
        k = 0
        for frame in _until_error(container.decode(stream), errors):
            self.decoded += 1
            position = round((frame.pts - start) * time_base * rate) if timed and frame.pts is not None else self.decoded - 1
            self._add_motion(frame)
            if position < wanted[k]:
                continue
            self._take(frame, position)
            while k < len(wanted) and wanted[k] <= position:
                k += 1
            if k == len(wanted):
                return True
        return False

    def result(self, total_frames: int, *warnings: str) -> MotionVideo:
        return MotionVideo(
            frames=np.stack(self.frames),
            motion=np.stack(self.motion),
            frame_indices=tuple(self.indices),
            total_frames=total_frames,
            original_size=self.upright_size,
            has_motion_vectors=self.has_motion_vectors,
            decoded_frames=self.decoded,
            warnings=(*warnings, *sorted(self.notes)),
        )

    def _setup(self, frame) -> None:
        """Sizes from the first frame: coded, upright (display matrix applied), resized; the
        motion cells, and the scale of each coded axis into pixels of the resized frame."""
        height, width = self.coded_size = (frame.height, frame.width)
        side = frame.side_data.get("DISPLAYMATRIX")
        self.matrix = None if side is None else np.frombuffer(bytes(side), dtype=np.int32)
        self.upright_size = self._upright(np.empty((height, width, 0), np.uint8)).shape[:2]
        size = self.target_size(*self.upright_size) if self.target_size else self.upright_size
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"frames of {size[1]}x{size[0]} are not a whole number of {self.patch_size}-pixel patches")
        self.size = size
        scale_rows, scale_cols = size[0] / self.upright_size[0], size[1] / self.upright_size[1]
        swapped = self._upright(np.empty((1, 2, 0), np.uint8)).shape[0] == 2
        self.scale = (scale_cols, scale_rows) if swapped else (scale_rows, scale_cols)
        self.cells = (math.ceil(height / MOTION_CELL), math.ceil(width / MOTION_CELL))
        self._deltas = np.zeros((self.cells[0] + 1, self.cells[1] + 1), dtype=np.float64)

    def _upright(self, array: np.ndarray) -> np.ndarray:
        return array if self.matrix is None else apply_display_matrix(array, self.matrix)[0]

    def _add_motion(self, frame) -> None:
        if self.coded_size is None:
            self._setup(frame)
        elif (frame.height, frame.width) != self.coded_size:
            raise ValueError(
                f"cannot read video {self.path}: the frame size changes mid-stream ({self.coded_size[1]}x"
                f"{self.coded_size[0]} to {frame.width}x{frame.height}); codec sampling needs one frame size"
            )
        if frame.pict_type == av.video.frame.PictureType.I:
            return
        self._inter_frames += 1
        side = frame.side_data.get("MOTION_VECTORS")
        if side is not None and len(side):
            self.has_motion_vectors = True
            self._deltas += motion_deltas(side.to_ndarray(), self.cells, self.scale)

    def _take(self, frame, position: int) -> None:
        rgb, note = upright_frame(frame)
        if note:
            self.notes.add(note)
        if self.resize is not None and rgb.shape[:2] != self.size:
            rgb = self.resize(rgb, self.size)
        rows, cols = self.cells
        total = self._deltas.cumsum(0).cumsum(1)[:rows, :cols]
        mean = self._upright((total / (MOTION_QUANTUM * max(self._inter_frames, 1))).astype(np.float32)[..., None])[..., 0]
        h, w = self.size[0] // self.patch_size, self.size[1] // self.patch_size
        height, width = self.upright_size
        pooled = Image.fromarray(np.ascontiguousarray(mean), mode="F").resize(
            (w, h), Image.Resampling.BOX, box=(0, 0, width / MOTION_CELL, height / MOTION_CELL)
        )
        self.frames.append(np.ascontiguousarray(rgb))
        self.motion.append(np.asarray(pooled, dtype=np.float32))
        self.indices.append(position)
        self._deltas[:] = 0
        self._inter_frames = 0


def motion_deltas(vectors: np.ndarray, cells: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """One frame's motion vectors (PyAV's ``MotionVectors.to_ndarray()``) as a ``(rows + 1, cols + 1)``
    difference array over ``cells`` (``MOTION_CELL``-pixel cells): its 2-D prefix sum gives each
    cell the magnitude of the vector of the block covering it, in ``1 / MOTION_QUANTUM`` pixels of
    the resized frame (0 where no block does).

    ``motion_x, motion_y`` are scaled by ``scale = (sy, sx)``; ``dst_x, dst_y`` are block centres,
    as FFmpeg exports them. The vectors of one block (both directions of a bi-predicted block) are
    averaged; blocks of one frame do not overlap in H.264 or MPEG-4 part 2. Magnitudes are rounded
    to whole quanta, so sums over frames are exact and do not depend on their order.
    """
    rows, cols = cells
    scale_y, scale_x = scale
    divisor = np.maximum(vectors["motion_scale"], 1).astype(np.float64)
    magnitude = np.hypot(vectors["motion_x"] / divisor * scale_x, vectors["motion_y"] / divisor * scale_y)
    x, y = vectors["dst_x"].astype(np.int64), vectors["dst_y"].astype(np.int64)
    bw, bh = vectors["w"].astype(np.int64), vectors["h"].astype(np.int64)
    block = (((y + 32768) * 65536 + x + 32768) * 256 + bw) * 256 + bh
    _, group, sharing = np.unique(block, return_inverse=True, return_counts=True)
    value = np.round(magnitude / sharing[group] * MOTION_QUANTUM)
    x0 = np.clip(np.floor((x - bw / 2) / MOTION_CELL), 0, cols).astype(np.int64)
    x1 = np.clip(np.ceil((x + bw / 2) / MOTION_CELL), 0, cols).astype(np.int64)
    y0 = np.clip(np.floor((y - bh / 2) / MOTION_CELL), 0, rows).astype(np.int64)
    y1 = np.clip(np.ceil((y + bh / 2) / MOTION_CELL), 0, rows).astype(np.int64)
    corners = np.concatenate((y0 * (cols + 1) + x0, y0 * (cols + 1) + x1, y1 * (cols + 1) + x0, y1 * (cols + 1) + x1))
    signed = np.concatenate((value, -value, -value, value))
    return np.bincount(corners, weights=signed, minlength=(rows + 1) * (cols + 1)).reshape(rows + 1, cols + 1)


def residual_energy(frames: np.ndarray, patch_size: int) -> np.ndarray:
    """``(T, h, w)`` float32 RMS luma difference of each patch to the same patch of the previous
    frame (frame 0 against frame 1; zeros for a single frame). ``frames`` is ``(T, H, W, 3)``,
    uint8 (divided by 255) or floating point in ``[0, 1]``."""
    t, height, width, _ = frames.shape
    p = patch_size
    h, w = height // p, width // p
    scale = np.float32(1 / 255) if frames.dtype == np.uint8 else np.float32(1)
    # Elementwise products, not a matrix product: BLAS may sum in an order that varies between runs.
    luma = [sum(weight * frame[..., c].astype(np.float32) for c, weight in enumerate(_LUMA)) * scale for frame in frames]
    out = np.zeros((t, h, w), dtype=np.float32)
    for i in range(t if t > 1 else 0):
        j = i - 1 if i > 0 else 1
        diff = (luma[i] - luma[j])[: h * p, : w * p]
        out[i] = np.sqrt(np.square(diff).reshape(h, p, w, p).mean(axis=(1, 3)))
    return out


def fuse_saliency(
    motion: np.ndarray, residual: np.ndarray, patch_size: int, motion_weight: float, residual_weight: float
) -> np.ndarray:
    """``motion_weight * min(motion / patch_size, 1) + residual_weight * residual`` (float32)."""
    motion_term = np.minimum(motion / np.float32(patch_size), np.float32(1))
    return (np.float32(motion_weight) * motion_term + np.float32(residual_weight) * residual).astype(np.float32)


def select_patches(
    scores: np.ndarray | torch.Tensor, patch_budget: int, keep_first_frame: bool = True, min_score: float = 0.0
) -> torch.Tensor:
    """Kept patches of a ``(T, h, w)`` score grid, as ascending flat indices into it (long).

    With ``keep_first_frame`` the ``h * w`` patches of frame 0 are kept and count against
    ``patch_budget`` (which must hold them); the rest of the budget goes to the highest-scoring
    patches of the other frames (of every frame without it) whose score exceeds ``min_score``
    (scores are >= 0, so a negative ``min_score`` fills the budget whenever the clip has enough
    patches). Ties go to the lower flat index, so the result depends on the scores alone. At
    least one patch is kept: without ``keep_first_frame``, the best one even when no score
    exceeds ``min_score``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be a (T, h, w) grid, got shape {tuple(scores.shape)}")
    patch_budget = check_positive_int("patch_budget", patch_budget)
    min_score = _check_min_score(min_score)
    first = 0
    if keep_first_frame:
        check_first_frame_fits(scores.shape[1], scores.shape[2], patch_budget)
        first = scores.shape[1] * scores.shape[2]
    candidates = scores.reshape(-1)[first:].astype(np.float64)
    order = np.lexsort((np.arange(candidates.size), -candidates))
    above = order[candidates[order] > min_score]
    order = above if len(above) or first else order[:1]
    chosen = torch.from_numpy(order[: patch_budget - first].astype(np.int64)) + first
    return torch.cat((torch.arange(first), chosen)).sort().values


def check_first_frame_fits(h: int, w: int, patch_budget: int) -> None:
    """Refuse a first frame of ``h x w`` patches that ``patch_budget`` cannot hold whole."""
    if h * w > patch_budget:
        raise ValueError(
            f"patch_budget={patch_budget} cannot hold the first frame whole ({h}x{w} = {h * w} patches); raise "
            f"patch_budget, shrink the frames (e.g. resize_mode='budget' with max_pixels), or set keep_first_frame=False"
        )


def _check_min_score(min_score) -> float:
    if isinstance(min_score, bool) or not isinstance(min_score, numbers.Real) or not math.isfinite(min_score):
        raise ValueError(f"min_score must be a finite number (negative: fill the budget), got {min_score!r}")
    return float(min_score)


def check_codec_options(patch_budget, keep_first_frame, motion_weight, residual_weight, min_score) -> dict:
    """Validated codec-sampling options (the processor's ``__init__`` arguments), as a dict."""
    weights = {}
    for name, value in (("motion_weight", motion_weight), ("residual_weight", residual_weight)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        weights[name] = float(value)
    if weights["motion_weight"] == 0 and weights["residual_weight"] == 0:
        raise ValueError("motion_weight and residual_weight are both 0: every patch would score 0")
    if not isinstance(keep_first_frame, bool):
        raise TypeError(f"keep_first_frame must be True or False, got {keep_first_frame!r}")
    return {
        "patch_budget": check_positive_int("patch_budget", patch_budget),
        "keep_first_frame": keep_first_frame,
        **weights,
        "min_score": _check_min_score(min_score),
    }


def draw_kept_patches(
    sample, processor, frames: np.ndarray | None = None, columns: int = 8, tile_width: int = 160
) -> Image.Image:
    """A picture of a codec-sampled video: its sampled frames in a grid (``columns`` per row,
    each scaled to ``tile_width`` pixels), the kept patches in full color, the rest
    dimmed to 30% (or dark gray without ``frames``), and a caption line with the counts.

    ``sample`` is a :class:`~llava_vit.processing.PackedSample` with ``kept_indices`` and
    ``processor`` the processor that made it (the kept pixels are taken from its
    ``hidden_states``). ``frames``, the ``(T, H, W, 3)`` uint8 frames at the processed size
    (e.g. :attr:`MotionVideo.frames`), shows the dropped patches too.
    """
    if getattr(sample, "kept_indices", None) is None or sample.sampled_grid_thw is None:
        raise ValueError("draw_kept_patches needs a codec-sampled video (a PackedSample with kept_indices)")
    columns = check_positive_int("columns", columns)
    tile_width = check_positive_int("tile_width", tile_width)
    t, h, w = sample.sampled_grid_thw
    p = processor.patch_size
    if frames is not None and tuple(frames.shape) != (t, h * p, w * p, 3):
        raise ValueError(f"frames must be ({t}, {h * p}, {w * p}, 3) uint8 (the sampled frames), got {tuple(frames.shape)}")
    kept = sample.kept_indices.numpy()
    pixels = processor.to_pixels(sample.hidden_states, (1, 1, len(kept)))[0]
    patches = pixels.reshape(p, len(kept), p, 3).transpose(1, 0, 2, 3)
    if frames is None:
        canvas = np.full((t, h, w, p, p, 3), 40, dtype=np.uint8)
    else:
        canvas = np.ascontiguousarray(frames.reshape(t, h, p, w, p, 3).transpose(0, 1, 3, 2, 4, 5) * 0.3, dtype=np.uint8)
    canvas.reshape(t * h * w, p, p, 3)[kept] = patches
    rows = math.ceil(t / columns)
    tile_height = max(1, round(tile_width * h / w))
    caption = 14
    picture = Image.new("RGB", (columns * (tile_width + 4), rows * (tile_height + 4) + caption), (0, 0, 0))
    first = " (first frame whole)" if len(kept) >= h * w and kept[h * w - 1] == h * w - 1 else ""
    ImageDraw.Draw(picture).text((2, 1), f"{len(kept)} of {t * h * w} patches kept{first}, {t} frames", fill=(255, 255, 255))
    for i in range(t):
        frame = canvas[i].transpose(0, 2, 1, 3, 4).reshape(h * p, w * p, 3)
        tile = Image.fromarray(frame).resize((tile_width, tile_height), Image.Resampling.BILINEAR)
        picture.paste(tile, ((i % columns) * (tile_width + 4) + 2, (i // columns) * (tile_height + 4) + 2 + caption))
    return picture

