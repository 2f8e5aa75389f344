"""``llava-vit convert`` and the seed's script path ``model_factory/convert_llava_vit_packing_to_hf.py``.

Golden sets convert through the command and the written folders reproduce the golden outputs;
every refusal exits non-zero with a message naming the problem and leaves no output behind;
the original command line runs verbatim.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import GOLDEN_DIR, REPO_ROOT
from golden_cases import MANIFEST, SET_NAMES, load_cases, pack, source_path
import llava_vit
from llava_vit.convert import command as conversion_command
from llava_vit.convert import verify as conversion_verify
from llava_vit import LlavaViTPackingModel
from llava_vit.cli import main

TOL = 1e-4
ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")


def convert(capsys, *argv) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def architecture_args(set_name: str, folder: Path) -> list[str]:
    """``--config`` with the manifest's architecture for timm-source sets (their head count is in no shape)."""
    arch = MANIFEST[set_name].get("architecture")
    if arch is None:
        return []
    path = folder / f"{set_name}_config.json"
    path.write_text(json.dumps({k: arch[k] for k in ARCH_KEYS}))
    return ["--config", str(path)]


def assert_nothing_left(parent: Path, output: Path) -> None:
    assert not output.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}.")]


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return torch.load(source_path("tiny"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return Path(architecture_args("tiny", tmp_path_factory.mktemp("cfg"))[1])


# ---- golden sets through the command ------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", SET_NAMES)
def test_golden_set_converts_and_reproduces(name, tmp_path, capsys):
    output = tmp_path / "packed"
    code, out, err = convert(capsys, source_path(name), "--output-dir", output, *architecture_args(name, tmp_path))
    assert code == 0, err
    assert out.count("[PASS]") == 4 and "[FAIL]" not in out
    assert "max|diff|" in out and "cos min" in out
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    config = json.loads((output / "config.json").read_text())
    if MANIFEST[name]["format"] == "timm_source":  # the training code's PyTorch defaults (docs/ARCHITECTURE.md)
        assert "--config" in out and (config["layer_norm_eps"], config["head_norm_eps"]) == (1e-5, None)
    else:
        assert "the folder's config.json" in out and (config["layer_norm_eps"], config["head_norm_eps"]) == (1e-6, 1e-6)

    model = LlavaViTPackingModel.from_pretrained(output).eval()
    cases = load_cases(name, model.config.patch_size)
    for case in cases:
        result = model(case.hidden_states, case.grid_thw, case.patch_positions)
        assert (result.last_hidden_state - case.last_hidden_state).abs().max() <= TOL, case.case_id
        assert (result.pooler_output - case.pooler_output).abs().max() <= TOL, case.case_id
    hidden_states, grid_thw, positions = pack(cases)
    result = model(hidden_states, grid_thw, positions)
    assert (result.last_hidden_state - torch.cat([c.last_hidden_state for c in cases])).abs().max() <= TOL
    assert (result.pooler_output - torch.cat([c.pooler_output for c in cases])).abs().max() <= TOL


def test_output_folder_contents(tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModel

    from llava_vit.processing import LlavaViTPackingImageProcessor

    output = tmp_path / "packed"
    code, out, _ = convert(capsys, source_path("ovtiny"), "--output-dir", output, "--dtype", "bfloat16")
    assert code == 0
    assert "bfloat16 vs float32 source" in out and out.count("[PASS]") == 4
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in output.iterdir()} == {0o666 & ~umask}
    with safe_open(str(output / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((output / "config.json").read_text())["model_type"] == "llava_vit_packing"
    pre = json.loads((output / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "LlavaViTPackingImageProcessor"
    assert pre["patch_size"] == 14
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert (pre["do_rescale"], pre["rescale_factor"], pre["do_normalize"]) == (True, 1 / 255, True)
    assert (pre["temporal_context"], pre["num_frames"], pre["resample"]) == (64, 8, 3)
    model = AutoModel.from_pretrained(output)
    assert isinstance(model, LlavaViTPackingModel) and model.dtype == torch.bfloat16
    processor = AutoImageProcessor.from_pretrained(output)
    assert isinstance(processor, LlavaViTPackingImageProcessor) and processor.patch_size == 14


@torch.no_grad()
def test_sharded_hf_folder(tmp_path, capsys):
    """An HF folder with sharded weights and an index converts like the single-file one."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((GOLDEN_DIR / "ovtiny_hf" / "config.json").read_text())
    state = load_file(str(GOLDEN_DIR / "ovtiny_hf" / "model.safetensors"))
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, err = convert(capsys, folder, "--output-dir", tmp_path / "packed", "--no-verify")
    assert code == 0, err
    model = LlavaViTPackingModel.from_pretrained(tmp_path / "packed").eval()
    for case in load_cases("ovtiny", 14):
        result = model(case.hidden_states, case.grid_thw, case.patch_positions)
        assert (result.last_hidden_state - case.last_hidden_state).abs().max() <= TOL


def test_verification_catches_a_wrong_epsilon(tmp_path, capsys, monkeypatch):
    """A converter that wrote the HF-default epsilon (the classic bug) fails verification: exit 3, nothing written."""
    write = conversion_command.write_packing_folder

    def write_with_hf_epsilon(model, folder, dtype, **kwargs):
        model.config.layer_norm_eps = model.config.head_norm_eps = 1e-6
        return write(model, folder, dtype, **kwargs)

    monkeypatch.setattr(conversion_command, "write_packing_folder", write_with_hf_epsilon)
    output = tmp_path / "packed"
    code, out, err = convert(capsys, source_path("tinylowvar"), "--output-dir", output,
                             *architecture_args("tinylowvar", tmp_path))
    assert code == 3
    assert "[FAIL]" in out and "verification failed" in err and "nothing was written" in err
    assert_nothing_left(tmp_path, output)


def test_failed_write_removes_everything_it_created(tmp_path, capsys, monkeypatch, tiny_config):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion_command, "save_file", disk_full)
    output = tmp_path / "new" / "nested" / "packed"
    code, _, err = convert(capsys, source_path("tiny"), "--output-dir", output, "--config", tiny_config)
    assert code == 1 and "No space left on device" in err
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_an_existing_folder(tmp_path, capsys, tiny_config):
    output = tmp_path / "packed"
    output.mkdir()
    (output / "old.txt").write_text("old")
    code, _, err = convert(capsys, source_path("tiny"), "--output-dir", output, "--config", tiny_config)
    assert code == 1 and "exists and is not empty; pass --overwrite" in err
    assert (output / "old.txt").read_text() == "old"

    code, _, err = convert(capsys, source_path("tiny"), "--output-dir", output, "--config", tiny_config,
                           "--overwrite", "--no-verify")
    assert code == 0, err
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".packed.")]


def test_packed_folder_is_not_converted_again(tmp_path, capsys):
    code, _, _ = convert(capsys, source_path("ovtiny"), "--output-dir", tmp_path / "packed", "--no-verify")
    assert code == 0
    code, _, err = convert(capsys, tmp_path / "packed", "--output-dir", tmp_path / "again")
    assert code == 1 and "already in the packed layout" in err
    assert_nothing_left(tmp_path, tmp_path / "again")


def test_synthetic_picture_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    image, description = conversion_verify.load_photo()
    assert "synthetic" in description and image.size == (512, 600) and image.mode == "RGB"
    assert image.tobytes() == conversion_verify.load_photo()[0].tobytes()


def test_overwrite_never_deletes_the_source(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((GOLDEN_DIR / "ovtiny_hf" / f).read_bytes())
    code, _, err = convert(capsys, folder, "--output-dir", tmp_path, "--overwrite")
    assert code == 1 and "holds the source" in err
    assert (folder / "model.safetensors").is_file()


# ---- refusals -----------------------------------------------------------------------------------


class WritesAFile:
    """Unpickling this calls ``exec``, which writes ``path``: exactly what weights_only loading must never run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.path)!r}, 'w').write('executed')",)


def _save(state, path: Path) -> Path:
    torch.save({"model": state}, path)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _changed(state, drop: str | None = None, **changes):
    return {**{k: v for k, v in state.items() if k != drop}, **changes}


LAST_FC2 = "transformer.layers.1.mlp.2.weight"
REFUSALS = {  # name: (build the source from (tmp_path, tiny state dict), expected message)
    "missing file": (lambda tmp, sd: tmp / "absent.pt", "checkpoint not found"),
    "not a checkpoint": (lambda tmp, sd: _write(tmp / "notes.pt", b"not weights"), "is not a PyTorch checkpoint"),
    "cut-off file": (lambda tmp, sd: _write(tmp / "cut.pt", source_path("tiny").read_bytes()[:100_000]),
                     "is not a PyTorch checkpoint"),
    "truncated state dict": (lambda tmp, sd: _save(_changed(sd, drop=LAST_FC2), tmp / "t.pt"),
                             "missing tensors ['encoder.layers.1.mlp.fc2.weight']"),
    "extra key": (lambda tmp, sd: _save(_changed(sd, **{"head.extra": torch.zeros(3)}), tmp / "e.pt"),
                  "unexpected tensors ['head.extra']"),
    "unknown key": (lambda tmp, sd: _save(_changed(sd, **{"decoder.weight": torch.zeros(3)}), tmp / "u.pt"),
                    "have no place in the model: ['decoder.weight']"),
    "wrong shape": (lambda tmp, sd: _save(_changed(sd, **{"ln_post.weight": torch.zeros(7)}), tmp / "w.pt"),
                    "wrong shapes ['layernorm_post.weight: checkpoint (7,) vs model (128,)']"),
    "not a state dict": (lambda tmp, sd: _save([1, 2], tmp / "l.pt"), "does not hold a state dict"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(case, tmp_path, capsys, tiny_state, tiny_config):
    make, message = REFUSALS[case]
    src = make(tmp_path, tiny_state)
    output = tmp_path / "packed"
    code, out, err = convert(capsys, src, "--output-dir", output, "--config", tiny_config)
    assert code == 1
    assert message in err and str(Path(src).name) in err + out
    assert_nothing_left(tmp_path, output)


@pytest.mark.parametrize("argv, message", [
    ([], "ambiguous architecture"),
    (["--model-name", "llava_vit_small_ln"], "hidden_size: config 384 vs checkpoint 128"),
    (["--model-name", "llava_vit_tiny"], "is not a known variant"),
    (["--config", "{config_dir}/absent.json"], "--config file not found"),
    (["--config", "{config_dir}/bad.json"], "is not valid JSON"),
    (["--config", "{config_dir}/typo.json"], "unknown fields ['num_heads']"),
    (["--config", "{config_dir}/no_heads.json"], "does not give num_attention_heads"),
])
def test_architecture_refusals(argv, message, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{num_attention_heads: 2")
    (tmp_path / "typo.json").write_text('{"num_heads": 2}')
    (tmp_path / "no_heads.json").write_text('{"patch_size": 16}')
    output = tmp_path / "packed"
    argv = [a.format(config_dir=tmp_path) for a in argv]
    code, _, err = convert(capsys, source_path("tiny"), "--output-dir", output, *argv)
    assert code == 1 and message in err, err
    assert_nothing_left(tmp_path, output)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("wrap", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_never_executed(wrap, tmp_path, capsys, tiny_state):
    marker = tmp_path / "executed.txt"
    src = tmp_path / "evil.pt"
    if wrap == "torch.save":
        torch.save({"model": tiny_state, "extra": WritesAFile(marker)}, src)
    else:
        src.write_bytes(pickle.dumps({"model": WritesAFile(marker)}))
    # The payload is live: a plain unpickler runs it (here on a copy aimed at another file).
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(WritesAFile(probe)))
    assert probe.read_text() == "executed"

    output = tmp_path / "packed"
    code, _, err = convert(capsys, src, "--output-dir", output)
    assert code == 1 and "refused: loading it would execute code" in err
    if wrap == "torch.save":
        assert "exec" in err.split("rejected it:")[1]  # the reason names the blocked global
    assert not marker.exists()
    assert_nothing_left(tmp_path, output)


def test_cuda_refused_without_a_gpu(tmp_path, capsys, tiny_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = convert(capsys, source_path("tiny"), "--output-dir", tmp_path / "p", "--config", tiny_config,
                           "--device", "cuda")
    assert code == 1 and "CUDA is not available" in err


# ---- the seed's script path --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    import timm  # llava_vit, imported above, registers the timm names

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seed") / "backbone.pt"
    torch.save({"model": timm.create_model("llava_vit_small_ln").state_dict()}, path)
    return path


def test_seed_command_verbatim(small_checkpoint, tmp_path):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "model_factory/convert_llava_vit_packing_to_hf.py", "llava_vit_small_ln",
         str(small_checkpoint), "--output_dir", str(output)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "--model-name llava_vit_small_ln" in result.stdout and result.stdout.count("[PASS]") == 4
    assert LlavaViTPackingModel.from_pretrained(output).config.hidden_size == 384


def test_seed_script_defaults_and_imports(small_checkpoint, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    script = importlib.import_module("model_factory.convert_llava_vit_packing_to_hf")
    assert script.interpolate_frame_indices is llava_vit.interpolate_frame_indices
    assert (script.compute_patch_positions_with_interpolated_temporal
            is llava_vit.compute_patch_positions_with_interpolated_temporal)

    assert script.main(["llava_vit_small_ln", str(small_checkpoint), "--target_model_name",
                        "hf_llava_vit_packing_small_ln", "--no-verify"]) == 0
    default_output = small_checkpoint.with_name("backbone_hf_packing")
    assert (default_output / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        script.main(["llava_vit_small_ln", str(small_checkpoint),
                     "--target_model_name", "hf_llava_vit_packing_large_ln"])
    assert "is the large variant, but llava_vit_small_ln is small" in capsys.readouterr().err
