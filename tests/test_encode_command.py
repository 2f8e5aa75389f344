"""``llava-vit encode`` / ``encode_files`` end to end: generated files of every kind into a feature
store, packing, bad inputs, unsafe outputs, budgets, resume, and the bundled media."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import llava_vit.encoding.pipeline as pipeline
from llava_vit import (
    FeatureStore,
    LlavaViTPackingConfig,
    LlavaViTPackingImageProcessor,
    LlavaViTPackingModel,
    StoreError,
    encode_files,
)
from llava_vit.cli import build_parser, main
from llava_vit.demo import write_video, zoom_pan_frames
from llava_vit.encoding.pipeline import pack_window
import model_pairs

TINY = {**model_pairs.TINY, "patch_size": 14}  # the shared tiny architecture, at ViT-L's patch size
CPU32 = ("--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted-style folder: tiny random model plus its preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).save_pretrained(folder)
    LlavaViTPackingImageProcessor(patch_size=14, num_frames=4).save_pretrained(folder)
    return folder


def structured(height: int, width: int, seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 2 + seed, y * 3, (x * y + seed) % 256], -1).astype(np.uint8))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Images in several PIL modes (one EXIF-rotated), a clip, and a file that is not media."""
    folder = tmp_path_factory.mktemp("media")
    base = structured(70, 98)
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.jpg", exif=exif)
    (folder / "nested").mkdir()
    write_video(folder / "nested" / "clip.mp4", zoom_pan_frames(base, num_frames=10, size=(84, 56)))
    (folder / "notes.txt").write_text("not media")
    return folder


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """30 structured JPEGs of varied sizes and a clip: enough for several shards and windows."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(30):
        height, width = (int(v) for v in rng.integers(28, 120, 2))
        structured(height, width, seed=i).save(folder / f"img{i:02d}.jpg", quality=90)
    write_video(folder / "clip.mp4", zoom_pan_frames(structured(70, 98), num_frames=8, size=(84, 56)))
    return folder


def encode(*args) -> int:
    return main(["encode", *map(str, args), "--quiet"])


def by_name(store: FeatureStore) -> dict[str, dict]:
    return {os.path.basename(item["source"]): item for item in store}


def test_folder_of_mixed_inputs(model_dir, media, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(media, "--model", model_dir, "--output", out, "--visualize", "--save", "all",
                  "--max-tokens", "100", *CPU32) == 0
    stdout = capsys.readouterr().out
    store = FeatureStore(out)
    assert sorted(map(os.path.basename, store.sources)) == [
        "clip.mp4", "cmyk.jpg", "gray.png", "palette.png", "rgba.png", "rotated.jpg"]
    assert store.failed == [] and store.settings["weights"] == "checkpoint weights"
    # 35 tokens an image, 96 the clip, packed largest first: clip | 2 images | 2 images | 1 image
    assert "encoded 6 of 6 inputs in 4 forward passes" in stdout
    items = by_name(store)
    assert items["rotated.jpg"]["grid_thw"] == (1, 5, 7)  # upright 98 x 70 after the EXIF turn
    clip = items["clip.mp4"]
    assert clip["kind"] == "video" and clip["grid_thw"] == (4, 4, 6) and clip["frame_indices"] == [0, 3, 6, 9]
    assert clip["patch_features"].shape == (96, 64) and clip["pooled"].shape == (64,)
    assert clip["patch_positions"][::24, 0].tolist() == [0, 21, 42, 63]
    assert clip["source"].endswith("nested/clip.mp4") and clip["total_frames"] == 10
    assert items["gray.png"]["kind"] == "image" and items["gray.png"]["original_size"] == (70, 98)
    for item in store:
        with Image.open(item["picture"]) as picture:
            assert picture.mode == "RGB" and picture.width > 2 * 100
        assert os.path.dirname(item["picture"]) == str(out / "pictures")
    assert sorted(p.name for p in media.iterdir()) == [
        "cmyk.jpg", "gray.png", "nested", "notes.txt", "palette.png", "rgba.png", "rotated.jpg"]


def test_store_equals_each_input_encoded_alone(model_dir, many, tmp_path):
    out = tmp_path / "out"
    summary = encode_files(many, model=model_dir, output=out, save="all", max_tokens=100, shard_size=7,
                           device="cpu", dtype="float32", progress=False, log=lambda *a: None)
    assert summary.encoded == 31 and summary.shards == 5 and not summary.failed
    assert summary.passes >= summary.tokens / 100 and len(summary.pass_grids) == summary.passes
    assert all(sum(t * h * w for t, h, w in grids) <= 100 for grids in summary.pass_grids)
    store = FeatureStore(out)
    model = LlavaViTPackingModel.from_pretrained(model_dir).eval()
    processor = LlavaViTPackingImageProcessor.from_pretrained(model_dir)
    assert len(store) == 31 and store.pooled().shape == (31, 64) and store.pooled().dtype == torch.float32
    for i, source in enumerate(store.sources):
        with torch.inference_mode():
            alone = model(**processor.pack([processor.preprocess_file(source)]))
        item = store[i]
        torch.testing.assert_close(item["patch_features"], alone.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(item["pooled"], alone.pooler_output[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(store.pooled()[i], item["pooled"], rtol=0, atol=0)
        assert store.index_of(source) == i


def test_pack_window_fills_passes_largest_first():
    assert pack_window([5, 9, 3, 7, 1], 10) == [[1, 4], [3, 2], [0]]
    assert pack_window([12, 4], 10) == [[0], [1]]  # an input over the budget runs alone
    tokens = list(np.random.default_rng(1).integers(1, 500, 200))
    passes = pack_window(tokens, 1000)
    assert sorted(i for p in passes for i in p) == list(range(200))
    assert all(sum(tokens[i] for i in p) <= 1000 for p in passes)
    assert len(passes) <= -(-sum(tokens) // 1000) + 1


def test_pooled_store_is_compact_and_readable_by_everyone(model_dir, many, tmp_path):
    out = tmp_path / "out"
    assert encode(many, "--model", model_dir, "--output", out, "--save", "pooled", "--save-dtype", "bfloat16",
                  *CPU32) == 0
    store = FeatureStore(out)
    assert "patch_features" not in store[0] and store.pooled().dtype == torch.bfloat16
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    assert total / len(store) < 64 * 2 + 400  # the vector (128 bytes here) and its bookkeeping
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask(), f.name
    assert store.settings["save_dtype"] == "bfloat16" and store.settings["dtype"] == "float32"
    assert len(store.settings["model_sha256"]) == 64 and store.settings["processor"]["num_frames"] == 4


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_unreadable_inputs_are_skipped_and_listed_in_the_store(model_dir, media, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (bad / "truncated.mp4").write_bytes((media / "nested" / "clip.mp4").read_bytes()[:300])
    out = tmp_path / "out"
    status = encode(media / "gray.png", bad, tmp_path / "missing.png", tmp_path / "none_*.png",
                    "--model", model_dir, "--output", out)
    assert status == 1
    captured = capsys.readouterr()
    assert "encoded 1 of 3 inputs, 4 failed" in captured.out
    listed = captured.err.split("FAILED 4:")[1]
    for name in ("corrupt.jpg", "truncated.mp4", "missing.png", "none_*.png"):
        assert name in listed
    store = FeatureStore(out)
    assert [os.path.basename(s) for s in store.sources] == ["gray.png"]
    assert sorted(os.path.basename(f["source"]) for f in store.failed) == [
        "corrupt.jpg", "missing.png", "none_*.png", "truncated.mp4"]
    assert all(f["error"] for f in store.failed)


def test_kill_midway_then_resume_equals_one_run(model_dir, many, tmp_path, capsys):
    """SIGINT once the first shard is complete leaves a consistent store; --resume completes it,
    every input exactly once, features bit-equal to an uninterrupted run in float32."""
    options = ["--model", str(model_dir), "--save", "all", "--shard-size", "2", "--max-tokens", "200",
               "--workers", "0", *CPU32, "--quiet"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["encode", str(many), "--output", str(whole), *options]) == 0
    command = [sys.executable, "-m", "llava_vit.cli", "encode", str(many), "--output", str(cut), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.suffix == ".safetensors" for p in cut.glob("run001-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "--resume" in last and "Traceback" not in stderr
    partial = FeatureStore(cut)
    assert 2 <= len(partial) < 31 and len(set(partial.sources)) == len(partial)
    assert not list(cut.glob(".*.tmp"))

    assert main(["encode", str(many), "--output", str(cut), *options]) == 2  # not empty: --resume needed
    assert main(["encode", str(many), "--output", str(cut), "--resume", *options]) == 0
    resumed, reference = FeatureStore(cut), FeatureStore(whole)
    assert sorted(resumed.sources) == sorted(reference.sources) and len(resumed) == 31
    for source in reference.sources:
        a, b = resumed[resumed.index_of(source)], reference[reference.index_of(source)]
        assert torch.equal(a["pooled"], b["pooled"]) and torch.equal(a["patch_features"], b["patch_features"])
    assert main(["encode", str(many), "--output", str(cut), "--resume", *options]) == 0  # nothing left to do
    assert "nothing to encode: the 31 inputs are all in" in capsys.readouterr().out
    assert len(FeatureStore(cut)) == 31


def test_resume_refuses_a_store_made_differently(model_dir, many, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(many / "img00.jpg", "--model", model_dir, "--output", out, *CPU32) == 0
    capsys.readouterr()
    assert encode(many, "--model", "small", "--output", out, "--resume", *CPU32) == 2
    assert "model_sha256: store has" in capsys.readouterr().err
    assert encode(many, "--model", model_dir, "--output", out, "--resume", "--frames", "2", *CPU32) == 2
    assert "processor num_frames: store has 4, this run 2" in capsys.readouterr().err
    assert encode(many, "--model", model_dir, "--output", out, "--resume", "--save-dtype", "float16", *CPU32) == 2
    assert "save_dtype: store has 'float32', this run 'float16'" in capsys.readouterr().err
    assert len(FeatureStore(out)) == 1


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_an_input_folder_is_refused(model_dir, media, tmp_path, where, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_encoder", _must_not_load)
    out = media if where == "same" else media / "features"
    assert encode(media, "--model", model_dir, "--output", out, "--visualize") == 2
    err = capsys.readouterr().err
    assert "input folder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (media / "features").exists() and not (media / "pictures").exists()


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs and the output were checked")


def test_bad_output_and_options_fail_before_the_model_loads(model_dir, media, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_encoder", _must_not_load)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (("--output", a_file), "is a file; expected a folder"),
        (("--output", a_file / "sub"), "is a file"),
        (("--output", media.parent), "choose an output folder outside the inputs"),
        (("--output", tmp_path / "o", "--max-tokens", "0"), "--max-tokens must be a positive integer, got 0"),
        (("--output", tmp_path / "o", "--shard-size", "-1"), "--shard-size must be a positive integer, got -1"),
        (("--output", tmp_path / "o", "--resize-mode", "fixed"), "size"),
        (("--output", tmp_path / "o", "--max-pixels", "100"), "only used with resize_mode='budget'"),
    ]
    not_empty = tmp_path / "not_empty"
    not_empty.mkdir()
    (not_empty / "keep.txt").write_text("mine")
    cases.append((("--output", not_empty), "is not empty (it holds 1 entries); pass --resume"))
    cases.append((("--output", not_empty, "--resume"), "holds no feature store"))
    for options, message in cases:
        assert encode(media / "gray.png", "--model", model_dir, *options) == 2, options
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (options, err)
    assert encode(tmp_path / "nothing_here", "--model", model_dir, "--output", tmp_path / "o") == 2
    assert "no image or video files to encode" in capsys.readouterr().err
    assert encode(media / "gray.png", "--model", "tiny", "--output", tmp_path / "o") == 2
    assert "neither a model folder nor a variant name" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert encode(media / "gray.png", "--model", "small", "--device", "cuda", "--output", tmp_path / "o") == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err
    assert (not_empty / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_huge_image_is_brought_into_the_token_budget(model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    structured(1400, 2100).save(folder / "huge.png")  # 100 x 150 patches of 14: 15000 tokens
    out = tmp_path / "out"
    summary = encode_files(folder, model=model_dir, output=out, max_tokens=1000, device="cpu", dtype="float32",
                           progress=False, log=lambda *a: None)
    item = FeatureStore(out)[0]
    t, h, w = item["grid_thw"]
    assert t * h * w <= 1000 and abs(w / h - 1.5) < 0.1 and summary.tokens == t * h * w
    assert "to fit max_tokens=1000" in item["warnings"][0] and item["original_size"] == (1400, 2100)


def test_variant_name_gives_labelled_random_weights(media, tmp_path, capsys):
    assert encode(media / "gray.png", "--model", "small", "--output", tmp_path / "o", "--frames", "2") == 0
    stdout = capsys.readouterr().out
    assert "hf_llava_vit_packing_small_ln, random weights (seed 0)" in stdout and "RANDOM WEIGHTS" in stdout
    store = FeatureStore(tmp_path / "o")
    assert store.settings["weights"] == "random weights (seed 0)" and store.pooled().shape == (1, 384)


def test_help_states_every_default():
    encode_parser = build_parser()._subparsers._group_actions[0].choices["encode"]
    for action in encode_parser._actions:
        if action.option_strings and action.nargs != 0 and action.dest not in ("help", "model"):
            text = action.help % {"default": action.default} if action.help else ""
            assert "default" in text or action.dest in ("size", "min_pixels", "max_pixels"), action.dest


def test_bundled_media(model_dir, media_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(media_dir, "--model", model_dir, "--output", out, "--frames", "8", "--visualize") == 0
    store = FeatureStore(out)
    grids = {os.path.basename(item["source"]): item["grid_thw"] for item in store}
    assert grids == {"photo_2048x1365.jpg": (1, 97, 146), "photo_rgba_1189x790.png": (1, 56, 84),
                     "clip_1.mp4": (8, 18, 18), "clip_2.mp4": (8, 17, 30)}
    # under 16384 tokens, largest first: the big photo (14162) | the RGBA photo, the clips (4704 + 4080 + 2592)
    assert "4 of 4 inputs in 2 forward passes" in capsys.readouterr().out
    clip = by_name(store)["clip_2.mp4"]
    assert clip["frame_indices"] == [0, 3, 5, 8, 11, 14, 16, 19]
    assert len(list((out / "pictures").glob("*.png"))) == 4


def test_codec_sampled_videos_keep_their_patches_in_the_store(model_dir, media, tmp_path, capsys):
    out = tmp_path / "out"
    clip = media / "nested" / "clip.mp4"
    assert encode(clip, media / "gray.png", "--model", model_dir, "--output", out, "--video-sampling", "codec",
                  "--patch-budget", "40", "--save", "all", "--visualize", *CPU32) == 0
    items = by_name(FeatureStore(out))
    video, image = items["clip.mp4"], items["gray.png"]
    kept = video["kept_indices"]
    assert video["grid_thw"] == (1, 1, len(kept)) and len(kept) <= 40
    t, h, w = video["sampled_grid_thw"]
    assert (t, h, w) == (10, 4, 6) and kept.unique().numel() == len(kept) and int(kept.max()) < t * h * w
    assert torch.equal(kept[:h * w], torch.arange(h * w, dtype=kept.dtype))  # the first frame, whole
    assert video["patch_features"].shape == (len(kept), 64) and video["patch_positions"].shape == (len(kept), 3)
    assert "kept_indices" not in image and image["grid_thw"] == (1, 5, 7)
    with Image.open(video["picture"]) as picture:
        assert picture.width > 100
    out3 = tmp_path / "o3"  # the default processor: 64 frames (all 10 here), not the uniform default of 8
    assert encode(clip, "--model", "small", "--output", out3, "--video-sampling", "codec", *CPU32) == 0
    assert FeatureStore(out3)[0]["sampled_grid_thw"][0] == 10
    assert encode(clip, "--model", model_dir, "--output", tmp_path / "o2", "--video-sampling", "codec",
                  "--patch-budget", "500", "--max-tokens", "100") == 2
    assert "--patch-budget 500 is more than --max-tokens 100" in capsys.readouterr().err


def test_reader_reads_a_large_store_quickly_and_names_a_damaged_shard(model_dir, many, tmp_path):
    out = tmp_path / "out"
    encode_files(many, model=model_dir, output=out, shard_size=3, device="cpu", dtype="float32",
                 progress=False, log=lambda *a: None)
    store = FeatureStore(out)
    sources = store.sources
    assert [store.index_of(s) for s in sources] == list(range(31))
    assert [item["source"] for item in store] == sources and store[-1]["source"] == sources[-1]
    with pytest.raises(IndexError, match="out of range for a store of 31 inputs"):
        store[31]
    with pytest.raises(KeyError, match="is not in the store"):
        store.index_of(tmp_path / "other.jpg")
    shard = sorted(out.glob("run001-*.safetensors"))[4]
    shard.write_bytes(shard.read_bytes()[:100])  # a shard cut short outside llava-vit
    with pytest.raises(StoreError, match=f"{shard.name} is listed in the store's index but cannot be read"):
        FeatureStore(out)
    assert encode(many, "--model", model_dir, "--output", out, "--resume", *CPU32) == 2  # one line, no traceback
