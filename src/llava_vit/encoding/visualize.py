"""``--visualize`` pictures: each frame beside the first three principal components of its patch features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_PANEL = 320
"""Longest side, in pixels, of each frame and feature map in the pictures."""
_PAIRS_PER_ROW = 2


def pca_colors(features: torch.Tensor) -> torch.Tensor:
    """``(n, 3)`` colours in ``[0, 1]``: the first three principal components of ``(n, D)`` features,
    each stretched between its 1st and 99th percentile."""
    x = features.double()
    x = x - x.mean(0)
    _, vectors = torch.linalg.eigh(x.T @ x)
    projected = x @ vectors[:, -3:].flip(-1)
    low, high = torch.quantile(projected, torch.tensor([0.01, 0.99], dtype=projected.dtype), dim=0)
    return ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1).float()


def feature_picture(frames: np.ndarray, features: torch.Tensor, grid_thw: Sequence[int], caption: str) -> Image.Image:
    """Each frame beside its patch features' first three principal components shown as RGB (PCA over
    all frames of the input together), ``_PAIRS_PER_ROW`` pairs a row, under a caption."""
    t, h, w = grid_thw
    colors = (pca_colors(features).reshape(t, h, w, 3) * 255).round().to(torch.uint8).numpy()
    height, width = frames.shape[1:3]
    scale = _PANEL / max(height, width)
    panel = (max(1, round(width * scale)), max(1, round(height * scale)))
    pairs = [
        (Image.fromarray(frame).resize(panel, Image.Resampling.BICUBIC),
         Image.fromarray(pca).resize(panel, Image.Resampling.NEAREST))
        for frame, pca in zip(frames, colors)
    ]
    font = ImageFont.load_default(13)
    text_box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), caption, font=font, spacing=2)
    gap, header = 4, text_box[3] + 8
    columns = min(len(pairs), _PAIRS_PER_ROW)
    rows = -(-len(pairs) // columns)
    pair_width = 2 * panel[0] + gap
    width = max(columns * (pair_width + 3 * gap) - 3 * gap, text_box[2] + 8)
    canvas = Image.new("RGB", (width, header + rows * (panel[1] + gap)), "white")
    for i, (frame, pca) in enumerate(pairs):
        x = (i % columns) * (pair_width + 3 * gap)
        y = header + (i // columns) * (panel[1] + gap)
        canvas.paste(frame, (x, y))
        canvas.paste(pca, (x + panel[0] + gap, y))
    ImageDraw.Draw(canvas).multiline_text((4, 3), caption, fill="black", font=font, spacing=2)
    return canvas
