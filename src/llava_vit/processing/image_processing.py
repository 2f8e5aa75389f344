"""Images and videos in, packed encoder inputs out: ``hidden_states``, ``grid_thw``, ``patch_positions``.

Every picture follows the original implementation's recipe: an RGB image, resized (by default
each side floored to a patch multiple with PIL bicubic), then torchvision's ``ToTensor`` +
``Normalize`` and the ``(h, w, C, p, p)`` patch layout (docs/ARCHITECTURE.md, "The packing
contract"). The same float32 operations run once on the whole picture (or clip), on pixels put in
patch order while they are still bytes, so results are bit-identical to that recipe's
(docs/PROCESSING.md, "The processor"). Files are read as a viewer shows them: EXIF orientation,
high bit depths scaled to 8 bits, transparency over a background colour, a video's display
matrix, animated GIF/APNG/WebP as videos. Videos are decoded with PyAV, converting only the
sampled frames to RGB, and their frames are placed in the source model's 64-frame temporal
context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers import AutoImageProcessor, BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from ..model.configuration import LlavaViTPackingConfig
from ..model.positions import (
    SOURCE_TEMPORAL_CONTEXT,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)
from ..validation import check_positive_int
from .codec import (
    CodecSaliency,
    check_codec_options,
    check_first_frame_fits,
    fuse_saliency,
    read_video_with_motion,
    residual_energy,
    select_patches,
)
from .video import (
    ANIMATED_IMAGE_FORMATS,
    VideoClip,
    is_animated_image,
    is_video_file,
    media_read_error,
    read_video,
    sample_frame_indices,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("floor", "fixed", "budget")
VIDEO_SAMPLINGS = ("uniform", "codec")
ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
"""A path, a PIL image (any mode), an ``(H, W[, C])`` array or a ``(C, H, W)`` tensor; C in 1, 3, 4."""
VideoInput = Union[str, Path, np.ndarray, torch.Tensor, Sequence[ImageInput]]
"""A video file, a ``(T, H, W[, C])`` array, a ``(T, C, H, W)`` tensor, or a sequence of frames."""

WHITE = (255, 255, 255)
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
"""PIL modes of 16-bit, 32-bit integer and floating-point gray pictures: scaled to 8 bits, not clipped."""
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for a file it cannot read (turned into an error naming the file)."""


def check_background(background) -> tuple[int, int, int]:
    """``background`` as an ``(R, G, B)`` tuple of ints in 0..255, or a ValueError saying what was given."""
    if (not isinstance(background, (list, tuple)) or len(background) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in background)):
        raise ValueError(f"background must be 3 integers in 0..255 (R, G, B), got {background!r}")
    return tuple(int(v) for v in background)


def load_image(image: str | Path | Image.Image, background: Sequence[int] = WHITE) -> Image.Image:
    """An RGB PIL image as an image viewer shows it.

    EXIF orientation is applied. 8-bit modes (L, P, CMYK, YCbCr, ...) use PIL's ``convert("RGB")``;
    16-bit, 32-bit integer and float gray modes are scaled to 8 bits (see :func:`eight_bit_gray`);
    transparent and translucent pixels are composited on ``background`` (an opaque picture keeps
    exactly its ``convert("RGB")`` pixels). An animated file gives its first frame. A file that
    cannot be read raises an error naming it and saying why.
    """
    background = check_background(background)
    if isinstance(image, (str, Path)):
        return _open_image(image, background)[0]
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a path or a PIL.Image.Image, got {type(image).__name__}")
    return _upright_rgb(image, background)


def _open_image(path: str | Path, background: Sequence[int]) -> tuple[Image.Image, tuple[str, ...]]:
    """The picture in the file at ``path`` as :func:`load_image` gives it, and a note when the file
    is an animation read as its first frame."""
    try:
        with Image.open(path) as opened:
            animated = opened.format in ANIMATED_IMAGE_FORMATS and getattr(opened, "is_animated", False)
            frames = opened.n_frames if animated else 1
            opened.load()
            picture = _upright_rgb(opened, background)
    except _READ_ERRORS as error:
        raise media_read_error(path, "image", error) from error
    if frames == 1:
        return picture, ()
    return picture, (f"animated image with {frames} frames read as its first frame; "
                     f"preprocess_file or preprocess_video read it as a video",)


def read_animation(path: str | Path, num_frames: int = 8, background: Sequence[int] = WHITE) -> VideoClip:
    """``num_frames`` frames spread uniformly over the animated GIF, APNG or WebP at ``path`` (all,
    if it has fewer), chosen by frame count as :func:`~llava_vit.processing.video.read_video` chooses
    a video's (frame durations are not used). Each frame is the whole canvas as a viewer shows it at
    that point (Pillow applies the frames' disposal and blending), transparency on ``background``."""
    num_frames = check_positive_int("num_frames", num_frames)
    background = check_background(background)
    try:
        with Image.open(path) as opened:
            total = getattr(opened, "n_frames", 1)
            indices = sample_frame_indices(total, num_frames)
            frames = []
            for index in indices:
                opened.seek(index)
                frames.append(np.asarray(_upright_rgb(opened, background)))
    except _READ_ERRORS as error:
        raise media_read_error(path, "animated image", error) from error
    return VideoClip(np.stack(frames), tuple(indices), total)


