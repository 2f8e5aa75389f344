"""``llava-vit encode`` end to end: generated files of every kind, bad files, budgets, model choices,
and the bundled media."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from llava_vit import LlavaViTPackingConfig, LlavaViTPackingImageProcessor, LlavaViTPackingModel
from llava_vit.cli import main
from llava_vit.demo import write_video, zoom_pan_frames

TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2, patch_size=14)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted-style folder: tiny random model plus its preprocessor_config.json."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    LlavaViTPackingModel(LlavaViTPackingConfig(**TINY)).save_pretrained(folder)
    LlavaViTPackingImageProcessor(patch_size=14, num_frames=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Images in several PIL modes (one EXIF-rotated), a clip, and a file that is not media."""
    folder = tmp_path_factory.mktemp("media")
    y, x = np.mgrid[0:70, 0:98]
    base = Image.fromarray(np.stack([x * 2, y * 3, (x * y) % 256], -1).astype(np.uint8))
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


def encode(*args: str) -> int:
    return main(["encode", *map(str, args)])


def read_output(path):
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def test_folder_of_mixed_inputs(model_dir, media, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(media, "--model", model_dir, "--output", out, "--visualize", "--max-tokens", "80") == 0
    stdout = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    names = sorted(entry["source"].split("/")[-1] for entry in index["inputs"])
    assert names == ["clip.mp4", "cmyk.jpg", "gray.png", "palette.png", "rgba.png", "rotated.jpg"]
    assert index["failed"] == [] and index["weights"] == "checkpoint weights"
    # in path order, 35 tokens an image, 96 the clip: cmyk+gray, the clip alone (over budget), palette+rgba, rotated
    assert "6 of 6 inputs in 4 forward passes" in stdout

    by_name = {entry["source"].split("/")[-1]: entry for entry in index["inputs"]}
    assert by_name["rotated.jpg"]["grid_thw"] == [1, 5, 7]  # upright 98 x 70 after the EXIF turn
    clip = by_name["clip.mp4"]
    assert clip["kind"] == "video" and clip["grid_thw"] == [4, 4, 6] and clip["frame_indices"] == [0, 3, 6, 9]
    tensors, metadata = read_output(out / clip["features"])
    assert tensors["patch_features"].shape == (96, 64) and tensors["pooled"].shape == (64,)
    assert tensors["patch_positions"][::24, 0].tolist() == [0, 21, 42, 63]
    assert metadata["source"].endswith("nested/clip.mp4") and metadata["total_frames"] == "10"
    for entry in index["inputs"]:
        with Image.open(out / entry["picture"]) as picture:
            assert picture.mode == "RGB" and picture.width > 2 * 100


def test_packed_passes_equal_one_input_per_pass(model_dir, media, tmp_path):
    cpu = ("--device", "cpu", "--dtype", "float32")  # the float32 equality this checks; a GPU would default to bf16
    assert encode(media, "--model", model_dir, "--output", tmp_path / "packed", *cpu) == 0
    assert encode(media, "--model", model_dir, "--output", tmp_path / "alone", "--max-tokens", "1", *cpu) == 0
    files = sorted(p.name for p in (tmp_path / "packed").glob("*.safetensors"))
    assert len(files) == 6
    for name in files:
        packed, _ = read_output(tmp_path / "packed" / name)
        alone, _ = read_output(tmp_path / "alone" / name)
        for key in ("patch_features", "pooled"):
            torch.testing.assert_close(packed[key], alone[key], rtol=0, atol=1e-5)


def test_unreadable_inputs_are_reported_and_skipped(model_dir, media, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (bad / "truncated.mp4").write_bytes((media / "nested" / "clip.mp4").read_bytes()[:300])
    out = tmp_path / "out"
    status = encode(media / "gray.png", bad, tmp_path / "missing.png", tmp_path / "none_*.png",
                    "--model", model_dir, "--output", out)
    assert status == 1
    captured = capsys.readouterr()
    assert "encoded 1 of 5 inputs" in captured.out
    for name in ("corrupt.jpg", "truncated.mp4", "missing.png", "none_*.png"):
        assert f"skipped {tmp_path}" in captured.err and name in captured.err.split("FAILED")[1]
    index = json.loads((out / "index.json").read_text())
    assert [entry["source"].split("/")[-1] for entry in index["inputs"]] == ["gray.png"]
    assert len(index["failed"]) == 4 and all(entry["error"] for entry in index["failed"])


def test_glob_patterns_pick_media_files(model_dir, media, tmp_path):
    assert encode(str(media / "*.png"), "--model", model_dir, "--output", tmp_path) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert sorted(entry["features"] for entry in index["inputs"]) == [
        "gray.safetensors", "palette.safetensors", "rgba.safetensors"]


def test_variant_name_gives_labelled_random_weights(media, tmp_path, capsys):
    assert encode(media / "gray.png", "--model", "small", "--output", tmp_path, "--frames", "2") == 0
    stdout = capsys.readouterr().out
    assert "hf_llava_vit_packing_small_ln, random weights (seed 0)" in stdout and "RANDOM WEIGHTS" in stdout
    tensors, metadata = read_output(tmp_path / "gray.safetensors")
    assert metadata["weights"] == "random weights (seed 0)" and tensors["pooled"].shape == (384,)
    assert json.loads((tmp_path / "index.json").read_text())["weights"] == "random weights (seed 0)"


def test_bad_arguments_exit_2(media, tmp_path, capsys):
    assert encode(media / "gray.png", "--model", "tiny", "--output", tmp_path) == 2
    assert "neither a model folder nor a variant name" in capsys.readouterr().err
    assert encode(media / "gray.png", "--model", "small", "--max-tokens", "0", "--output", tmp_path) == 2
    assert "--max-tokens must be a positive integer, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert encode(media / "gray.png", "--model", "small", "--device", "cuda", "--output", tmp_path) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err


def test_bundled_media(model_dir, media_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(media_dir, "--model", model_dir, "--output", out, "--frames", "8", "--visualize") == 0
    grids = {entry["source"].split("/")[-1]: entry["grid_thw"]
             for entry in json.loads((out / "index.json").read_text())["inputs"]}
    assert grids == {"photo_2048x1365.jpg": [1, 97, 146], "photo_rgba_1189x790.png": [1, 56, 84],
                     "clip_1.mp4": [8, 18, 18], "clip_2.mp4": [8, 17, 30]}
    # in path order under 16384 tokens: the clips (2592 + 4080), the big photo (14162), the RGBA photo (4704)
    assert "4 of 4 inputs in 3 forward passes" in capsys.readouterr().out
    tensors, _ = read_output(out / "clip_2.safetensors")
    assert tensors["frame_indices"].tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    assert tensors["patch_positions"][:, 0].unique().tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert len(list(out.glob("*.png"))) == 4
