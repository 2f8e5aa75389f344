"""Images and videos in, packed encoder inputs out: ``hidden_states``, ``grid_thw``, ``patch_positions``.

Every picture follows the seed's recipe: an RGB image, resized (by default each side floored to a
patch multiple with PIL bicubic), then torchvision's ``ToTensor`` + ``Normalize`` and the seed's
``(h, w, C, p, p)`` patch layout. The same float32 operations run once on the whole picture (or
clip), on pixels put in patch order while they are still bytes, so results are bit-identical to
the seed's. Videos are decoded with PyAV, converting only the sampled frames to RGB,
and their frames are placed in the source model's 64-frame temporal context (DESIGN §2, Positions).
"""

from __future__ import annotations

import math
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
from .video import is_video_file, read_video, sample_frame_indices

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("floor", "fixed", "budget")
ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
"""A path, a PIL image (any mode), an ``(H, W[, C])`` array or a ``(C, H, W)`` tensor; C in 1, 3, 4."""
VideoInput = Union[str, Path, np.ndarray, torch.Tensor, Sequence[ImageInput]]
"""A video file, a ``(T, H, W[, C])`` array, a ``(T, C, H, W)`` tensor, or a sequence of frames."""

def load_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image: EXIF orientation applied, any mode converted with PIL's ``convert("RGB")``.

    As in PIL (and torchvision), RGBA loses its alpha channel without compositing, and CMYK, L, P
    and the other modes use PIL's own conversions.
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened.load()
            image = _upright_rgb(opened)
        return image
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a path or a PIL.Image.Image, got {type(image).__name__}")
    return _upright_rgb(image)


def _upright_rgb(image: Image.Image) -> Image.Image:
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error