def _upright_rgb(image: Image.Image, background: Sequence[int] = WHITE) -> Image.Image:
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image = eight_bit_gray(image)
    if image.has_transparency_data:
        return _composited(image, background)
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error


def eight_bit_gray(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float gray picture as 8-bit ``"L"`` (``"LA"`` when a value is
    marked transparent), as viewers show it instead of clipping at 255.

    16-bit values keep their high byte (``v >> 8``, as Pillow reads 16-bit RGB PNGs, so a 16-bit
    gray picture and its 16-bit RGB twin give the same pixels); 32-bit integers in 0..65535 are
    taken as 16-bit (Pillow opens some 16-bit files as mode ``"I"``); floats in [0, 1] are scaled
    by 255 (the convention of float pictures, as for float arrays), rounded. Other value ranges
    are stretched from their minimum to their maximum; NaN becomes 0.
    """
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
        eight = _stretched(values, low, high) if low < 0 or high > 1 else np.clip(values, 0, 1) * 255
        eight = np.where(np.isnan(eight), 0, np.round(eight))
    else:
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low >= 0 and high <= 65535:
            eight = values >> 8
        else:
            eight = np.round(_stretched(values.astype(np.float64), low, high))
    gray = Image.fromarray(np.ascontiguousarray(eight, dtype=np.uint8), "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)):
        gray.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L"))
    return gray


def _stretched(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from ``[low, high]`` onto ``[0, 255]``; a flat picture is clipped to 0..255."""
    if high <= low:
        return np.clip(values, 0, 255)
    return np.clip((values - low) * (255 / (high - low)), 0, 255)


def _composited(image: Image.Image, background: Sequence[int]) -> Image.Image:
    """A picture with an alpha channel or a transparent colour, over an opaque ``background``: what
    viewers show. A fully opaque picture gives exactly ``image.convert("RGB")`` (the original
    recipe's pixels)."""
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema()[0] == 255:
        return rgba.convert("RGB")
    canvas = Image.new("RGB", rgba.size, tuple(background))
    canvas.paste(rgba, mask=alpha)
    return canvas


def _pixels(image: ImageInput, name: str, background: Sequence[int] = WHITE) -> Image.Image | np.ndarray:
    """One picture as an RGB PIL image, or an ``(H, W, 3)`` uint8 or float32 array; alpha (a fourth
    channel, or a PIL mode with transparency) composited on ``background``."""
    if isinstance(image, (str, Path)):
        return _open_image(image, background)[0]
    if isinstance(image, Image.Image):
        return _upright_rgb(image, background)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype.is_floating_point:
            tensor = tensor.float()
        if tensor.dim() == 3:
            tensor = tensor.permute(1, 2, 0)
        elif tensor.dim() != 2:
            raise ValueError(f"{name} must be a (C, H, W) or (H, W) tensor, got shape {tuple(image.shape)}")
        array = tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim not in (2, 3):
            raise ValueError(f"{name} must be an (H, W, C) or (H, W) array, got shape {array.shape}")
    else:
        raise TypeError(f"{name} must be a path, PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"{name} must have 1 (gray), 3 (RGB) or 4 (RGBA) channels (arrays channel-last, tensors "
            f"channel-first), got {channels} in shape {tuple(image.shape)}"
        )
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} pixels must be uint8 (0..255) or floating point (0..1), got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name}: floating-point pixels must be in [0, 1] (what ToTensor gives), got values in "
                f"[{low:.3g}, {high:.3g}]; pass uint8 pixels (0..255) or divide by 255 (not normalized pixels)"
            )
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4 and array.dtype == np.uint8:
        return _composited(Image.fromarray(np.ascontiguousarray(array), "RGBA"), background)
    elif channels == 4:
        alpha = array[..., 3:].astype(np.float32)
        array = array[..., :3] * alpha + np.asarray(background, np.float32) / 255 * (1 - alpha)
    if array.dtype == np.uint8:
        return array
    return np.ascontiguousarray(array, dtype=np.float32)


