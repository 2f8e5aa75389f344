"""Encoding on many processes: torchrun (2 CPU ranks, gloo) into one store, a rank killed midway
then resumed on one process, the split and the token estimates, and Ray Data's BatchEncoder.

Bit-equality: a forward pass's results depend, in their last bits, on which inputs share the pass
(and, on the CPU, on the number of threads). The ranks split the inputs into whole shards, which
the planner packs exactly as one process does, so two ranks must give the very bits of one process
with the same --shard-size and --max-tokens; every encode here runs one thread (torchrun's
default OMP_NUM_THREADS=1 for several ranks), the one-process runs included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_encode_command import model_dir, structured  # noqa: F401 - model_dir is a fixture

from llava_vit import FeatureStore, LlavaViTPackingImageProcessor
from llava_vit.cli import main
from llava_vit.demo import write_video, zoom_pan_frames
from llava_vit.encoding.distributed import balance, combined, estimate_tokens, from_environment, split
from llava_vit.encoding.pipeline import EncodeSummary
from llava_vit.encoding.ray_data import BatchEncoder

OPTIONS = ("--save", "all", "--shard-size", "2", "--max-tokens", "200", "--workers", "0",
           "--device", "cpu", "--dtype", "float32", "--quiet")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""torchrun's environment: one thread per rank (its default for several ranks, unless OMP_NUM_THREADS is set)."""
