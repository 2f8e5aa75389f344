"""Codec-style sparse video sampling: selection on generated clips, packed inputs, equality with the source model."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from llava_vit.demo import write_video
from llava_vit.processing import LlavaViTPackingImageProcessor, draw_kept_patches, select_patches
from model_pairs import source_and_packed

P = 16
H, W = 128, 160
FRAMES = 128
OBJECT = 32


def background(height: int, width: int, seed: int) -> np.ndarray:
    """Blurred random 8x8 color blocks: a static background with texture everywhere."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return np.asarray(Image.fromarray(blocks).filter(ImageFilter.GaussianBlur(1.5)))


def object_box(i: int) -> tuple[int, int]:
    """Top-left corner of the moving checkered square in frame ``i``: left to right, bobbing."""
    return 48 + round(24 * np.sin(i / 20)), 8 + i * 110 // FRAMES


def moving_frames() -> list[np.ndarray]:
    square = (np.indices((OBJECT, OBJECT)).sum(0) // 4 % 2)[..., None] * np.array([230, 40, 40]) + 20
    still, frames = background(H, W, 0), []
    for i in range(FRAMES):
        frame = still.copy()
        y, x = object_box(i)
        frame[y:y + OBJECT, x:x + OBJECT] = square
        frames.append(frame)
    return frames


def write_mjpeg(path, frames) -> None:
    """Intra-only clip (every frame a JPEG): the decoder exports no motion vectors."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mjpeg", rate=12)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuvj420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_h264(path, frames, rotation=None, faststart=False) -> None:
    """H.264 with an optional display matrix (PyAV's ``set_display_rotation``: counter-clockwise degrees)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("libx264", rate=12)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codec_clips")
    frames = moving_frames()
    rng = np.random.default_rng(1)
    still = background(H, W, 2)
    noisy = [np.clip(still.astype(np.int16) + rng.integers(-3, 4, still.shape), 0, 255).astype(np.uint8) for _ in range(96)]
    paths = {"moving": folder / "moving.mp4", "intra": folder / "moving_mjpeg.avi", "static": folder / "static.mp4"}
    codec = write_video(paths["moving"], frames)
    write_mjpeg(paths["intra"], frames)
    write_video(paths["static"], noisy)
    return paths, codec


def codec_processor(**options) -> LlavaViTPackingImageProcessor:
    return LlavaViTPackingImageProcessor(patch_size=P, video_sampling="codec", **options)


def share_on_object(sample) -> float:
    """Share of the patches kept after the first frame that overlap the square in their own frame."""
    t, h, w = sample.sampled_grid_thw
    later = sample.kept_indices[h * w:]
    on = []
    for flat in later.tolist():
        frame, row, col = flat // (h * w), flat // w % h, flat % w
        y, x = object_box(sample.frame_indices[frame])
        on.append(row * P < y + OBJECT and (row + 1) * P > y and col * P < x + OBJECT and (col + 1) * P > x)
    assert len(on) > 0
    return sum(on) / len(on)


def test_moving_object_gets_the_patches_after_the_first_frame(clips):
    paths, codec = clips
    sample = codec_processor(patch_budget=80 + 200).preprocess_video(paths["moving"])
    t, h, w = sample.sampled_grid_thw
    assert (t, h, w) == (64, H // P, W // P)
    assert sample.frame_indices == tuple(round(i * 127 / 63) for i in range(64))
    assert sample.codec.has_motion_vectors, f"{codec} should export motion vectors"
    assert sample.num_tokens == 280
    assert torch.equal(sample.kept_indices[: h * w], torch.arange(h * w))
    # 200 patches after the first frame, against about 9 * 63 patches the square covers: all of
    # them lie on the square in their frame (measured 100% with H.264); at least 90% is required.
    assert share_on_object(sample) >= 0.9


def test_intra_only_clip_works_through_the_residual_proxy(clips):
    paths, _ = clips
    sample = codec_processor(patch_budget=80 + 200).preprocess_video(paths["intra"])
    assert not sample.codec.has_motion_vectors
    assert not sample.codec.motion.any()
    assert any("residual proxy alone" in warning for warning in sample.warnings)
    assert sample.num_tokens == 280
    assert share_on_object(sample) >= 0.9  # measured 100% with MJPEG


def test_static_clip_keeps_the_first_frame_and_little_else(clips):
    paths, _ = clips
    processor = codec_processor(patch_budget=2000)
    sample = processor.preprocess_video(paths["static"])
    per_frame = (H // P) * (W // P)
    extra = sample.num_tokens - per_frame
    # "Little": at most 1% of the rest of the budget (measured 0: sensor noise of +-3 levels
    # scores below 0.01, under the default min_score of 0.02).
    assert 0 <= extra <= 0.01 * (2000 - per_frame)
    assert torch.equal(sample.kept_indices[:per_frame], torch.arange(per_frame))
    filled = codec_processor(patch_budget=2000, min_score=-1.0).preprocess_video(paths["static"])
    assert filled.num_tokens == 2000


@pytest.mark.parametrize("budget", [80, 81, 1000, 64 * 80])
def test_budget_exact_positions_unique_inside_the_grid(clips, budget):
    paths, _ = clips
    sample = codec_processor(patch_budget=budget, min_score=-1.0).preprocess_video(paths["moving"])
    t, h, w = sample.sampled_grid_thw
    assert sample.num_tokens == budget == sample.hidden_states.shape[0] == sample.patch_positions.shape[0]
    assert sample.grid_thw == (1, 1, budget)
    kept = sample.kept_indices
    assert torch.equal(kept, kept.unique()) and kept.min() >= 0 and kept.max() < t * h * w
    positions = sample.patch_positions
    assert len(positions.unique(dim=0)) == budget
    assert torch.equal(positions, torch.stack((kept // (h * w), kept // w % h, kept % w), -1))  # 64 frames: slot = frame
    assert positions[:, 1].max() < h and positions[:, 2].max() < w


def test_deterministic_and_same_pixels_as_uniform_sampling(clips):
    paths, _ = clips
    processor = codec_processor(patch_budget=500)
    first, second = processor.preprocess_video(paths["moving"]), processor.preprocess_video(paths["moving"])
    assert torch.equal(first.kept_indices, second.kept_indices)
    assert torch.equal(first.hidden_states, second.hidden_states)
    assert torch.equal(first.codec.scores, second.codec.scores)
    dense = LlavaViTPackingImageProcessor(patch_size=P, num_frames=64).preprocess_video(paths["moving"])
    assert dense.frame_indices == first.frame_indices
    assert torch.equal(first.hidden_states, dense.hidden_states[first.kept_indices])
    assert torch.equal(first.patch_positions, dense.patch_positions[first.kept_indices])
    assert set(first.codec.seconds) == {"decode", "score", "select"}
    assert all(seconds >= 0 for seconds in first.codec.seconds.values())


def test_ties_go_to_the_lower_index_and_padding_is_never_kept(clips):
    flat = np.zeros((3, 2, 2), dtype=np.float32)
    assert select_patches(flat, 6, keep_first_frame=True, min_score=-1.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert select_patches(flat, 6, keep_first_frame=True).tolist() == [0, 1, 2, 3]
    assert select_patches(flat, 6, keep_first_frame=False).tolist() == [0]
    flat[2, 1, 0] = flat[1, 0, 1] = 0.5
    assert select_patches(flat, 5, keep_first_frame=True).tolist() == [0, 1, 2, 3, 5]
    # A 40-frame clip spreads its frames over the 64-frame context; the 24 empty slots (the
    # source model's padding) never appear among the kept positions.
    paths, _ = clips
    short = codec_processor(patch_budget=1500, min_score=-1.0).preprocess_video(paths["moving"], num_frames=40)
    slots = {round(i / 39 * 63) for i in range(40)}
    assert short.sampled_grid_thw[0] == 40
    assert set(short.patch_positions[:, 0].tolist()) <= slots


def test_display_matrix_turns_frames_and_motion_alike(tmp_path):
    frames = moving_frames()
    stored, turned = tmp_path / "stored.mp4", tmp_path / "turned.mp4"
    write_h264(stored, frames)
    write_h264(turned, frames, rotation=-90)  # a phone held upright: shown turned a quarter clockwise
    processor = codec_processor(patch_budget=80 + 200)
    plain, upright = processor.preprocess_video(stored), processor.preprocess_video(turned)
    assert upright.original_size == (W, H) and upright.sampled_grid_thw == (64, W // P, H // P)
    assert plain.codec.motion.any()
    # Same bitstream, so the same vectors: equal up to the order of float32 sums.
    torch.testing.assert_close(upright.codec.motion, torch.rot90(plain.codec.motion, -1, dims=(1, 2)), rtol=0, atol=1e-5)
    torch.testing.assert_close(upright.codec.residual, torch.rot90(plain.codec.residual, -1, dims=(1, 2)), rtol=0, atol=1e-5)
    dense = LlavaViTPackingImageProcessor(patch_size=P, num_frames=64).preprocess_video(turned)
    assert torch.equal(upright.hidden_states, dense.hidden_states[upright.kept_indices])
    assert upright.warnings == ()


def test_truncated_file_is_sampled_from_the_frames_that_decode(tmp_path, clips):
    whole, cut = tmp_path / "whole.mp4", tmp_path / "cut.mp4"
    write_h264(whole, moving_frames(), faststart=True)  # the index (128 frames) before the data
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 4 // 10])
    dense = LlavaViTPackingImageProcessor(patch_size=P, num_frames=64).preprocess_video(cut)
    real = dense.total_frames
    assert 10 < real < FRAMES
    sample = codec_processor(patch_budget=80 + 200).preprocess_video(cut)
    assert sample.total_frames == real and sample.frame_indices == dense.frame_indices
    assert len(set(sample.frame_indices)) == len(sample.frame_indices) == min(real, 64)
    assert torch.equal(sample.hidden_states, dense.hidden_states[sample.kept_indices])
    assert len(sample.warnings) == 1 and f"only {real} of the {FRAMES} frames" in sample.warnings[0]


def test_in_memory_frames_use_the_residual_proxy():
    frames = np.stack(moving_frames()[:48])
    sample = codec_processor(patch_budget=80 + 150).preprocess_video(frames)
    assert sample.sampled_grid_thw == (48, H // P, W // P) and sample.num_tokens == 230
    assert not sample.codec.has_motion_vectors and sample.codec.decoded_frames == 0
    assert share_on_object(sample) >= 0.9


def test_options_are_checked_and_saved(tmp_path, clips):
    processor = codec_processor(patch_budget=300, keep_first_frame=False, motion_weight=2.0, residual_weight=0.5, min_score=-1.0)
    processor.save_pretrained(tmp_path)
    loaded = LlavaViTPackingImageProcessor.from_pretrained(tmp_path)
    for name in ("video_sampling", "patch_budget", "keep_first_frame", "motion_weight", "residual_weight", "min_score"):
        assert getattr(loaded, name) == getattr(processor, name), name
    assert LlavaViTPackingImageProcessor().video_sampling == "uniform"
    with pytest.raises(ValueError, match="video_sampling must be one of"):
        LlavaViTPackingImageProcessor(video_sampling="motion")
    with pytest.raises(ValueError, match="patch_budget must be a positive integer"):
        codec_processor(patch_budget=0)
    with pytest.raises(ValueError, match="motion_weight must be a finite number >= 0"):
        codec_processor(motion_weight=-1)
    with pytest.raises(ValueError, match="both 0"):
        codec_processor(motion_weight=0, residual_weight=0)
    with pytest.raises(ValueError, match="min_score must be"):
        codec_processor(min_score=float("nan"))
    with pytest.raises(TypeError, match="keep_first_frame must be True or False"):
        codec_processor(keep_first_frame=1)
    paths, _ = clips
    with pytest.raises(ValueError, match="cannot hold the first frame whole"):
        codec_processor(patch_budget=79).preprocess_video(paths["moving"])
    with pytest.raises(ValueError, match="at most 64, got 65"):
        codec_processor().preprocess_video(paths["moving"], num_frames=65)


def test_picture_shows_kept_patches_over_the_frames(clips):
    paths, _ = clips
    processor = codec_processor(patch_budget=80 + 200)
    sample = processor.preprocess_video(paths["moving"])
    frames = LlavaViTPackingImageProcessor(patch_size=P, num_frames=64).preprocess_video(paths["moving"])
    frames = processor.to_pixels(frames.hidden_states, frames.grid_thw)
    picture = draw_kept_patches(sample, processor, frames=frames, columns=8, tile_width=W)
    assert picture.size == (8 * (W + 4), 8 * (H + 4) + 14)
    tiles = np.asarray(picture)
    first = tiles[14 + 2:14 + 2 + H, 2:2 + W]
    assert np.array_equal(first, frames[0])  # kept whole, at full brightness
    t, h, w = sample.sampled_grid_thw
    second = tiles[14 + 2:14 + 2 + H, (W + 4) + 2:(W + 4) + 2 + W].astype(int)
    kept = set(sample.kept_indices.tolist())
    for row in range(h):
        for col in range(w):
            got = second[row * P:(row + 1) * P, col * P:(col + 1) * P]
            frame = frames[1, row * P:(row + 1) * P, col * P:(col + 1) * P].astype(int)
            expected = frame if h * w + row * w + col in kept else (frame * 0.3).astype(int)
            assert np.array_equal(got, expected), (row, col)
    bare = draw_kept_patches(sample, processor)
    assert bare.size == picture.size
    with pytest.raises(ValueError, match="needs a codec-sampled video"):
        draw_kept_patches(LlavaViTPackingImageProcessor(patch_size=P).preprocess_video(paths["moving"]), processor)


@torch.no_grad()
def test_packed_sparse_video_equals_source_model_with_visible_indices(tmp_path):
    """A codec sample packed with an image and a uniform video: each equals the source model,
    the codec one run on the 64-frame context with ``visible_indices`` = the kept patches."""
    p, height, width, frames_in_clip = 8, 48, 64, 40
    rng = np.random.default_rng(3)
    base = background(height, width, 4)
    frames = []
    for i in range(frames_in_clip):
        frame = base.copy()
        frame[8:24, i:i + 16] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        frames.append(frame)
    path = tmp_path / "clip.mp4"
    write_video(path, frames)
    source, packed = source_and_packed("layer_norm", seed=5)
    codec = LlavaViTPackingImageProcessor(patch_size=p, video_sampling="codec", patch_budget=48 + 150)
    uniform = LlavaViTPackingImageProcessor(patch_size=p, num_frames=8)
    image = background(height, width, 6)
    samples = [uniform.preprocess_image(image), uniform.preprocess_video(path), codec.preprocess_video(path)]
    sparse = samples[2]
    assert sparse.num_tokens == 198 and sparse.sampled_grid_thw == (frames_in_clip, height // p, width // p)
    out = packed(**LlavaViTPackingImageProcessor.pack(samples))

    h, w = height // p, width // p

    def pixels(rows: torch.Tensor, t: int) -> torch.Tensor:
        """Packed rows of ``t`` whole frames back to ``(3, t, height, width)`` normalized pixels."""
        return rows.reshape(t, h, w, 3, p, p).permute(3, 0, 1, 4, 2, 5).reshape(3, t, height, width)

    def source_video(sample, visible) -> dict:
        """Source model on the 64-frame context: the sampled frames at their slots, zeros elsewhere."""
        t = len(sample.frame_indices)
        all_frames = uniform.preprocess_video(path, num_frames=t)
        slots = all_frames.patch_positions.reshape(t, h * w, 3)[:, 0, 0]
        context = torch.zeros(1, 3, 64, height, width)
        context[0, :, slots] = pixels(all_frames.hidden_states, t)
        in_context = slots[visible // (h * w)] * (h * w) + visible % (h * w)
        return source(context, visible_indices=in_context[None])

    references = [
        source(pixels(samples[0].hidden_states, 1)[:, 0][None]),
        source_video(samples[1], torch.arange(samples[1].num_tokens)),
        source_video(sparse, sparse.kept_indices),
    ]
    start = 0
    for i, (sample, reference) in enumerate(zip(samples, references)):
        rows = slice(start, start + sample.num_tokens)
        assert (out.last_hidden_state[rows] - reference["visible_embeddings"][0]).abs().max() <= 1e-4, i
        assert (out.pooler_output[i] - reference["head_output"][0]).abs().max() <= 1e-4, i
        start += sample.num_tokens
