"""Video I/O: which files are videos, which frames to sample, and decoding only those frames with PyAV,
turned as a player shows them; and the read-error messages that image and video reading share."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..model.positions import interpolate_frame_indices
from ..validation import check_positive_int

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".3gp"}
)
ANIMATED_IMAGE_EXTENSIONS = frozenset({".gif", ".png", ".apng", ".webp"})
"""Extensions whose files may hold an animation (GIF, APNG, animated WebP): read as videos when they do."""
ANIMATED_IMAGE_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
"""Pillow formats that may hold an animation."""

_SEEK_GAP_FRAMES = 300
"""Decode forward through gaps between sampled frames shorter than this, seek past longer ones.
Longer than common keyframe intervals (x264 defaults to 250), so a seek does not land behind the
frame the decoder is already at."""


def is_animated_image(path: str | Path) -> bool:
    """Whether ``path`` is a GIF, APNG or WebP file with more than one frame (read from its header;
    ``False`` for any other file, and for one that cannot be opened: reading it will say why)."""
    if Path(path).suffix.lower() not in ANIMATED_IMAGE_EXTENSIONS:
        return False
    try:
        with Image.open(path) as opened:
            return opened.format in ANIMATED_IMAGE_FORMATS and bool(getattr(opened, "is_animated", False))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def is_video_file(path: str | Path) -> bool:
    """Whether ``path`` is read as a video: a video extension, or an animated GIF, APNG or WebP
    (a still GIF, PNG or WebP, like every other file, is read as an image)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS or is_animated_image(path)


def media_read_error(path: str | Path, what: str, error: BaseException) -> Exception:
    """The exception to raise (``from error``) when the ``what`` ("image", "video") file at ``path``
    cannot be read: it names the file and says what is wrong in words, without errno numbers or the
    names of library functions. Missing, folder and permission problems keep their OSError type;
    everything else is a ValueError."""
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"cannot read {what} {path}: no such file")
    if isinstance(error, IsADirectoryError):
        return IsADirectoryError(f"cannot read {what} {path}: it is a folder, not a file")
    if isinstance(error, PermissionError):
        return PermissionError(f"cannot read {what} {path}: permission denied")
    return ValueError(f"cannot read {what} {path}: {describe_read_error(error)}")


def describe_read_error(error: BaseException) -> str:
    """What went wrong, in words: PyAV's and OSError's text without ``[Errno N]`` and function names."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can read, or the file is damaged"
    if isinstance(error, av.error.InvalidDataError):
        return "the data is damaged, cut short or not in a format FFmpeg can read"
    if isinstance(error, av.error.FFmpegError) or (isinstance(error, OSError) and error.errno is not None):
        return (error.strerror or type(error).__name__).lower()
    text = str(error)
    if text.startswith(("image file is truncated", "Truncated File Read")):
        return "the image data ends early (the file is truncated or damaged)"
    if isinstance(error, OSError):
        return f"the image data is damaged ({text})"
    return text or type(error).__name__


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
    """``(T, H, W, 3)`` uint8 RGB, turned as the file's display matrix says."""
    frame_indices: tuple[int, ...]
    """Index of each frame in the file (0-based, in display order)."""
    total_frames: int
    """Frames in the file: those that could be decoded, when fewer than its header lists."""
    warnings: tuple[str, ...] = ()
    """How the file departed from what it claims (e.g. truncated), in words."""


def read_video(path: str | Path, num_frames: int = 8) -> VideoClip:
    """Decode ``num_frames`` frames spread uniformly over the video at ``path`` (all, if it has fewer).

    Only the sampled frames are converted to RGB; decoding stops after the last one, and long gaps
    between sampled frames are skipped by seeking. Frames are turned and flipped as the stream's
    display matrix says (a phone's portrait clip comes out portrait). When the stream ends or fails
    before its header's frame count, the frames that do decode are counted and the sample is drawn
    from those, with a warning in the clip; no frame is ever used twice. A file that cannot be read
    raises an error naming it (see :func:`media_read_error`).
    """
    num_frames = check_positive_int("num_frames", num_frames)
    try:
        return _read_video(path, num_frames)
    except (av.error.FFmpegError, OSError) as error:
        raise media_read_error(path, "video", error) from error


def _read_video(path: str | Path, num_frames: int) -> VideoClip:
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        claimed = stream.frames or _count_frames(path)
        if claimed == 0:
            raise ValueError(f"cannot read video {path}: the video stream has no frames")
        decoded = _decode_frames(container, stream, sample_frame_indices(claimed, num_frames))
    if decoded.complete:
        return VideoClip(np.stack(decoded.frames), tuple(decoded.indices), claimed, decoded.warnings)
    decodable, error = _count_decodable(path)
    reason = f" ({describe_read_error(error)})" if error is not None else ""
    if decodable == 0:
        raise ValueError(f"cannot read video {path}: no frame could be decoded{reason}") from error
    with av.open(str(path)) as container:
        decoded = _decode_frames(container, _video_stream(container, path), sample_frame_indices(decodable, num_frames))
    if not decoded.frames:
        raise ValueError(f"cannot read video {path}: no frame could be decoded on a second pass{reason}") from error
    note = (
        f"truncated or damaged video: only {decodable} of the {claimed} frames its header lists could be "
        f"decoded{reason}; {len(decoded.indices)} frames sampled from those {decodable}"
    )
    return VideoClip(np.stack(decoded.frames), tuple(decoded.indices), decodable, (note, *decoded.warnings))