FIRST = ("img00.jpg", "img01.jpg")
"""Encoded by a first one-process run, so the runs under test resume a store (run002, on every rank)."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """60 images of varied sizes, 3 clips and a damaged JPEG: with shards of 2, each of 2 ranks has
    many shards, so one killed after its first shard has work left."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i in range(60):
        height, width = (int(v) for v in rng.integers(28, 130, 2))
        structured(height, width, seed=i).save(folder / f"img{i:02d}.jpg", quality=90)
    for i, (frames, size) in enumerate([(8, (84, 56)), (12, (112, 70)), (3, (56, 42))]):
        write_video(folder / f"clip{i}.mp4", zoom_pan_frames(structured(90, 128, seed=i), num_frames=frames, size=size))
    (folder / "damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    return folder


def encode(*args) -> int:
    """``llava-vit encode`` in this process, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["encode", *map(str, args)])
    finally:
        torch.set_num_threads(threads)


def torchrun(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "llava_vit.cli", "encode", *map(str, args)]


@pytest.fixture(scope="module")
def started(model_dir, inputs, tmp_path_factory):  # noqa: F811
    """A store holding FIRST (run001, one process), and the reference: that store completed by one process."""
    folder = tmp_path_factory.mktemp("stores")
    start = folder / "start"
    assert encode(*(inputs / name for name in FIRST), "--model", model_dir, "--output", start, *OPTIONS) == 0
    reference = folder / "reference"
    shutil.copytree(start, reference)
    assert encode(inputs, "--model", model_dir, "--output", reference, "--resume", *OPTIONS) == 1  # the damaged JPEG
    return start, reference


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    """Same inputs, each once, with bit-equal features, and the same failures."""
    assert sorted(store.sources) == sorted(reference.sources) and len(set(store.sources)) == len(store)
    for source in reference.sources:
        a, b = store[store.index_of(source)], reference[reference.index_of(source)]
        assert a["grid_thw"] == b["grid_thw"], source
        assert torch.equal(a["pooled"], b["pooled"]) and torch.equal(a["patch_features"], b["patch_features"]), source
    assert sorted(f["source"] for f in store.failed) == sorted(f["source"] for f in reference.failed)


def test_two_ranks_resume_a_store_as_one_process_would(model_dir, inputs, started, tmp_path):  # noqa: F811
    start, reference = started
    out = tmp_path / "out"
    shutil.copytree(start, out)
    done = subprocess.run(torchrun(2, inputs, "--model", model_dir, "--output", out, "--resume", *OPTIONS),
                          capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert done.returncode == 1, done.stderr  # the damaged JPEG, listed once by rank 0
    lines = done.stdout.strip().splitlines()  # rank 0 only
    assert len(lines) == 4 and lines[0].startswith("model: ") and lines[1].startswith("device: cpu")
    assert lines[2].startswith("torchrun: 2 processes (gloo); rank 0 encodes ") and lines[2].endswith("of the 62 inputs left, in shards of 2")
    assert lines[3].startswith("encoded 61 of 64 inputs, 2 already stored, 1 failed in ") and " on 2 processes (" in lines[3]
    assert done.stderr.count("FAILED 1:") == 1 and sum("damaged.jpg" in line for line in done.stderr.splitlines()) == 1
    assert_same_store(FeatureStore(out), FeatureStore(reference))
    indexes = {p.name: json.loads(p.read_text()) for p in out.glob("index-*.json")}
    assert sorted(indexes) == ["index-run001.json", "index-run002-rank000.json", "index-run002-rank001.json"]
    ranks = [indexes[f"index-run002-rank00{r}.json"] for r in (0, 1)]
    assert all(index["finished"] and index["shards"] for index in ranks)
    assert sum(len(index["failed"]) for index in ranks) == 1
    tokens = [sum(shard["tokens"] for shard in index["shards"]) for index in ranks]
    assert abs(tokens[0] - tokens[1]) <= max(s["tokens"] for index in ranks for s in index["shards"])


def test_a_killed_rank_leaves_a_store_that_one_process_completes(model_dir, inputs, started, tmp_path, capsys):  # noqa: F811
    start, reference = started
    out = tmp_path / "out"
    shutil.copytree(start, out)
    launcher = subprocess.Popen(torchrun(2, inputs, "--model", model_dir, "--output", out, "--resume", *OPTIONS),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while not (out / "run002-rank001-00000.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(_rank_process(launcher.pid, 1), signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0  # torchrun stopped rank 0 (SIGTERM), which stops after its shard
    assert (stdout.strip().splitlines()[-1].startswith("interrupted: rank 0 stored ")  # encoding, or done
            or "interrupted before any input was encoded" in stderr)  # still starting
    partial = FeatureStore(out)
    assert len(FIRST) + 2 <= len(partial) < 63 and len(set(partial.sources)) == len(partial)
    whole = FeatureStore(reference)
    for source in partial.sources:  # what the ranks stored is intact
        assert torch.equal(partial[partial.index_of(source)]["pooled"], whole[whole.index_of(source)]["pooled"])

    damaged_left = not partial.failed  # else a rank recorded it before the kill
    assert encode(inputs, "--model", model_dir, "--output", out, "--resume", *OPTIONS) == int(damaged_left)
    assert f"{len(partial) + len(partial.failed)} already stored" in capsys.readouterr().out
    assert (out / "index-run003.json").is_file()
    assert_same_store(FeatureStore(out), whole)


def _rank_process(launcher: int, rank: int) -> int:
    """The process torchrun (``launcher``) started for ``rank``, found by its environment."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            environment = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if int(parent.split()[1]) == launcher and f"RANK={rank}".encode() in environment:
            return int(status.parent.name)
    raise AssertionError(f"torchrun {launcher} has no rank {rank} process")


def test_split_gives_whole_shards_balanced_by_tokens():
    assert balance([5, 9, 3, 7, 1], 2) == [1, 0, 0, 1, 0]  # 9, 7 | 5 joins the 7, 3 the 9 | 1: 12 each, bin 0
    tokens = [int(t) for t in np.random.default_rng(0).integers(1, 2000, 1003)]
    shares = split(tokens, 10, 4)
    assert sorted(i for share in shares for i in share) == list(range(1003))
    for share in shares:
        assert share == sorted(share)
        assert all(i % 10 == 0 or i - 1 in share for i in share)  # whole shards: runs starting at multiples of 10
    loads = [sum(tokens[i] for i in share) for share in shares]
    largest_shard = max(sum(tokens[s:s + 10]) for s in range(0, 1003, 10))
    assert max(loads) - min(loads) <= largest_shard
    assert split(tokens, 10, 4) == shares  # every rank computes the same split


@pytest.mark.parametrize("settings", [{}, {"resize_mode": "budget", "min_pixels": 3000, "max_pixels": 9000},
                                      {"max_tokens": 40}, {"video_sampling": "codec", "patch_budget": 60}])
def test_token_estimates_from_headers_match_the_processor(inputs, settings):
    processor = LlavaViTPackingImageProcessor(patch_size=14, num_frames=4, **settings)
    for path in sorted(inputs.iterdir()):
        estimate = estimate_tokens(path, processor, 4)
        if path.name == "damaged.jpg":
            assert estimate == 0
        elif settings.get("video_sampling") == "codec" and path.suffix == ".mp4":
            assert 0 < processor.preprocess_file(path, 4).num_tokens <= estimate <= 60, path.name
        else:
            assert estimate == processor.preprocess_file(path, 4).num_tokens, path.name


def test_ranks_summaries_combine_into_the_runs_totals():
    parts = [EncodeSummary(Path("o"), 10, 4, 1, [("a.jpg", "damaged")], 2, 100, 2.0, 1.0, 10, 1,
                           startup_seconds=0.5, starved_seconds=0.2, pass_grids=[[(1, 2, 2)]]),
             EncodeSummary(Path("o"), 10, 5, 1, [], 3, 150, 4.0, 2.0, 20, 2,
                           startup_seconds=0.7, starved_seconds=0.4, pass_grids=[[(1, 3, 3)]])]
    total = combined(parts)
    assert (total.inputs, total.already_stored, total.encoded, total.failed) == (10, 1, 9, [("a.jpg", "damaged")])
    assert (total.passes, total.tokens, total.bytes_written, total.shards) == (5, 250, 30, 3)
    assert (total.seconds, total.busy, total.startup_seconds) == (4.0, 1.5 / 4.0, 0.7)
    assert total.starved_seconds == pytest.approx(0.3) and total.pass_grids == [[(1, 2, 2)], [(1, 3, 3)]]


def test_torchrun_environment():
    assert from_environment({}) is None
    ranks = from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size, ranks.leader) == (3, 4, 1, 2, False)
    with pytest.raises(ValueError, match="RANK=4 must be in"):
        from_environment({"RANK": "4", "WORLD_SIZE": "4"})


