"""Golden cases (tests/data/golden) as packed inputs and source-model inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from conftest import GOLDEN_DIR
from llava_vit import LlavaViTPackingConfig, compute_patch_positions_with_interpolated_temporal
from llava_vit.processing import patchify  # noqa: F401  (re-exported for the tests)
from llava_vit.reference import video_in_context

MANIFEST = json.loads((GOLDEN_DIR / "manifest.json").read_text())
SET_NAMES = tuple(MANIFEST)


@dataclass
class GoldenCase:
    set_name: str
    case_id: str
    hidden_states: torch.Tensor  # (seq, C*p*p)
    grid_thw: torch.Tensor  # (1, 3)
    patch_positions: torch.Tensor | None  # (seq, 3)
    source_args: tuple  # positional args of the source model
    source_kwargs: dict
    last_hidden_state: torch.Tensor  # (seq, D)
    pooler_output: torch.Tensor  # (1, D)


def source_path(set_name: str):
    entry = MANIFEST[set_name]
    return GOLDEN_DIR / (entry.get("checkpoint") or entry["dir"])


def architecture_config(set_name: str) -> LlavaViTPackingConfig | None:
    """The head count etc. a timm-source golden file cannot tell (None for HF folders)."""
    arch = MANIFEST[set_name].get("architecture")
    if arch is None:
        return None
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
    return LlavaViTPackingConfig(**{k: arch[k] for k in fields})


def load_cases(set_name: str, patch: int) -> list[GoldenCase]:
    cases = []
    for case in MANIFEST[set_name]["cases"]:
        d = load_file(str(GOLDEN_DIR / case["file"]))
        last = d.get("visible_embeddings", d.get("last_hidden_state"))[0]
        pooled = d.get("head_output", d.get("pooler_output"))
        if "pixel_values" in d:
            px = d["pixel_values"]
            h, w = px.shape[-2] // patch, px.shape[-1] // patch
            hs, grid, pos = patchify(px[0], patch), torch.tensor([[1, h, w]]), None
            src_args, src_kwargs = (px,), {}
        else:
            video = d["video"]
            t, hh, ww = video.shape[2:]
            h, w = hh // patch, ww // patch
            hs, grid = patchify(video[0], patch), torch.tensor([[t, h, w]])
            pos = compute_patch_positions_with_interpolated_temporal(d["interpolated_indices"], h, w)
            if "visible_indices" in d:  # timm source: the 64-frame context with the frames at their slots
                padded, visible = video_in_context(video, d["interpolated_indices"], patch)
                src_args, src_kwargs = (padded,), {"visible_indices": visible}
            else:  # HF twin: the real frames and their positions
                src_args, src_kwargs = (video,), {"patch_positions": d["patch_positions"]}
        cases.append(GoldenCase(set_name, case["id"], hs, grid, pos, src_args, src_kwargs, last, pooled))
    return cases


def pack(cases: list[GoldenCase]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All cases in one packed input, with explicit positions (raster for images)."""
    from llava_vit import compute_patch_positions_from_grid_thw

    positions = [c.patch_positions if c.patch_positions is not None else compute_patch_positions_from_grid_thw(c.grid_thw)
                 for c in cases]
    return torch.cat([c.hidden_states for c in cases]), torch.cat([c.grid_thw for c in cases]), torch.cat(positions)