def _video_stream(container, path):
    if not container.streams.video:
        raise ValueError(f"cannot read video {path}: the file holds no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _count_frames(path: str | Path) -> int:
    """Frames of a container that does not record the count: demux (no decoding) and count packets."""
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _count_decodable(path: str | Path) -> tuple[int, BaseException | None]:
    """Frames that decode from the start of the stream, and the error that stopped decoding (if any)."""
    errors: list[BaseException] = []
    with av.open(str(path)) as container:
        count = sum(1 for _ in _until_error(container.decode(_video_stream(container, path)), errors))
    return count, (errors[0] if errors else None)


def _until_error(frames: Iterator, errors: list[BaseException]) -> Iterator:
    """``frames``, ending at the first decoding error (appended to ``errors``) as at the stream's end."""
    try:
        yield from frames
    except av.error.FFmpegError as error:
        errors.append(error)


@dataclass
class _Decoded:
    indices: list[int]
    frames: list[np.ndarray]
    complete: bool
    """Whether the stream reached the last wanted frame (``False``: it ended or failed before)."""
    warnings: tuple[str, ...]


def _decode_frames(container, stream, wanted: list[int]) -> _Decoded:
    """The frames at the sorted indices ``wanted``, upright, in RGB.

    A frame's index comes from its timestamp (or from counting, when frames carry none). A wanted
    index that a timestamp gap skips takes the next frame, and when that frame was already taken
    (it stands past the next wanted index too) it is not taken again.
    """
    rate, time_base, start = stream.average_rate, stream.time_base, stream.start_time or 0
    timed = bool(rate) and time_base is not None
    errors: list[BaseException] = []
    decoded = _until_error(container.decode(stream), errors)
    indices: list[int] = []
    frames: list[np.ndarray] = []
    notes: set[str] = set()
    position, counter = -1, -1
    for target in wanted:
        if position >= target:
            continue
        if timed and target - position > _SEEK_GAP_FRAMES:
            container.seek(start + int(target / (rate * time_base)), stream=stream)
            decoded = _until_error(container.decode(stream), errors)
        for frame in decoded:
            counter += 1
            position = round((frame.pts - start) * time_base * rate) if timed and frame.pts is not None else counter
            if position >= target:
                break
        else:
            return _Decoded(indices, frames, False, tuple(sorted(notes)))
        array, note = upright_frame(frame)
        if note:
            notes.add(note)
        indices.append(position)
        frames.append(array)
    return _Decoded(indices, frames, True, tuple(sorted(notes)))


def upright_frame(frame: av.VideoFrame) -> tuple[np.ndarray, str | None]:
    """A decoded frame as ``(H, W, 3)`` RGB, turned as its display matrix says, and a note when the
    matrix asks for a turn other than a multiple of 90 degrees (left as stored)."""
    array = frame.to_ndarray(format="rgb24")
    side_data = frame.side_data.get("DISPLAYMATRIX")
    if side_data is None:
        return array, None
    return apply_display_matrix(array, np.frombuffer(bytes(side_data), dtype=np.int32))


def apply_display_matrix(array: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``array`` ``(H, W, C)`` as a player shows it under FFmpeg's 3x3 display ``matrix`` (9 int32,
    16.16 fixed point): the same turns and flips the ``ffmpeg`` command's autorotate applies.
    Returns the picture and a note when the angle is not a multiple of 90 degrees (left as stored)."""
    a, b, _, c, d = (float(v) for v in matrix[:5])
    scale_x, scale_y = math.hypot(a, c), math.hypot(b, d)
    if scale_x == 0 or scale_y == 0:
        return array, "the video's display matrix is degenerate; frames left as stored"
    theta = float(round(math.degrees(math.atan2(b / scale_y, a / scale_x))))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        turned = array.transpose(1, 0, 2) if c > 0 else np.rot90(array, -1)
    elif abs(theta - 180) < 1:
        turned = array[:: -1 if d < 0 else 1, :: -1 if a < 0 else 1]
    elif abs(theta - 270) < 1:
        turned = array[::-1, ::-1].transpose(1, 0, 2) if c < 0 else np.rot90(array, 1)
    elif abs(theta) < 1:
        turned = array[::-1] if d < 0 else array
    else:
        return array, (f"the video's display matrix turns it {theta:g} degrees clockwise; only multiples of 90 are "
                       f"applied, frames left as stored")
    return (array if turned is array else np.ascontiguousarray(turned)), None