def test_batch_encoder_reads_paths_and_bytes_like_encode_files(model_dir, inputs, started):  # noqa: F811
    """Called as Ray calls it (a dict of numpy columns): same grids, and pooled and patch features
    equal to the store's to float32 rounding (the passes hold other inputs than the store's did)."""
    store = FeatureStore(started[1])
    files = sorted(str(p) for p in inputs.iterdir())
    encoder = BatchEncoder(model_dir, save="all", max_tokens=200, device="cpu", dtype="float32")
    by_path = encoder({"path": np.array(files), "id": np.arange(len(files))})
    contents = np.array([Path(f).read_bytes() for f in files], dtype=object)
    by_bytes = encoder({"bytes": contents, "path": np.array(files)})
    assert sorted(by_bytes) == ["error", "grid_thw", "patch_features", "path", "pooled"]
    for batch in (by_path, by_bytes):
        for i, source in enumerate(files):
            if source.endswith("damaged.jpg"):
                assert batch["error"][i].startswith("ValueError: cannot read image ") and source in batch["error"][i]
                assert np.isnan(batch["pooled"][i]).all() and batch["patch_features"][i].shape == (0, 64)
                continue
            item = store[store.index_of(source)]
            assert batch["error"][i] == "" and tuple(batch["grid_thw"][i]) == item["grid_thw"]
            np.testing.assert_allclose(batch["pooled"][i], item["pooled"].numpy(), rtol=0, atol=1e-5)
            np.testing.assert_allclose(batch["patch_features"][i], item["patch_features"].numpy(), rtol=0, atol=1e-5)
    assert by_path["id"].tolist() == list(range(len(files)))
    unnamed = encoder({"bytes": contents[[files.index(str(inputs / "clip2.mp4")), -1]]})  # no path column
    assert unnamed["error"].tolist() == ["", ""] and unnamed["grid_thw"][0].tolist() == [3, 3, 4]


def test_ray_data_map_batches_gives_the_stores_pooled_vectors(model_dir, inputs, started):  # noqa: F811
    import ray

    store = FeatureStore(started[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_binary_files(str(inputs), include_paths=True).map_batches(
            BatchEncoder, fn_constructor_kwargs={"model": str(model_dir), "max_tokens": 200, "device": "cpu",
                                                 "dtype": "float32", "threads": 1},
            batch_size=8, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 64 and sorted(rows[0]) == ["error", "grid_thw", "path", "pooled"]
    for row in rows:
        if row["path"].endswith("damaged.jpg"):
            assert row["error"] and np.isnan(row["pooled"]).all()
            continue
        item = store[store.index_of(row["path"])]
        assert row["error"] == "" and tuple(row["grid_thw"]) == item["grid_thw"]
        np.testing.assert_allclose(row["pooled"], item["pooled"].numpy(), rtol=0, atol=1e-5)
