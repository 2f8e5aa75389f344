"""The processor: bit-exact with the original implementation's recipe (a torchvision reference,
below), every input kind and mode, resize policies, save/load, video sampling and positions, and
packed encodes equal to per-input encodes.

Photos and clips are made here (matplotlib's sample photo, an RGBA PNG and H.264 clips written with
PyAV), so every test runs in a bare clone; the project's own media in ``../shared/media`` is checked
the same way where it exists."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.cbook import get_sample_data
from PIL import Image
from transformers import AutoImageProcessor

from llava_vit import (
    LlavaViTPackingConfig,
    LlavaViTPackingImageProcessor,
    LlavaViTPackingModel,
    batch_images_to_packing_input,
    image_to_packing_input,
    split_packed,
    video_to_packing_input,
)
from llava_vit.demo import write_video
from llava_vit.processing import read_video, sample_frame_indices, smart_resize
from llava_vit.processing.video import _decode_frames

PROJECT_PHOTOS = ("photo_2048x1365.jpg", "photo_rgba_1189x790.png")  # in ../shared/media
PROJECT_CLIPS = {"clip_1.mp4": (64, 256, 256), "clip_2.mp4": (20, 240, 428)}  # frames, height, width
MADE_PHOTOS = ("grace_hopper.jpg", "opaque_rgba_397x301.png")  # made by the made_media fixture
MADE_CLIPS = {"moving_64f.mp4": (64, 64, 96), "moving_20f.mp4": (20, 40, 92)}  # frames, height, width
TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2, patch_size=14)


def reference_image_to_packing_input(image: Image.Image, patch_size: int = 16):
    """The original implementation's ``image_to_packing_input``: each side floored to a patch
    multiple with PIL bicubic, torchvision ``ToTensor`` + CLIP ``Normalize``, ``(h, w, C, p, p)``
    patches. The reference every bit-exactness check compares with."""
    w, h = image.size
    new_h = (h // patch_size) * patch_size
    new_w = (w // patch_size) * patch_size
    image = image.resize((new_w, new_h))
    transform = T.Compose([
        T.ToTensor(),
        T.Normalize(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711]),
    ])
    pixel_tensor = transform(image)
    channels = pixel_tensor.shape[0]
    h_patches, w_patches = new_h // patch_size, new_w // patch_size
    patches = pixel_tensor.view(channels, h_patches, patch_size, w_patches, patch_size)
    patches = patches.permute(1, 3, 0, 2, 4).contiguous()
    hidden_states = patches.view(h_patches * w_patches, patch_size * patch_size * channels)
    return hidden_states, torch.tensor([[1, h_patches, w_patches]], dtype=torch.long)


def assert_same_as_reference(ours, reference_image: Image.Image, patch_size: int = 16):
    hidden_states, grid_thw = reference_image_to_packing_input(reference_image, patch_size)
    assert torch.equal(ours[1], grid_thw)
    assert ours[0].dtype == torch.float32 and torch.equal(ours[0], hidden_states)


def scene(width: int = 60, height: int = 44) -> Image.Image:
    """A small RGB picture with structure in both directions (to catch transposes and flips)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x * y) % 251], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


# --- images: the original recipe, bit for bit -------------------------------------------------------

@pytest.fixture(scope="module")
def made_media(tmp_path_factory) -> Path:
    """A folder of media made here: matplotlib's sample photo (a real photograph, as a JPEG file), a
    fully opaque RGBA PNG cut from it at sides no patch divides, and two H.264 clips (MPEG-4 part 2
    where PyAV has no H.264 encoder) of a moving scene."""
    folder = tmp_path_factory.mktemp("media")
    photo = Path(get_sample_data("grace_hopper.jpg", asfileobj=False))
    (folder / "grace_hopper.jpg").write_bytes(photo.read_bytes())
    with Image.open(photo) as opened:
        rgba = opened.convert("RGBA").crop((40, 60, 437, 361))
    rgba.save(folder / "opaque_rgba_397x301.png")
    for name, (frames, height, width) in MADE_CLIPS.items():
        write_video(folder / name, _moving_frames(frames, height, width))
    return folder


