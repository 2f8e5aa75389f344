"""Media read as a viewer shows it: high bit depth, rotated video, truncated video, transparency,
animated images; and read errors that name the file. Every test makes its own media and compares
the pixels as encoded (``to_pixels`` undoes the normalization) with what the file shows."""

from __future__ import annotations

import io
import struct
import zlib

import av
import numpy as np
import pytest
import torch
from PIL import Image

from llava_vit import LlavaViTPackingImageProcessor
from llava_vit.processing import is_video_file, sample_frame_indices

P = 16


def encoded_pixels(processor: LlavaViTPackingImageProcessor, sample) -> np.ndarray:
    """``(t, H, W, 3)`` uint8: the pixels the sample holds."""
    return processor.to_pixels(sample.hidden_states, sample.grid_thw)


def ramp(height: int, width: int, top: int) -> np.ndarray:
    """``(H, W)`` int64 values from 0 (left) to ``top`` (right), plus a vertical term so rows differ."""
    y, x = np.mgrid[0:height, 0:width]
    return (x * top // (width - 1) * 3 // 4 + y * top // (height - 1) // 4).astype(np.int64)


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (gray for ``(H, W)``, RGB for ``(H, W, 3)``) written by hand: Pillow cannot write 16-bit RGB."""
    height, width = values.shape[:2]
    color_type = 0 if values.ndim == 2 else 2
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


# --- high bit depth ------------------------------------------------------------------------------------------

GRAY16 = ramp(48, 64, 65535)
INT32 = ramp(48, 64, 3_000_000) - 1_000_000
FLOAT01 = ramp(48, 64, 1000).astype(np.float32) / 1000
FLOAT_WIDE = FLOAT01 * 40 - 10


def stretched(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return np.round((values - values.min()) * 255 / (values.max() - values.min())).astype(np.uint8)


HIGH_DEPTH_CASES = {
    # name: (file name, bytes, what a viewer shows as 8-bit gray or RGB)
    "16-bit gray PNG": ("gray16.png", png16(GRAY16), (GRAY16 >> 8).astype(np.uint8)),
    "16-bit RGB PNG": ("rgb16.png", png16(np.stack([GRAY16, 65535 - GRAY16, GRAY16 // 2], -1)),
                       np.stack([GRAY16 >> 8, (65535 - GRAY16) >> 8, (GRAY16 // 2) >> 8], -1).astype(np.uint8)),
    "16-bit gray TIFF": ("gray16.tif", tiff(GRAY16.astype(np.uint16)), (GRAY16 >> 8).astype(np.uint8)),
    "32-bit integer TIFF, beyond 16 bits": ("int32.tif", tiff(INT32.astype(np.int32)), stretched(INT32)),
    "float TIFF in [0, 1]": ("float01.tif", tiff(FLOAT01), np.round(FLOAT01.astype(np.float64) * 255).astype(np.uint8)),
    "float TIFF beyond [0, 1]": ("float_wide.tif", tiff(FLOAT_WIDE), stretched(FLOAT_WIDE)),
}


@pytest.mark.parametrize("case", HIGH_DEPTH_CASES)
def test_high_bit_depth_pictures_show_their_gradient(tmp_path, case):
    name, data, shown = HIGH_DEPTH_CASES[case]
    path = tmp_path / name
    path.write_bytes(data)
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    sample = processor.preprocess_file(path)
    assert sample.kind == "image" and sample.grid_thw == (1, 3, 4)
    expected = shown if shown.ndim == 3 else np.repeat(shown[..., None], 3, axis=-1)
    pixels = encoded_pixels(processor, sample)[0]
    assert np.array_equal(pixels, expected)
    assert (pixels == 255).mean() < 0.05 and len(np.unique(pixels)) > 100  # a gradient, not clipped to white


def test_16_bit_gray_and_its_rgb_twin_give_the_same_pixels(tmp_path):
    (tmp_path / "gray.png").write_bytes(png16(GRAY16))
    (tmp_path / "rgb.png").write_bytes(png16(np.repeat(GRAY16[..., None], 3, axis=-1)))
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    gray, rgb = (processor.preprocess_file(tmp_path / name).hidden_states for name in ("gray.png", "rgb.png"))
    assert torch.equal(gray, rgb)


# --- video rotation --------------------------------------------------------------------------------------------

def landscape_frames(count: int, width: int = 64, height: int = 32) -> list[np.ndarray]:
    """Frames with structure in both directions and a bright top-left corner (to catch turns and flips)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        frame = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * i)], -1).astype(np.uint8)
        frame[:8, :8] = 255
        frames.append(frame)
    return frames


