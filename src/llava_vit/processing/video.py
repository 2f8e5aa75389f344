"""Video I/O: which files are videos, which frames to sample, and decoding only those frames with PyAV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from ..model.positions import interpolate_frame_indices
from ..validation import check_positive_int

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp"}
)

_SEEK_GAP_FRAMES = 300
"""Decode forward through gaps between sampled frames shorter than this, seek past longer ones.
Longer than common keyframe intervals (x264 defaults to 250), so a seek does not land behind the
frame the decoder is already at."""


def is_video_file(path: str | Path) -> bool:
    """Whether ``path`` names a video, judged by its extension (everything else is read as an image)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread uniformly over ``[0, total_frames - 1]``, both ends included.

    Frame ``i`` is ``round(i / (num_frames - 1) * (total_frames - 1))``, the same spacing the source
    model's temporal context uses; a clip with fewer frames gives all of them.
    """
    if total_frames <= num_frames:
        return list(range(total_frames))
    return interpolate_frame_indices(torch.arange(num_frames)[None], num_frames, total_frames)[0].tolist()


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from a video file."""

    frames: np.ndarray
    """``(T, H, W, 3)`` uint8 RGB."""
    frame_indices: tuple[int, ...]
    """Index of each frame in the file (0-based, in display order)."""
    total_frames: int
    """Frames in the file."""


def read_video(path: str | Path, num_frames: int = 8) -> VideoClip:
    """Decode ``num_frames`` frames spread uniformly over the video at ``path`` (all, if it has fewer).

    Only the sampled frames are converted to RGB; decoding stops after the last one, and long gaps
    between sampled frames are skipped by seeking.
    """
    num_frames = check_positive_int("num_frames", num_frames)
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = stream.frames or _count_frames(path)
        if total == 0:
            raise ValueError(f"{path}: the video stream has no frames")
        indices, frames = _decode_frames(container, stream, sample_frame_indices(total, num_frames))
    if not frames:
        raise ValueError(f"{path}: no frame could be decoded")
    return VideoClip(np.stack(frames), tuple(indices), total)


def _count_frames(path: str | Path) -> int:
    """Frames of a container that does not record the count: demux (no decoding) and count packets."""
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _decode_frames(container, stream, wanted: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """The frames at the sorted indices ``wanted``, as ``(indices found, RGB arrays)``.

    A frame's index comes from its timestamp (or from counting, when frames carry none). Should
    the stream end early (a frame count in the metadata that was too high), the last frame stands
    in for the missing ones.
    """
    rate, time_base, start = stream.average_rate, stream.time_base, stream.start_time or 0
    timed = bool(rate) and time_base is not None
    decoded = container.decode(stream)
    indices: list[int] = []
    frames: list[np.ndarray] = []
    frame, position, counter = None, -1, -1
    for target in wanted:
        if position < target:
            if timed and target - position > _SEEK_GAP_FRAMES:
                container.seek(start + int(target / (rate * time_base)), stream=stream)
                decoded = container.decode(stream)
            for frame in decoded:
                counter += 1
                position = round((frame.pts - start) * time_base * rate) if timed and frame.pts is not None else counter
                if position >= target:
                    break
            if frame is None:
                break
            array = frame.to_ndarray(format="rgb24")
        indices.append(position)
        frames.append(array)
    return indices, frames