def _moving_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    """A scene sliding one pixel per frame, with a corner block whose gray level counts the frames:
    no two frames alike, so a wrong frame index shows."""
    base = np.asarray(scene(width, height))
    frames = []
    for i in range(count):
        frame = np.roll(base, i, axis=1).copy()
        frame[:8, :8] = 4 * i
        frames.append(frame)
    return frames


def _check_photo_against_the_reference(path: Path, patch_size: int) -> None:
    with Image.open(path) as opened:
        raw = opened.copy()
    reference = raw.convert("RGB")
    assert_same_as_reference(image_to_packing_input(path, patch_size), reference, patch_size)
    assert_same_as_reference(image_to_packing_input(raw, patch_size), reference, patch_size)  # as opened (RGBA too)
    array = np.asarray(reference)
    assert_same_as_reference(image_to_packing_input(array, patch_size), reference, patch_size)
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1)
    assert_same_as_reference(image_to_packing_input(chw, patch_size), reference, patch_size)


@pytest.mark.parametrize("name", MADE_PHOTOS)
@pytest.mark.parametrize("patch_size", [14, 16])
def test_photos_match_the_original_recipe_bit_exactly(made_media, name, patch_size):
    with Image.open(made_media / name) as opened:
        assert (opened.format, opened.mode) == {"grace_hopper.jpg": ("JPEG", "RGB"),
                                                "opaque_rgba_397x301.png": ("PNG", "RGBA")}[name]
        width, height = opened.size
    assert width % patch_size or height % patch_size  # the floor resize has work to do
    _check_photo_against_the_reference(made_media / name, patch_size)


@pytest.mark.parametrize("name", PROJECT_PHOTOS)
@pytest.mark.parametrize("patch_size", [14, 16])
def test_project_photos_match_the_original_recipe_bit_exactly(media_dir, name, patch_size):
    _check_photo_against_the_reference(media_dir / name, patch_size)


def test_batch_helper_matches_the_original_example():
    images = [Image.new("RGB", (224, 224), "red"), Image.new("RGB", (224, 224), "blue"),
              Image.new("RGB", (448, 448), "green")]
    hidden_states, grid_thw = batch_images_to_packing_input(images, patch_size=16)
    assert hidden_states.shape == (1176, 768)
    assert grid_thw.tolist() == [[1, 14, 14], [1, 14, 14], [1, 28, 28]]
    reference = [reference_image_to_packing_input(image)[0] for image in images]
    assert torch.equal(hidden_states, torch.cat(reference))


def _exif_rotated_png(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1"])
def test_every_8_bit_pil_mode_is_converted_like_pil_convert_rgb(mode):
    # opaque alpha changes nothing; translucent pixels and 16-bit modes: tests/test_media_fidelity.py
    image = scene().convert(mode)
    assert_same_as_reference(image_to_packing_input(image, 16), image.convert("RGB"))


def test_cmyk_jpeg_and_palette_png_files(tmp_path):
    scene().convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    scene().convert("P").save(tmp_path / "palette.png", transparency=0)
    for name in ("cmyk.jpg", "palette.png"):
        with Image.open(tmp_path / name) as opened:
            assert opened.mode in ("CMYK", "P")
            # palette index 0 is transparent: shown on the white default background, others as they are
            white = Image.new("RGBA", opened.size, (255, 255, 255, 255))
            reference = Image.alpha_composite(white, opened.convert("RGBA")).convert("RGB")
        assert_same_as_reference(image_to_packing_input(tmp_path / name), reference)


@pytest.mark.parametrize("orientation, stored_as", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                                    (8, Image.Transpose.ROTATE_270)])
def test_exif_orientation_is_applied(tmp_path, orientation, stored_as):
    upright = scene(60, 36)
    stored = upright.transpose(stored_as)  # what a camera writes, with the tag saying how to turn it back
    path = tmp_path / "rotated.png"
    path.write_bytes(_exif_rotated_png(stored, orientation))
    hidden_states, grid_thw = image_to_packing_input(path, 12)
    assert grid_thw.tolist() == [[1, 3, 5]]  # upright: 36 x 60 pixels
    assert_same_as_reference((hidden_states, grid_thw), upright, 12)
    with Image.open(path) as opened:  # the same for an already opened image
        assert_same_as_reference(image_to_packing_input(opened, 12), upright, 12)


