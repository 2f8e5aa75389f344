"""``python -m llava_vit.demo`` (``make demo``): encode two photos and a short clip, write features and pictures.

Everything comes from installed packages, so it runs from a bare clone: matplotlib's sample
photos (``grace_hopper.jpg``, ``Minduka_Present_Blue_Pack.png``) and a zoom-and-pan clip the demo
renders from the first with PyAV, then decodes like any video. Without ``--model`` the encoder is
the small variant with seeded random weights, which the output labels as such.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from matplotlib import cbook
from PIL import Image

from .encoding.pipeline import encode_files

SAMPLE_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
VIDEO_CODECS = ("libx264", "h264", "mpeg4")
"""Encoders tried in order: H.264 when the installed PyAV has one, else MPEG-4 part 2."""


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 12) -> str:
    """Write ``(H, W, 3)`` uint8 RGB frames (even sides) as a video; returns the codec used."""
    codec = next((name for name in VIDEO_CODECS if _can_encode(name)), None)
    if codec is None:
        raise RuntimeError(f"the installed PyAV has none of the video encoders {VIDEO_CODECS}")
    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return codec


def _can_encode(codec: str) -> bool:
    try:
        av.Codec(codec, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


def zoom_pan_frames(image: Image.Image, num_frames: int = 24, size: tuple[int, int] = (320, 256)) -> list[np.ndarray]:
    """A camera move over ``image``: zoom from the whole picture into its upper middle while panning.

    ``size`` is the ``(width, height)`` of the frames.
    """
    width, height = size
    aspect = width / height
    full_w = min(image.width, image.height * aspect)
    frames = []
    for i in range(num_frames):
        s = i / max(num_frames - 1, 1)
        crop_w = full_w * (1 - 0.55 * s)
        crop_h = crop_w / aspect
        cx = image.width / 2 + (s - 0.5) * 0.2 * image.width * (1 - s)
        cy = image.height / 2 - 0.25 * image.height * s
        left = min(max(cx - crop_w / 2, 0), image.width - crop_w)
        top = min(max(cy - crop_h / 2, 0), image.height - crop_h)
        box = (left, top, left + crop_w, top + crop_h)
        frames.append(np.asarray(image.resize(size, Image.Resampling.BICUBIC, box=box)))
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_vit.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help="converted model folder, or a variant name (random weights)")
    parser.add_argument("--output", default="demo_output", help="output folder")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    output = Path(args.output)
    inputs, store = output / "inputs", output / "features"
    inputs.mkdir(parents=True, exist_ok=True)
    photos = [Path(cbook.get_sample_data(name, asfileobj=False)) for name in SAMPLE_PHOTOS]
    clip = inputs / "grace_hopper_zoom.mp4"
    with Image.open(photos[0]) as photo:
        codec = write_video(clip, zoom_pan_frames(photo.convert("RGB")))
    print(f"made {clip} (24 frames, {codec}) from {photos[0].name}")

    summary = encode_files([*photos, clip], model=args.model, output=store, save="all", visualize=True,
                           device=args.device, resume=store.exists())
    print(summary.line())
    print("pictures (each frame beside its patch features' first 3 principal components as RGB):")
    for picture in sorted((store / "pictures").glob("*.png")):
        print(f"  {picture}")
    print(f"features: the feature store {store}/; read it with llava_vit.FeatureStore({str(store)!r})")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
