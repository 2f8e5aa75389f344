"""Shared test fixtures: the vendored golden vectors, the optional ../shared media; tests marked ``cuda`` skip without a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT / "tests" / "data" / "golden"
SHARED_DIR = Path(os.environ.get("LLAVA_VIT_SHARED", REPO_ROOT.parent / "shared"))
MEDIA_DIR = SHARED_DIR / "media"
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not MEDIA_DIR.is_dir():
        pytest.skip(f"the project's own photos and clips are not here ({MEDIA_DIR} is missing; it exists only "
                    "on project machines, or set LLAVA_VIT_SHARED to a folder that holds media/)")
    return MEDIA_DIR


@pytest.fixture(scope="session")
def golden_manifest() -> dict:
    return json.loads((GOLDEN_DIR / "manifest.json").read_text())