def _pixels(image: ImageInput, name: str) -> Image.Image | np.ndarray:
    """One picture as an RGB PIL image, or an ``(H, W, 3)`` uint8 or float32 array."""
    if isinstance(image, (str, Path, Image.Image)):
        return load_image(image)
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
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        array = array[..., :3]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name}: floating-point pixels must be in [0, 1] (what ToTensor gives), got values in "
                f"[{low:.3g}, {high:.3g}]; pass uint8 pixels (0..255) or divide by 255 (not normalized pixels)"
            )
        return np.ascontiguousarray(array, dtype=np.float32)
    raise TypeError(f"{name} pixels must be uint8 (0..255) or floating point (0..1), got dtype {array.dtype}")


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
        resample: PIL filter for resizing (3 = bicubic, the seed's).
        resize_mode: ``"floor"`` (the seed's: each side floored to a patch multiple),
            ``"fixed"`` (every picture resized to ``size``), or ``"budget"`` (aspect kept, sides
            rounded to patch multiples, area brought into ``[min_pixels, max_pixels]``, as
            Qwen2-VL does; see :func:`smart_resize`).
        size: ``{"height": H, "width": W}`` (or one int for a square) for ``"fixed"``; multiples
            of ``patch_size``.
        min_pixels, max_pixels: area bounds for ``"budget"`` (either may be ``None``).
        temporal_context: frames of the temporal context the model was trained with; a video's
            ``T`` frames get temporal positions ``round(i / (T-1) * (temporal_context-1))``.
        num_frames: frames sampled uniformly from each video (all of them, if it has fewer).
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

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` a picture of this size is resized to, by ``resize_mode``."""
        p = self.patch_size
        if self.resize_mode == "fixed":
            return self.size["height"], self.size["width"]
        if self.resize_mode == "budget":
            return smart_resize(height, width, p, self.min_pixels, self.max_pixels)
        if height < p or width < p:
            raise ValueError(
                f"a {width}x{height} picture is smaller than one {p}x{p} patch; use resize_mode='budget' "
                f"or 'fixed' to upscale small pictures"
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

    def _patchify(self, frames: np.ndarray) -> torch.Tensor:
        """``(T, H, W, 3)`` resized frames → ``(T*h*w, 3*p*p)`` normalized float32 patches.

        Exactly ``ToTensor`` (8-bit pixels divided by 255) and ``Normalize`` (subtract the mean,
        divide by the std, in float32), applied to pixels already in patch order.
        """
        p = self.patch_size
        t, height, width, channels = frames.shape
        h, w = height // p, width // p
        layout = torch.from_numpy(frames).view(t, h, p, w, p, channels).permute(0, 1, 3, 5, 2, 4)  # (t, h, w, C, p, p)
        patches = torch.empty(layout.shape, dtype=torch.float32).copy_(layout)
        if frames.dtype == np.uint8 and self.do_rescale:
            patches.div_(1 / self.rescale_factor)
        if self.do_normalize:
            patches.sub_(torch.tensor(self.image_mean).view(3, 1, 1)).div_(torch.tensor(self.image_std).view(3, 1, 1))
        return patches.view(t * h * w, channels * p * p)

    def _sample(self, frames: list[Image.Image | np.ndarray], frame_indices, total_frames: int, kind: str,
                warnings: tuple[str, ...] = ()) -> PackedSample:
        original = _size_of(frames[0])
        for i, frame in enumerate(frames):
            if _size_of(frame) != original:
                raise ValueError(
                    f"all frames of a video must have one size: frame {i} is {_size_of(frame)[::-1]} (WxH), "
                    f"frame 0 is {original[::-1]}"
                )
        size = self.target_size(*original)
        arrays = [self._resized(frame, size) for frame in frames]
        if len({a.dtype for a in arrays}) > 1:
            raise ValueError("frames of a video must be all 8-bit or all floating point, got a mix")
        t, p = len(arrays), self.patch_size
        h, w = size[0] // p, size[1] // p
        slots = interpolate_frame_indices(torch.arange(t)[None], t, self.temporal_context)
        return PackedSample(
            hidden_states=self._patchify(np.stack(arrays)),
            grid_thw=(t, h, w),
            patch_positions=compute_patch_positions_with_interpolated_temporal(slots, h, w),
            original_size=original,
            frame_indices=tuple(int(i) for i in frame_indices),
            total_frames=total_frames,
            kind=kind,
            warnings=warnings,
        )

    def preprocess_image(self, image: ImageInput) -> PackedSample:
        """One image → its :class:`PackedSample` (``t = 1``, temporal position 0)."""
        return self._sample([_pixels(image, "image")], (0,), 1, "image")

    def preprocess_file(self, path: str | Path, num_frames: int | None = None) -> PackedSample:
        """One media file → its :class:`PackedSample`, read as a video or an image by what it is."""
        if is_video_file(path):
            return self.preprocess_video(path, num_frames)
        return self.preprocess_image(path)

    def preprocess_video(self, video: VideoInput, num_frames: int | None = None) -> PackedSample:
        """One video → its :class:`PackedSample`: ``num_frames`` (default: the processor's) frames
        sampled uniformly, temporal positions spread over the temporal context."""
        num_frames = self.num_frames if num_frames is None else check_positive_int("num_frames", num_frames)
        if isinstance(video, (str, Path)):
            clip = read_video(video, num_frames)
            return self._sample(list(clip.frames), clip.frame_indices, clip.total_frames, "video")
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
        frames = [_pixels(video[i], f"video frame {i}") for i in indices]
        return self._sample(frames, indices, len(video), "video")

    @staticmethod
    def pack(samples: Sequence[PackedSample]) -> BatchFeature:
        """Concatenate samples into one packed batch (``hidden_states``, ``grid_thw``, ``patch_positions``)."""
        if not samples:
            raise ValueError("nothing to pack: give at least one image or video")
        return BatchFeature(
            {
                "hidden_states": torch.cat([s.hidden_states for s in samples]),
                "grid_thw": torch.tensor([s.grid_thw for s in samples], dtype=torch.long),
                "patch_positions": torch.cat([s.patch_positions for s in samples]),
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
    (t slowest, w fastest), channel-major patch vectors, as the model and the seed expect."""
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
    """The seed's helper: one image → ``hidden_states (h*w, 3*p*p)``, ``grid_thw [[1, h, w]]``.

    Same numbers as the seed's recipe (sides floored to patch multiples with PIL bicubic,
    ``ToTensor``, CLIP ``Normalize``, ``(h, w, C, p, p)`` patches).
    """
    sample = LlavaViTPackingImageProcessor(patch_size=patch_size).preprocess_image(image)
    return sample.hidden_states, torch.tensor([sample.grid_thw], dtype=torch.long)


def batch_images_to_packing_input(
    images: Sequence[ImageInput], patch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's helper: images of any sizes → packed ``hidden_states`` and ``grid_thw (N, 3)``."""
    inputs = LlavaViTPackingImageProcessor(patch_size=patch_size)(images=list(images))
    return inputs["hidden_states"], inputs["grid_thw"]


def video_to_packing_input(
    video: VideoInput, patch_size: int = 16, num_frames: int = 8, temporal_context: int = SOURCE_TEMPORAL_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The video counterpart: a video file, frame array or frame list → ``hidden_states``,
    ``grid_thw [[T, h, w]]`` and ``patch_positions`` with t in the ``temporal_context``-frame
    context (8 frames → 0, 9, ..., 63), as the seed's video examples build them."""
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