def write_mp4(path, frames, rate=25, rotation=None, hflip=False, faststart=False) -> None:
    """H.264 (yuv444p keeps colour edges sharp) with an optional display matrix, as a phone writes one."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0"}
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def stored_frames(path) -> list[np.ndarray]:
    """Every frame as stored in the file (no display matrix applied), until the stream ends or breaks."""
    frames = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:
            pass
    return frames


@pytest.mark.parametrize("rotation, hflip", [(90, False), (-90, False), (180, False), (0, True), (90, True)])
def test_video_display_matrix_is_applied(tmp_path, rotation, hflip):
    path = tmp_path / "phone.mp4"
    write_mp4(path, landscape_frames(5), rotation=rotation, hflip=hflip)
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).side_data.get("DISPLAYMATRIX") is not None
    # PyAV's meaning: turn counter-clockwise by `rotation` degrees, then mirror left-right
    shown = [np.rot90(frame, rotation // 90) for frame in stored_frames(path)]
    shown = [frame[:, ::-1] if hflip else frame for frame in shown]
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    sample = processor.preprocess_file(path, num_frames=5)
    height, width = shown[0].shape[:2]
    assert sample.grid_thw == (5, height // P, width // P) and sample.original_size == (height, width)
    assert np.array_equal(encoded_pixels(processor, sample), np.stack(shown))
    assert sample.warnings == ()


def test_a_turn_other_than_a_right_angle_is_left_as_stored_and_said(tmp_path):
    path = tmp_path / "tilted.mp4"
    write_mp4(path, landscape_frames(2), rotation=45)
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    sample = processor.preprocess_file(path)
    assert np.array_equal(encoded_pixels(processor, sample), np.stack(stored_frames(path)))
    assert sample.warnings == ("the video's display matrix turns it 315 degrees clockwise; only multiples of 90 are "
                               "applied, frames left as stored",)


def test_a_quarter_turn_makes_a_landscape_clip_portrait(tmp_path):
    path = tmp_path / "portrait.mp4"
    write_mp4(path, landscape_frames(3), rotation=-90)  # the matrix a phone held upright writes
    sample = LlavaViTPackingImageProcessor(patch_size=P).preprocess_file(path)
    assert sample.original_size == (64, 32) and sample.grid_thw == (3, 4, 2)
    pixels = LlavaViTPackingImageProcessor(patch_size=P).to_pixels(sample.hidden_states, sample.grid_thw)[0]
    assert pixels[:8, -8:].min() == 255 and pixels[:8, :8].max() < 255  # the stored top-left corner is now top right


# --- truncated video -------------------------------------------------------------------------------------------

def numbered_frames(count: int) -> list[np.ndarray]:
    """64x32 frames showing their index as four base-8 digits (one per 16-pixel column block), plus noise
    in the lower half so that frames take real space in the file."""
    rng = np.random.default_rng(0)
    frames = []
    for i in range(count):
        digits = np.array([(i // 8**k) % 8 for k in range(4)], np.uint8) * 32 + 16
        frame = np.broadcast_to(np.repeat(digits, 16)[None, :, None], (32, 64, 3)).copy()
        frame[16:] = rng.integers(0, 256, (16, 64, 3), dtype=np.uint8)
        frames.append(frame)
    return frames


def frame_number(frame: np.ndarray) -> int:
    digits = np.round((frame[2:14, :, 0].reshape(12, 4, 16).mean(axis=(0, 2)) - 16) / 32).astype(int)
    return int(sum(d * 8**k for k, d in enumerate(digits)))


def test_truncated_mp4_samples_only_the_frames_that_exist(tmp_path):
    whole = tmp_path / "whole.mp4"
    write_mp4(whole, numbered_frames(100), faststart=True)  # the index (100 frames) before the data
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 4 // 10])
    decodable = stored_frames(cut)
    real = len(decodable)
    assert 5 < real < 90
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    sample = processor.preprocess_file(cut, num_frames=8)
    assert sample.total_frames == real
    assert list(sample.frame_indices) == sample_frame_indices(real, 8)
    assert len(set(sample.frame_indices)) == 8  # no frame stands in for another
    assert sample.frame_indices[-1] == real - 1
    pixels = encoded_pixels(processor, sample)
    assert [frame_number(frame) for frame in pixels] == list(sample.frame_indices)
    assert np.array_equal(pixels, np.stack([decodable[i] for i in sample.frame_indices]))
    assert sample.patch_positions[:, 0].unique().tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert len(sample.warnings) == 1
    assert f"only {real} of the 100 frames" in sample.warnings[0] and "truncated" in sample.warnings[0]
    whole_sample = processor.preprocess_file(whole, num_frames=8)  # the intact file: no warning
    assert whole_sample.total_frames == 100 and whole_sample.warnings == ()


# --- transparency -------------------------------------------------------------------------------------------------

def translucent(width: int = 64, height: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Colours and an alpha that runs from transparent (left) to opaque (right), with fully transparent
    and fully opaque columns."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)
    alpha = np.clip((x - 8) * 255 // (width - 17), 0, 255).astype(np.uint8)
    return rgb, alpha


def over(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return rgb * a + np.asarray(background, np.float64) * (1 - a)


@pytest.mark.parametrize("background", [None, (0, 128, 255)])
def test_transparency_is_composited_on_the_background(tmp_path, background):
    rgb, alpha = translucent()
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    options = {} if background is None else {"background": background}
    processor = LlavaViTPackingImageProcessor(patch_size=P, **options)
    shown = over(rgb, alpha, background or (255, 255, 255))
    pixels = encoded_pixels(processor, processor.preprocess_file(path))[0].astype(np.float64)
    assert np.abs(pixels - shown).max() <= 1  # rounding of the blend
    assert np.array_equal(pixels[alpha == 0], np.broadcast_to(shown[alpha == 0], pixels[alpha == 0].shape))
    assert np.array_equal(pixels[alpha == 255], rgb[alpha == 255])
    from_array = processor.preprocess_image(np.dstack([rgb, alpha]))  # a 4-channel array is read the same
    assert torch.equal(from_array.hidden_states, processor.preprocess_file(path).hidden_states)


def test_opaque_rgba_is_bit_exact_with_its_rgb(tmp_path):
    rgb, _ = translucent(60, 44)  # resized: the whole recipe, not only the blend
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    opaque = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), "RGBA")
    opaque.save(tmp_path / "opaque.png")
    reference = processor.preprocess_image(Image.fromarray(rgb)).hidden_states
    assert torch.equal(processor.preprocess_image(opaque).hidden_states, reference)
    assert torch.equal(processor.preprocess_file(tmp_path / "opaque.png").hidden_states, reference)


def test_background_is_saved_with_the_processor(tmp_path):
    LlavaViTPackingImageProcessor(background=(10, 20, 30)).save_pretrained(tmp_path)
    assert LlavaViTPackingImageProcessor.from_pretrained(tmp_path).background == [10, 20, 30]
    assert LlavaViTPackingImageProcessor().background == [255, 255, 255]
    for wrong in ((0, 0), (0, 0, 256), "white", (0.5, 0, 0)):
        with pytest.raises(ValueError, match="background must be 3 integers in 0..255"):
            LlavaViTPackingImageProcessor(background=wrong)


# --- animated images ------------------------------------------------------------------------------------------------

def animation_frames(count: int) -> list[Image.Image]:
    """Frames that show their index in a few gray levels a GIF palette holds exactly."""
    frames = []
    for i in range(count):
        digits = np.array([(i // 4**k) % 4 for k in range(4)], np.uint8) * 80
        frames.append(Image.fromarray(np.repeat(np.repeat(digits, 16)[None, :], 32, axis=0), "L").convert("RGB"))
    return frames


@pytest.mark.parametrize("suffix, options", [(".gif", {}), (".png", {}), (".webp", {"lossless": True})])
def test_animated_images_are_read_as_videos(tmp_path, suffix, options):
    frames = animation_frames(12)
    path = tmp_path / f"animation{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0, **options)
    assert is_video_file(path)
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    sample = processor.preprocess_file(path, num_frames=4)
    assert sample.kind == "video" and sample.total_frames == 12 and sample.grid_thw == (4, 2, 4)
    assert list(sample.frame_indices) == sample_frame_indices(12, 4) == [0, 4, 7, 11]
    expected = np.stack([np.asarray(frames[i]) for i in sample.frame_indices])
    assert np.array_equal(encoded_pixels(processor, sample), expected)
    assert sample.patch_positions[:, 0].unique().tolist() == [0, 21, 42, 63]
    first = processor.preprocess_image(path)  # asked for as an image: its first frame, and a note
    assert first.kind == "image" and torch.equal(first.hidden_states, sample.hidden_states[:8])
    assert first.warnings == ("animated image with 12 frames read as its first frame; "
                              "preprocess_file or preprocess_video read it as a video",)


def test_a_one_frame_gif_stays_an_image(tmp_path):
    path = tmp_path / "still.gif"
    animation_frames(3)[2].save(path)
    assert not is_video_file(path)
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    sample = processor.preprocess_file(path)
    assert sample.kind == "image" and sample.warnings == ()
    assert np.array_equal(encoded_pixels(processor, sample)[0], np.asarray(animation_frames(3)[2]))


# --- messages --------------------------------------------------------------------------------------------

def test_read_errors_name_the_file_and_say_what_is_wrong(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, numbered_frames(10))
    bad = {
        "missing.jpg": None,
        "missing.mp4": None,
        "corrupt.jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10,
        "cut.jpg": None,
        "text.png": b"plain text, not a picture\n" * 4,
        "cut_early.mp4": clip.read_bytes()[:300],
        "garbage.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8,
        "folder.png": "folder",
    }
    buffer = io.BytesIO()
    Image.fromarray(numbered_frames(1)[0]).save(buffer, format="JPEG")
    bad["cut.jpg"] = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    processor = LlavaViTPackingImageProcessor(patch_size=P)
    messages = {}
    for name, content in bad.items():
        path = tmp_path / name
        if content == "folder":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises((ValueError, OSError)) as caught:
            processor.preprocess_file(path)
        message = str(caught.value)
        assert str(path) in message, message
        assert "Errno" not in message and "avcodec" not in message and "()" not in message, message
        assert caught.value.__cause__ is not None, message  # the library's own error stays chained
        messages[name] = message
    assert messages["missing.mp4"].endswith("no such file") and messages["missing.jpg"].endswith("no such file")
    assert messages["folder.png"].endswith("it is a folder, not a file")
    assert "not an image format Pillow can read" in messages["text.png"]
    assert "ends early" in messages["corrupt.jpg"] and "ends early" in messages["cut.jpg"]
    for name in ("cut_early.mp4", "garbage.mp4"):
        assert messages[name].startswith(f"cannot read video {tmp_path / name}: ")


def test_a_thin_strip_says_what_to_pass():
    strip = Image.new("RGB", (3, 20000), "gray")
    with pytest.raises(ValueError) as caught:
        LlavaViTPackingImageProcessor(patch_size=P).preprocess_image(strip)
    message = str(caught.value)
    assert "3 pixels wide, narrower than one 16-pixel patch" in message and "smaller" not in message
    assert "resize_mode='budget'" in message
    sample = LlavaViTPackingImageProcessor(patch_size=P, resize_mode="budget").preprocess_image(strip)
    assert sample.grid_thw == (1, 1250, 1)  # what the message recommends works