def test_gray_and_float_arrays():
    image = scene()
    gray = np.asarray(image.convert("L"))
    assert_same_as_reference(image_to_packing_input(gray, 16), Image.fromarray(gray).convert("RGB"))
    # float pixels in [0, 1] give what the 8-bit ones give (no resize needed at 48 x 64)
    pixels = np.array(image.resize((64, 48)))
    as_float = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(image_to_packing_input(as_float)[0], image_to_packing_input(pixels)[0],
                               rtol=0, atol=1e-6)
    # float inputs are resized with the same PIL filter, channel by channel (without 8-bit clipping)
    ours = image_to_packing_input(np.asarray(image).astype(np.float32) / 255)[0]
    assert (ours - image_to_packing_input(image)[0]).abs().le(0.02).float().mean() > 0.99
    # float pixels outside [0, 1] (0..255 floats, or already normalized) are refused, not misread
    for wrong in (pixels.astype(np.float32), (pixels.astype(np.float32) / 255 - 0.5) / 0.25):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            image_to_packing_input(wrong)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="channels"):
        image_to_packing_input(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(TypeError, match="uint8.*int16"):
        image_to_packing_input(np.zeros((32, 32, 3), np.int16))
    with pytest.raises(TypeError, match="image must be"):
        image_to_packing_input(42)
    with pytest.raises(ValueError, match="10 pixels high, shorter than one 16-pixel patch.*resize_mode='budget'"):
        image_to_packing_input(Image.new("RGB", (40, 10)))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        image_to_packing_input(Image.new("RGB", (10, 10)))
    with pytest.raises(ValueError, match="resize_mode"):
        LlavaViTPackingImageProcessor(resize_mode="crop")
    with pytest.raises(ValueError, match="multiple of patch_size=14"):
        LlavaViTPackingImageProcessor(patch_size=14, resize_mode="fixed", size=200)
    with pytest.raises(ValueError, match="only used with resize_mode='budget'"):
        LlavaViTPackingImageProcessor(max_pixels=1000)
    with pytest.raises(ValueError, match="return_tensors"):
        LlavaViTPackingImageProcessor()(images=scene(), return_tensors="np")
    with pytest.raises(ValueError, match="nothing to pack"):
        LlavaViTPackingImageProcessor()()


def test_to_pixels_inverts_the_preprocessing():
    processor = LlavaViTPackingImageProcessor(patch_size=16)
    sample = processor.preprocess_image(scene(64, 48))
    assert np.array_equal(processor.to_pixels(sample.hidden_states, sample.grid_thw)[0], np.asarray(scene(64, 48)))


# --- resize policies ----------------------------------------------------------------------------------

def test_fixed_and_budget_policies():
    image = scene(300, 200)
    fixed = LlavaViTPackingImageProcessor(patch_size=14, resize_mode="fixed", size={"height": 112, "width": 224})
    assert fixed.preprocess_image(image).grid_thw == (1, 8, 16)
    budget = LlavaViTPackingImageProcessor(patch_size=14, resize_mode="budget", max_pixels=140 * 140)
    sample = budget.preprocess_image(image)
    t, h, w = sample.grid_thw
    assert h * w * 14 * 14 <= 140 * 140 and abs(w / h - 1.5) < 0.2
    upscale = LlavaViTPackingImageProcessor(patch_size=14, resize_mode="budget", min_pixels=224 * 224)
    assert upscale.preprocess_image(Image.new("RGB", (20, 10))).grid_thw[1:] == (12, 23)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([14, 16, 28]),
       st.integers(1, 64), st.integers(64, 4096))
def test_smart_resize_keeps_multiples_bounds_and_aspect(height, width, factor, low, high):
    min_pixels, max_pixels = low * factor * factor, high * factor * factor
    new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    assert new_h % factor == 0 and new_w % factor == 0 and new_h >= factor and new_w >= factor
    if max(height / width, width / height) < 50:  # away from sides pinned at one patch
        assert new_h * new_w <= max_pixels
        assert new_h * new_w >= min_pixels or new_h * new_w >= max_pixels - 2 * factor * (max(new_h, new_w) + factor)
    shortest = min(new_h, new_w)
    if shortest > factor:  # each side within one factor of the exactly scaled one: the aspect ratio is kept
        aspect_error = abs(np.log((new_w / new_h) / (width / height)))
        assert aspect_error <= 2 * np.log1p(factor / (shortest - factor)) + 1e-12