def _size_of(pixels: Image.Image | np.ndarray) -> tuple[int, int]:
    """``(height, width)``."""
    if isinstance(pixels, Image.Image):
        return pixels.height, pixels.width
    return pixels.shape[0], pixels.shape[1]


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """Qwen2-VL's pixel-budget rule: sides rounded to multiples of ``factor``, aspect ratio kept,
    and the area scaled into ``[min_pixels, max_pixels]`` when it falls outside (either bound may
    be ``None``). ``max_pixels`` wins when both cannot hold. A side is never below ``factor``, so a
    strip longer than ``max_pixels / factor**2`` patches can exceed ``max_pixels``. Returns
    ``(height, width)``."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    def scaled(area: float, rounding) -> tuple[int, int]:
        beta = math.sqrt(area / (height * width))
        return (max(factor, rounding(height * beta / factor) * factor),
                max(factor, rounding(width * beta / factor) * factor))

    new_h, new_w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if min_pixels is not None and new_h * new_w < min_pixels:
        new_h, new_w = scaled(min_pixels, math.ceil)
    if max_pixels is not None and new_h * new_w > max_pixels:
        new_h, new_w = scaled(max_pixels, math.floor)
    return new_h, new_w


@dataclass(frozen=True)
class PackedSample:
    """One image or video, patchified: its rows of the packed model inputs, and where they came from."""

    hidden_states: torch.Tensor
    """``(t*h*w, 3*p*p)`` float32 patches, channel-major within a patch."""
    grid_thw: tuple[int, int, int]
    patch_positions: torch.Tensor
    """``(t*h*w, 3)`` long RoPE positions: t is the frame's slot in the temporal context (0 for images)."""
    original_size: tuple[int, int]
    """``(height, width)`` before resizing."""
    frame_indices: tuple[int, ...] = (0,)
    """Index of each encoded frame in its source (videos)."""
    total_frames: int = 1
    """Frames in the source (videos)."""
    kind: str = "image"
    """``"image"`` or ``"video"``: what the source is (a one-frame video stays a video)."""
    warnings: tuple[str, ...] = ()
    """What a user should know about how this input was read (e.g. a damaged video cut short)."""
    kept_indices: torch.Tensor | None = None
    """Codec-sampled videos: ``(N,)`` long, ascending indices of the kept patches in the
    ``sampled_grid_thw`` grid of the sampled frames (``None``: every patch is there). Row ``i`` of
    ``hidden_states`` is patch ``kept_indices[i]``; ``grid_thw`` is then ``(1, 1, N)``, which
    gives the model the token count, and ``patch_positions`` the true ``[t, h, w]``."""
    sampled_grid_thw: tuple[int, int, int] | None = None
    """Codec-sampled videos: ``(T, h, w)`` patch grid of all sampled frames, before selection."""
    codec: CodecSaliency | None = None
    """Codec-sampled videos: the patch scores and the cost (seconds) of sampling this clip."""

    @property
    def num_tokens(self) -> int:
        return self.hidden_states.shape[0]