# --- save / load ----------------------------------------------------------------------------------------

CONVERTER_FIELDS = {
    "image_processor_type": "LlavaViTPackingImageProcessor", "patch_size": 14,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
    "temporal_context": 64, "num_frames": 8,
}


def test_save_load_round_trip(tmp_path):
    processor = LlavaViTPackingImageProcessor(patch_size=14, resize_mode="budget", max_pixels=200_000, num_frames=4)
    processor.save_pretrained(tmp_path)
    loaded = LlavaViTPackingImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = scene(300, 200)
    assert torch.equal(loaded(images=image)["hidden_states"], processor(images=image)["hidden_states"])
    assert LlavaViTPackingImageProcessor.from_pretrained(tmp_path, num_frames=6).num_frames == 6


def test_auto_image_processor_finds_it_in_a_converted_folder(tmp_path):
    LlavaViTPackingConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONVERTER_FIELDS))
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is LlavaViTPackingImageProcessor
    fields = (processor.patch_size, processor.num_frames, processor.temporal_context, processor.resample)
    assert fields == (14, 8, 64, 3)
    assert processor.resize_mode == "floor"


# --- videos ------------------------------------------------------------------------------------------------

def _full_decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _check_clip_decodes_the_requested_frames(path: Path, total: int, height: int, width: int,
                                             num_frames: int) -> None:
    clip = read_video(path, num_frames)
    assert clip.total_frames == total and clip.frames.shape == (num_frames, height, width, 3)
    assert list(clip.frame_indices) == sample_frame_indices(total, num_frames)
    assert clip.frame_indices[0] == 0 and clip.frame_indices[-1] == total - 1
    every_frame = _full_decode(path)
    assert all(np.array_equal(every_frame[i], frame) for i, frame in zip(clip.frame_indices, clip.frames))

    hidden_states, grid_thw, positions = video_to_packing_input(path, patch_size=16, num_frames=num_frames)
    h, w = height // 16, width // 16
    assert grid_thw.tolist() == [[num_frames, h, w]] and hidden_states.shape == (num_frames * h * w, 768)
    slots = {8: [0, 9, 18, 27, 36, 45, 54, 63], 4: [0, 21, 42, 63]}[num_frames]
    assert positions[:, 0].reshape(num_frames, h * w).unique(dim=1).flatten().tolist() == slots
    assert torch.equal(positions[: h * w, 1:], positions[-h * w:, 1:])
    frame_zero = reference_image_to_packing_input(Image.fromarray(every_frame[0]))[0]
    assert torch.equal(hidden_states[: h * w], frame_zero)  # each frame is preprocessed like an image


@pytest.mark.parametrize("name", MADE_CLIPS)
@pytest.mark.parametrize("num_frames", [8, 4])
def test_clips_decode_the_requested_frames(made_media, name, num_frames):
    every_frame = _full_decode(made_media / name)
    assert len({frame.tobytes() for frame in every_frame}) == len(every_frame)  # a wrong index would show
    _check_clip_decodes_the_requested_frames(made_media / name, *MADE_CLIPS[name], num_frames)


@pytest.mark.parametrize("name", PROJECT_CLIPS)
@pytest.mark.parametrize("num_frames", [8, 4])
def test_project_clips_decode_the_requested_frames(media_dir, name, num_frames):
    _check_clip_decodes_the_requested_frames(media_dir / name, *PROJECT_CLIPS[name], num_frames)