class LlavaViTPackingImageProcessor(BaseImageProcessor):
    r"""Turns images and videos into the packed inputs of :class:`~llava_vit.LlavaViTPackingModel`.

    ``processor(images=..., videos=...)`` returns a ``BatchFeature`` with ``hidden_states``
    ``(seq_len, 3*p*p)``, ``grid_thw`` ``(num_samples, 3)`` and ``patch_positions`` ``(seq_len, 3)``,
    ready for ``model(**inputs)``. Samples are the images in order, then the videos in order; row
    ``i`` of ``grid_thw`` is sample ``i``, and :func:`split_packed` cuts per-token outputs back into
    samples (``pooler_output`` already has one row per sample).

    Args:
        patch_size: side of a square patch, in pixels (the model's ``patch_size``).
        image_mean, image_std: per-channel normalization (CLIP's by default).
        do_rescale, rescale_factor: divide 8-bit pixels by ``1 / rescale_factor`` (255) first, as
            ``ToTensor`` does.
            Floating-point inputs are taken as already in ``[0, 1]``, as ``ToTensor`` does.
        do_normalize: apply ``image_mean`` / ``image_std``.
        resample: PIL filter for resizing (3 = bicubic, the original recipe's).
        resize_mode: ``"floor"`` (the original recipe's: each side floored to a patch multiple),
            ``"fixed"`` (every picture resized to ``size``), or ``"budget"`` (aspect kept, sides
            rounded to patch multiples, area brought into ``[min_pixels, max_pixels]``, as
            Qwen2-VL does; see :func:`smart_resize`).
        size: ``{"height": H, "width": W}`` (or one int for a square) for ``"fixed"``; multiples
            of ``patch_size``.
        min_pixels, max_pixels: area bounds for ``"budget"`` (either may be ``None``).
        temporal_context: frames of the temporal context the model was trained with; a video's
            ``T`` frames get temporal positions ``round(i / (T-1) * (temporal_context-1))``.
        num_frames: frames sampled uniformly from each video (all of them, if it has fewer).
        max_tokens: most tokens one input may have (all frames of a uniformly sampled video
            together, one frame of a codec-sampled one); a larger picture is scaled down, aspect
            kept, until it fits, and its sample says so in ``warnings``. ``None``: no limit.
        video_sampling: ``"uniform"`` (every patch of ``num_frames`` frames) or ``"codec"``
            (the salient patches of ``temporal_context`` frames, see
            :mod:`llava_vit.processing.codec` and docs/CODEC_SAMPLING.md).
        patch_budget: ``"codec"``: most patches kept per video (the first frame included).
        keep_first_frame: ``"codec"``: keep every patch of the first sampled frame.
        motion_weight, residual_weight: ``"codec"``: weights of the motion-vector term and of
            the residual proxy in a patch's score (each term in ``[0, 1]``).
        min_score: ``"codec"``: patches scoring at most this are never kept, so a static clip
            spends little beyond its first frame; a negative value fills the budget.
        background: ``(R, G, B)`` 0..255 colour that transparent and translucent pixels (RGBA,
            LA, palette transparency, 4-channel arrays) are composited on, as a viewer shows them;
            white by default. Opaque pictures are unaffected, bit for bit.
    """

    model_input_names = ["hidden_states", "grid_thw", "patch_positions"]

    def __init__(
        self,
        patch_size: int = 16,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        resample: int = Image.Resampling.BICUBIC,
        resize_mode: str = "floor",
        size: int | dict[str, int] | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        temporal_context: int = SOURCE_TEMPORAL_CONTEXT,
        num_frames: int = 8,
        max_tokens: int | None = None,
        video_sampling: str = "uniform",
        patch_budget: int = 4096,
        keep_first_frame: bool = True,
        motion_weight: float = 1.0,
        residual_weight: float = 1.0,
        min_score: float = 0.02,
        background: Sequence[int] = WHITE,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.patch_size = check_positive_int("patch_size", patch_size)
        for name, values in (("image_mean", image_mean), ("image_std", image_std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {values!r}")
        if min(image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {image_std!r}")
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if not isinstance(rescale_factor, (int, float)) or rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a positive number, got {rescale_factor!r}")
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        try:
            self.resample = int(Image.Resampling(resample))
        except ValueError as error:
            raise ValueError(f"resample must be a PIL filter (0-5, 3 = bicubic), got {resample!r}") from error
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        self.size = self._check_size(size)
        self._check_pixel_bounds(min_pixels, max_pixels)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.temporal_context = check_positive_int("temporal_context", temporal_context)
        self.num_frames = check_positive_int("num_frames", num_frames)
        self.max_tokens = None if max_tokens is None else check_positive_int("max_tokens", max_tokens)
        if video_sampling not in VIDEO_SAMPLINGS:
            raise ValueError(f"video_sampling must be one of {VIDEO_SAMPLINGS}, got {video_sampling!r}")
        self.video_sampling = video_sampling
        codec = check_codec_options(patch_budget, keep_first_frame, motion_weight, residual_weight, min_score)
        self.patch_budget = codec["patch_budget"]
        self.keep_first_frame = codec["keep_first_frame"]
        self.motion_weight = codec["motion_weight"]
        self.residual_weight = codec["residual_weight"]
        self.min_score = codec["min_score"]
        self.background = list(check_background(background))  # a list, as JSON gives it back

    def _check_size(self, size) -> dict[str, int] | None:
        if self.resize_mode != "fixed":
            if size is not None:
                raise ValueError(
                    f"size is only used with resize_mode='fixed', got size={size!r} with {self.resize_mode!r}"
                )
            return None
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or set(size) != {"height", "width"}:
            raise ValueError(f"resize_mode='fixed' needs size={{'height': H, 'width': W}} (or an int), got {size!r}")
        for side in ("height", "width"):
            value = check_positive_int(f"size['{side}']", size[side])
            if value % self.patch_size:
                raise ValueError(f"size['{side}'] must be a multiple of patch_size={self.patch_size}, got {value}")
        return {"height": int(size["height"]), "width": int(size["width"])}

    def _check_pixel_bounds(self, min_pixels, max_pixels) -> None:
        if self.resize_mode != "budget":
            if min_pixels is not None or max_pixels is not None:
                raise ValueError(
                    f"min_pixels / max_pixels are only used with resize_mode='budget', got "
                    f"min_pixels={min_pixels!r}, max_pixels={max_pixels!r} with {self.resize_mode!r}"
                )
            return
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None:
                check_positive_int(name, value)
        if max_pixels is not None and max_pixels < self.patch_size**2:
            raise ValueError(f"max_pixels must hold at least one patch ({self.patch_size**2}), got {max_pixels}")
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")

    def target_size(self, height: int, width: int, frames: int = 1) -> tuple[int, int]:
        """``(height, width)`` a picture of this size is resized to, by ``resize_mode``, then scaled
        down until ``frames`` such pictures fit in ``max_tokens`` tokens."""
        size = self._mode_size(height, width)
        if self.max_tokens is None or frames * (size[0] // self.patch_size) * (size[1] // self.patch_size) <= self.max_tokens:
            return size
        p, per_frame = self.patch_size, self.max_tokens // frames
        if self.resize_mode == "fixed" or per_frame < 1:
            raise ValueError(
                f"{frames} frame(s) of {size[1]}x{size[0]} pixels are "
                f"{frames * (size[0] // p) * (size[1] // p)} tokens, more than max_tokens={self.max_tokens}; "
                f"raise max_tokens{' or choose a smaller size' if self.resize_mode == 'fixed' else ' or sample fewer frames'}"
            )
        scale = math.sqrt(per_frame * p * p / (size[0] * size[1]))
        capped = max(p, math.floor(size[0] * scale / p) * p), max(p, math.floor(size[1] * scale / p) * p)
        if frames * (capped[0] // p) * (capped[1] // p) > self.max_tokens:
            raise ValueError(
                f"a {width}x{height} picture is too elongated to fit max_tokens={self.max_tokens} at patch "
                f"size {p} without a side below one patch; raise max_tokens"
            )
        return capped

    def _mode_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if self.resize_mode == "fixed":
            return self.size["height"], self.size["width"]
        if self.resize_mode == "budget":
            return smart_resize(height, width, p, self.min_pixels, self.max_pixels)
        if height < p or width < p:
            if width < p and height < p:
                problem = f"is smaller than one {p}x{p} patch"
            elif width < p:
                problem = f"is {width} pixels wide, narrower than one {p}-pixel patch, so no column of patches fits"
            else:
                problem = f"is {height} pixels high, shorter than one {p}-pixel patch, so no row of patches fits"
            raise ValueError(
                f"a {width}x{height} picture {problem}: resize_mode='floor' (the default) only crops each side "
                f"to a multiple of {p} and never scales up; pass resize_mode='budget' (sides scaled to patch "
                f"multiples, aspect kept, area set by min_pixels / max_pixels) or resize_mode='fixed' with a size"
            )
        return height // p * p, width // p * p

    def _resized(self, pixels: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``(H, W, 3)`` array of ``pixels`` resized to ``size`` with PIL (per channel for floats)."""
        height, width = size
        if _size_of(pixels) == size:
            return np.asarray(pixels)
        if isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8:
            pixels = Image.fromarray(pixels)
        if isinstance(pixels, Image.Image):
            return np.asarray(pixels.resize((width, height), resample=self.resample))
        channels = [
            np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize((width, height), self.resample))
            for c in range(3)
        ]
        return np.stack(channels, axis=-1)

    def _patchify(self, frames: np.ndarray, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(T, H, W, 3)`` resized frames → ``(T*h*w, 3*p*p)`` normalized float32 patches
        (only the patches at the flat indices ``keep``, when given).

        Exactly ``ToTensor`` (8-bit pixels divided by 255) and ``Normalize`` (subtract the mean,
        divide by the std, in float32), applied to pixels already in patch order.
        """
        p = self.patch_size
        t, height, width, channels = frames.shape
        h, w = height // p, width // p
        layout = torch.from_numpy(frames).view(t, h, p, w, p, channels).permute(0, 1, 3, 5, 2, 4)  # (t, h, w, C, p, p)
        if keep is not None:
            layout = layout[keep // (h * w), keep // w % h, keep % w]
        patches = torch.empty(layout.shape, dtype=torch.float32).copy_(layout)
        if frames.dtype == np.uint8 and self.do_rescale:
            patches.div_(1 / self.rescale_factor)
        if self.do_normalize:
            patches.sub_(torch.tensor(self.image_mean).view(3, 1, 1)).div_(torch.tensor(self.image_std).view(3, 1, 1))
        return patches.view(-1, channels * p * p)

    def _resized_frames(self, frames: list[Image.Image | np.ndarray]) -> tuple[tuple[int, int], np.ndarray]:
        """The frames' common ``(height, width)``, and the ``(T, H, W, 3)`` frames resized to the target size."""
        original = _size_of(frames[0])
        for i, frame in enumerate(frames):
            if _size_of(frame) != original:
                raise ValueError(
                    f"all frames of a video must have one size: frame {i} is {_size_of(frame)[::-1]} (WxH), "
                    f"frame 0 is {original[::-1]}"
                )
        size = self.target_size(*original, frames=len(frames) if self.video_sampling == "uniform" else 1)
        arrays = [self._resized(frame, size) for frame in frames]
        if len({a.dtype for a in arrays}) > 1:
            raise ValueError("frames of a video must be all 8-bit or all floating point, got a mix")
        return original, np.stack(arrays)

    def _sample(self, frames: list[Image.Image | np.ndarray], frame_indices, total_frames: int, kind: str,
                warnings: tuple[str, ...] = ()) -> PackedSample:
        original, resized = self._resized_frames(frames)
        t, height, width, _ = resized.shape
        h, w = height // self.patch_size, width // self.patch_size
        slots = interpolate_frame_indices(torch.arange(t)[None], t, self.temporal_context)
        uncapped = self._mode_size(*original)
        if uncapped != (height, width):
            warnings = (*warnings, f"scaled down to {width}x{height} pixels ({t * h * w} tokens) to fit "
                                   f"max_tokens={self.max_tokens}; {uncapped[1]}x{uncapped[0]} would be "
                                   f"{t * (uncapped[0] // self.patch_size) * (uncapped[1] // self.patch_size)}")
        return PackedSample(
            hidden_states=self._patchify(resized),
            grid_thw=(t, h, w),
            patch_positions=compute_patch_positions_with_interpolated_temporal(slots, h, w),
            original_size=original,
            frame_indices=tuple(int(i) for i in frame_indices),
            total_frames=total_frames,
            kind=kind,
            warnings=warnings,
        )

    def preprocess_image(self, image: ImageInput) -> PackedSample:
        """One image → its :class:`PackedSample` (``t = 1``, temporal position 0). An animated image
        file gives its first frame, and ``warnings`` says so (:meth:`preprocess_file` reads it as a video)."""
        if isinstance(image, (str, Path)):
            picture, warnings = _open_image(image, self.background)
            return self._sample([picture], (0,), 1, "image", warnings)
        return self._sample([_pixels(image, "image", self.background)], (0,), 1, "image")

    def preprocess_file(self, path: str | Path, num_frames: int | None = None) -> PackedSample:
        """One media file → its :class:`PackedSample`, read as a video or an image by what it is: a
        video extension, or an animated GIF, APNG or WebP (kind ``"video"``, frames sampled like a
        video's), is a video; everything else, a one-frame GIF included, is an image."""
        if is_video_file(path):
            return self.preprocess_video(path, num_frames)
        return self.preprocess_image(path)

    def preprocess_video(self, video: VideoInput, num_frames: int | None = None) -> PackedSample:
        """One video → its :class:`PackedSample`: ``num_frames`` (default: the processor's) frames
        sampled uniformly, temporal positions spread over the temporal context.

        With ``video_sampling="codec"``, ``num_frames`` (default: ``temporal_context``) frames are
        sampled and only their salient patches kept (see :meth:`preprocess_video_codec`).
        """
        if self.video_sampling == "codec":
            return self.preprocess_video_codec(video, num_frames)
        num_frames = self.num_frames if num_frames is None else check_positive_int("num_frames", num_frames)
        if isinstance(video, (str, Path)):
            if is_animated_image(video):
                clip = read_animation(video, num_frames, self.background)
            else:
                clip = read_video(video, num_frames)
            return self._sample(list(clip.frames), clip.frame_indices, clip.total_frames, "video", clip.warnings)
        frames, indices = self._frames_in_memory(video, num_frames)
        return self._sample(frames, indices, len(video), "video")

    def _frames_in_memory(self, video: VideoInput, num_frames: int) -> tuple[list[Image.Image | np.ndarray], list[int]]:
        """``num_frames`` frames sampled uniformly from a video array, tensor or frame list, and their indices."""
        if isinstance(video, (np.ndarray, torch.Tensor)):
            if video.ndim not in (3, 4):
                raise ValueError(
                    f"video must be a (T, H, W[, C]) array or a (T, C, H, W) tensor, got shape {tuple(video.shape)}"
                )
        elif not isinstance(video, (list, tuple)):
            raise TypeError(
                f"video must be a file path, an array, a tensor or a list of frames, got {type(video).__name__}"
            )
        if len(video) == 0:
            raise ValueError("video has no frames")
        indices = sample_frame_indices(len(video), num_frames)
        return [_pixels(video[i], f"video frame {i}", self.background) for i in indices], indices

    def preprocess_video_codec(self, video: VideoInput, num_frames: int | None = None) -> PackedSample:
        """One video → the :class:`PackedSample` of its salient patches (whatever ``video_sampling`` says).

        ``num_frames`` (default ``temporal_context``, at most that) frames are sampled uniformly,
        every patch scored by motion vectors and the residual proxy, and at most ``patch_budget``
        patches kept (:mod:`llava_vit.processing.codec`). A video file is decoded in full up to
        its last sampled frame for the motion vectors; animated images and frames in memory
        (arrays, frame lists) have none and are scored by the residual proxy alone.
        """
        num_frames = self.temporal_context if num_frames is None else check_positive_int("num_frames", num_frames)
        if num_frames > self.temporal_context:
            raise ValueError(
                f"codec sampling places frames in the {self.temporal_context}-frame temporal context; "
                f"num_frames must be at most {self.temporal_context}, got {num_frames}"
            )
        start = time.perf_counter()
        if isinstance(video, (str, Path)) and not is_animated_image(video):
            clip = read_video_with_motion(video, num_frames, self.patch_size, self._codec_target_size, self._resized)
            frames, motion, indices, total = clip.frames, clip.motion, clip.frame_indices, clip.total_frames
            original, has_vectors, decoded = clip.original_size, clip.has_motion_vectors, clip.decoded_frames
            warnings = clip.warnings
        else:
            if isinstance(video, (str, Path)):
                animation = read_animation(video, num_frames, self.background)
                sampled, indices, total = list(animation.frames), animation.frame_indices, animation.total_frames
                warnings = animation.warnings
            else:
                sampled, indices = self._frames_in_memory(video, num_frames)
                total, warnings = len(video), ()
            original, frames = self._resized_frames(sampled)
            has_vectors, decoded = False, 0
            p = self.patch_size
            motion = np.zeros((frames.shape[0], frames.shape[1] // p, frames.shape[2] // p), dtype=np.float32)
        decoded_at = time.perf_counter()
        residual = residual_energy(frames, self.patch_size)
        scores = fuse_saliency(motion, residual, self.patch_size, self.motion_weight, self.residual_weight)
        scored_at = time.perf_counter()
        kept = select_patches(scores, self.patch_budget, self.keep_first_frame, self.min_score)
        t, h, w = scores.shape
        slots = interpolate_frame_indices(torch.arange(t)[None], t, self.temporal_context)[0]
        positions = torch.stack((slots[kept // (h * w)], kept // w % h, kept % w), dim=-1)
        hidden_states = self._patchify(frames, kept)
        done = time.perf_counter()
        if not has_vectors:
            warnings += ("no motion vectors (an intra-only stream, a codec without export, an animated image or "
                         "frames in memory): patches scored by the residual proxy alone",)
        return PackedSample(
            hidden_states=hidden_states,
            grid_thw=(1, 1, len(kept)),
            patch_positions=positions,
            original_size=original,
            frame_indices=tuple(int(i) for i in indices),
            total_frames=total,
            kind="video",
            warnings=tuple(warnings),
            kept_indices=kept,
            sampled_grid_thw=(t, h, w),
            codec=CodecSaliency(
                scores=torch.from_numpy(scores),
                motion=torch.from_numpy(motion),
                residual=torch.from_numpy(residual),
                has_motion_vectors=has_vectors,
                decoded_frames=decoded,
                seconds={"decode": decoded_at - start, "score": scored_at - decoded_at, "select": done - scored_at},
            ),
        )

    def _codec_target_size(self, height: int, width: int) -> tuple[int, int]:
        """:meth:`target_size`, refusing (before the whole clip is decoded) a first frame the budget cannot hold."""
        size = self.target_size(height, width)
        if self.keep_first_frame:
            check_first_frame_fits(size[0] // self.patch_size, size[1] // self.patch_size, self.patch_budget)
        return size

    @staticmethod
    def pack(samples: Sequence[PackedSample], pin_memory: bool = False) -> BatchFeature:
        """Concatenate samples into one packed batch (``hidden_states``, ``grid_thw``, ``patch_positions``).

        ``pin_memory`` concatenates the per-token tensors straight into pinned host memory, so their
        copy to a GPU can be non-blocking (``grid_thw`` stays an ordinary CPU tensor)."""
        if not samples:
            raise ValueError("nothing to pack: give at least one image or video")

        def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
            out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype,
                              pin_memory=pin_memory)
            return torch.cat(tensors, out=out)

        return BatchFeature(
            {
                "hidden_states": cat([s.hidden_states for s in samples]),
                "grid_thw": torch.tensor([s.grid_thw for s in samples], dtype=torch.long),
                "patch_positions": cat([s.patch_positions for s in samples]),
            }
        )

    def preprocess(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        videos: VideoInput | Sequence[VideoInput] | None = None,
        num_frames: int | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchFeature:
        """Pack images and videos: see the class docstring.

        ``images``: one image or a sequence of them (a 4-D array/tensor is a batch). ``videos``: one
        video or a sequence of them; a sequence of frames (PIL images, 2-D/3-D arrays) is one video,
        and a sequence of paths is several video files.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' (PyTorch tensors), got {return_tensors!r}")
        samples = [self.preprocess_image(image) for image in _image_list(images)]
        samples += [self.preprocess_video(video, num_frames) for video in _video_list(videos)]
        return self.pack(samples)

    def __call__(self, images=None, videos=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, videos, **kwargs)

    def to_pixels(self, hidden_states: torch.Tensor, grid_thw: Sequence[int]) -> np.ndarray:
        """Undo patchify, normalization and rescaling for one sample: ``(t, H, W, 3)`` uint8 frames, for pictures."""
        t, h, w = (int(v) for v in grid_thw)
        p = self.patch_size
        x = hidden_states.detach().float().cpu().reshape(t, h, w, 3, p, p).permute(0, 1, 4, 2, 5, 3)
        x = x.reshape(t, h * p, w * p, 3)
        if self.do_normalize:
            x = x * torch.tensor(self.image_std) + torch.tensor(self.image_mean)
        if self.do_rescale:
            x = x / self.rescale_factor
        return x.round().clamp(0, 255).to(torch.uint8).numpy()


def _is_frame(x) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))


def _image_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (str, Path)) or _is_frame(images):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(f"images must be an image or a list of images, got {type(images).__name__}")


def _video_list(videos) -> list:
    if videos is None:
        return []
    if isinstance(videos, (str, Path)) or (isinstance(videos, (np.ndarray, torch.Tensor)) and videos.ndim == 4):
        return [videos]
    if isinstance(videos, (list, tuple)):
        return [videos] if videos and all(_is_frame(v) for v in videos) else list(videos)
    raise TypeError(f"videos must be a video or a list of videos, got {type(videos).__name__}")


def patchify(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(C, T, H, W)`` or ``(C, H, W)`` pixels → ``(T*h*w, C*p*p)`` packed rows: raster token order
    (t slowest, w fastest), channel-major patch vectors, as the model expects (docs/ARCHITECTURE.md,
    "The packing contract")."""
    if pixels.dim() == 3:
        pixels = pixels[:, None]
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be (C, T, H, W) or (C, H, W), got shape {tuple(pixels.shape)}")
    c, t, height, width = pixels.shape
    p = check_positive_int("patch_size", patch_size)
    if height % p or width % p:
        raise ValueError(f"pixels' height and width ({height}x{width}) must be multiples of patch_size={p}")
    h, w = height // p, width // p
    return pixels.reshape(c, t, h, p, w, p).permute(1, 2, 4, 0, 3, 5).reshape(t * h * w, c * p * p)


def split_packed(tensor: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Cut a packed per-token tensor (e.g. ``last_hidden_state``) into one tensor per sample."""
    lengths = [t * h * w for t, h, w in torch.as_tensor(grid_thw).tolist()]
    if sum(lengths) != tensor.shape[0]:
        raise ValueError(
            f"grid_thw describes {sum(lengths)} tokens but the tensor has {tensor.shape[0]} rows"
        )
    return list(torch.split(tensor, lengths))


def image_to_packing_input(image: ImageInput, patch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """One image → ``hidden_states (h*w, 3*p*p)``, ``grid_thw [[1, h, w]]``.

    Same numbers as the original implementation's recipe (sides floored to patch multiples with PIL
    bicubic, ``ToTensor``, CLIP ``Normalize``, ``(h, w, C, p, p)`` patches; docs/PROCESSING.md).
    """
    sample = LlavaViTPackingImageProcessor(patch_size=patch_size).preprocess_image(image)
    return sample.hidden_states, torch.tensor([sample.grid_thw], dtype=torch.long)


def batch_images_to_packing_input(
    images: Sequence[ImageInput], patch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of any sizes → packed ``hidden_states`` and ``grid_thw (N, 3)``."""
    inputs = LlavaViTPackingImageProcessor(patch_size=patch_size)(images=list(images))
    return inputs["hidden_states"], inputs["grid_thw"]


def video_to_packing_input(
    video: VideoInput, patch_size: int = 16, num_frames: int = 8, temporal_context: int = SOURCE_TEMPORAL_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The video counterpart: a video file, frame array or frame list → ``hidden_states``,
    ``grid_thw [[T, h, w]]`` and ``patch_positions`` with t in the ``temporal_context``-frame
    context (8 frames → 0, 9, ..., 63), as docs/ARCHITECTURE.md ("Videos: the 64-frame temporal
    context") describes."""
    processor = LlavaViTPackingImageProcessor(
        patch_size=patch_size, num_frames=num_frames, temporal_context=temporal_context
    )
    sample = processor.preprocess_video(video)
    return sample.hidden_states, torch.tensor([sample.grid_thw], dtype=torch.long), sample.patch_positions


# One implementation (PIL + numpy) serves whichever backend AutoImageProcessor asks for.
try:  # transformers >= 5
    AutoImageProcessor.register(
        LlavaViTPackingConfig,
        image_processor_classes={"pil": LlavaViTPackingImageProcessor, "torchvision": LlavaViTPackingImageProcessor},
        exist_ok=True,
    )
except TypeError:  # transformers 4.x
    AutoImageProcessor.register(
        LlavaViTPackingConfig, slow_image_processor_class=LlavaViTPackingImageProcessor, exist_ok=True
    )