def _numbered_frames(count: int) -> list[np.ndarray]:
    """64x16 gray frames showing their index as four base-8 digits, one per 16x16 block."""
    frames = []
    for i in range(count):
        digits = [(i // 8**k) % 8 for k in range(4)]
        row = np.repeat(np.array(digits, np.uint8) * 32 + 16, 16)
        frames.append(np.broadcast_to(row[None, :, None], (16, 64, 3)).copy())
    return frames


def _read_number(frame: np.ndarray) -> int:
    digits = np.round((frame[4:12, :, 0].reshape(8, 4, 16).mean(axis=(0, 2)) - 16) / 32).astype(int)
    return int(sum(d * 8**k for k, d in enumerate(digits)))


def test_long_video_seeks_to_far_frames(tmp_path):
    path = tmp_path / "numbered.mp4"
    write_video(path, _numbered_frames(400), fps=25)
    for num_frames in (2, 3, 7):
        clip = read_video(path, num_frames)
        assert clip.total_frames == 400
        assert [_read_number(frame) for frame in clip.frames] == list(clip.frame_indices)
        assert list(clip.frame_indices) == sample_frame_indices(400, num_frames)


def test_uncounted_container_and_a_stream_shorter_than_claimed(tmp_path):
    path = tmp_path / "numbered.mkv"  # Matroska records no frame count: frames are counted by demuxing
    write_video(path, _numbered_frames(30), fps=10)
    clip = read_video(path, 4)
    assert clip.total_frames == 30 and clip.frame_indices == (0, 10, 19, 29)
    assert [_read_number(frame) for frame in clip.frames] == [0, 10, 19, 29]
    with av.open(str(path)) as container:  # wanting frames past the end: the stream ends, nothing stands in
        decoded = _decode_frames(container, container.streams.video[0], [0, 5, 100])
    assert not decoded.complete and decoded.indices == [0, 5]
    assert [_read_number(frame) for frame in decoded.frames] == [0, 5]


def test_frame_lists_arrays_and_tensors_are_one_video():
    frames = [np.asarray(scene(48, 32).rotate(10 * i)) for i in range(10)]
    processor = LlavaViTPackingImageProcessor(patch_size=16, num_frames=4)
    from_list = processor.preprocess_video([Image.fromarray(f) for f in frames])
    assert from_list.frame_indices == (0, 3, 6, 9) and from_list.total_frames == 10 and from_list.grid_thw == (4, 2, 3)
    from_array = processor.preprocess_video(np.stack(frames))
    from_tensor = processor.preprocess_video(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
    for other in (from_array, from_tensor):
        assert torch.equal(other.hidden_states, from_list.hidden_states)
        assert torch.equal(other.patch_positions, from_list.patch_positions)
    few = processor.preprocess_video(frames[:3])  # fewer frames than asked: all of them
    assert few.grid_thw[0] == 3 and few.patch_positions[:, 0].unique().tolist() == [0, 32, 63]
    with pytest.raises(ValueError, match="one size"):
        processor.preprocess_video([frames[0], frames[1][:16]])


def test_images_then_videos_and_split():
    processor = LlavaViTPackingImageProcessor(patch_size=16)
    video = [scene(32, 32)] * 2
    inputs = processor(images=[scene(64, 48), scene(32, 32)], videos=[video, video])
    assert inputs["grid_thw"].tolist() == [[1, 3, 4], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
    parts = split_packed(inputs["patch_positions"], inputs["grid_thw"])
    assert [len(p) for p in parts] == [12, 4, 8, 8]
    assert parts[2][:, 0].tolist() == [0] * 4 + [63] * 4
    with pytest.raises(ValueError, match="describes 32 tokens"):
        split_packed(torch.zeros(5, 2), inputs["grid_thw"])


# --- packed encode == per-input encodes -----------------------------------------------------------------

def test_packed_encode_equals_per_input_encodes():
    torch.manual_seed(0)
    model = LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).eval()
    processor = LlavaViTPackingImageProcessor(patch_size=14, num_frames=4)
    images = [scene(70, 42), scene(140, 98).convert("L"), np.asarray(scene(56, 56))]
    videos = [[scene(84, 56).rotate(5 * i) for i in range(6)]]
    with torch.inference_mode():
        packed = model(**processor(images=images, videos=videos))
        alone = [model(**processor(images=[image])) for image in images] + [model(**processor(videos=videos))]
    inputs = processor(images=images, videos=videos)
    assert inputs["grid_thw"][:, 0].tolist() == [1, 1, 1, 4]
    for i, (features, single) in enumerate(zip(split_packed(packed.last_hidden_state, inputs["grid_thw"]), alone)):
        torch.testing.assert_close(features, single.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(packed.pooler_output[i], single.pooler_output[0], rtol=0, atol=1e-5)
