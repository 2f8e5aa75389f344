"""Preprocessing throughput of the bundled media, against the original implementation's torchvision recipe.

    python scripts/preprocessing_speed.py [MEDIA_DIR] [--patch-size 16] [--repeats 20]

MEDIA_DIR defaults to ``../shared/media`` beside the repository (or ``$LLAVA_VIT_SHARED/media``).
Prints per-item time and items/s (best and median of the repeats) of: the whole image path from the
file, the same from an already decoded PIL image, the original recipe on that image, the two photos
through the encode pipeline's reader processes, square JPEGs cut from the first photo (the sizes of
the GPU benchmark's workloads, to set against the model's images/s there), and the 8-frame video
path from each clip file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image

from llava_vit.encoding.pipeline import read_samples
from llava_vit.processing import CLIP_MEAN, CLIP_STD, LlavaViTPackingImageProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MEDIA = Path(os.environ.get("LLAVA_VIT_SHARED", REPO_ROOT.parent / "shared")) / "media"


def original_recipe(image: Image.Image, patch_size: int) -> torch.Tensor:
    """The original implementation's ``image_to_packing_input``: PIL bicubic floor resize,
    ``ToTensor`` + ``Normalize``, ``(h, w, C, p, p)`` patches (reference timing)."""
    w, h = image.size
    new_h, new_w = h // patch_size * patch_size, w // patch_size * patch_size
    x = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])(image.resize((new_w, new_h)))
    hp, wp = new_h // patch_size, new_w // patch_size
    return x.view(3, hp, patch_size, wp, patch_size).permute(1, 3, 0, 2, 4).contiguous().view(hp * wp, -1)


def timings(cases: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """``{name: (best, median)}`` seconds per call; the cases run interleaved, so a busy neighbour on
    the machine slows them alike, and the best of ``repeats`` shows the cost without interference."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def report(results: dict[str, tuple[float, float]], items: int = 1, unit: str = "images") -> None:
    for label, (best, median) in results.items():
        print(f"{label:<62} best {best / items * 1e3:7.1f} ms {items / best:7.1f} {unit}/s"
              f"   median {median / items * 1e3:7.1f} ms {items / median:7.1f} {unit}/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("media", nargs="?", type=Path, default=DEFAULT_MEDIA)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--squares", type=int, nargs="*", default=[224, 448], help="sides of the square JPEGs")
    args = parser.parse_args()
    processor = LlavaViTPackingImageProcessor(patch_size=args.patch_size)
    photos = sorted(args.media.glob("photo_*"))
    clips = sorted(args.media.glob("clip_*.mp4"))
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, patch size {args.patch_size}")
    for path in photos:
        with Image.open(path) as opened:
            rgb = opened.convert("RGB")
        report(timings({
            f"{path.name}: from file": lambda: processor.preprocess_image(path),
            f"{path.name}: from decoded PIL": lambda: processor.preprocess_image(rgb),
            f"{path.name}: original recipe from decoded PIL": lambda: original_recipe(rgb, args.patch_size),
        }, args.repeats))
    workers = min(16, max(1, (os.cpu_count() or 2) - 2))

    def read_files(paths: list[Path]) -> None:
        """Through the encode pipeline's reader processes."""
        for _, _, error in read_samples(paths, processor, None, workers):
            assert error is None, error

    batch = photos * 10
    label = f"both photos x10 from files, {workers} reader processes"
    report(timings({label: lambda: read_files(batch)}, 5), len(batch))
    with tempfile.TemporaryDirectory() as folder, Image.open(photos[0]) as photo:
        for side in args.squares:
            squares = []
            for i in range(20):  # different crops, so no decoder cache helps
                left = i * (photo.width - photo.height) // 20
                square = photo.crop((left, 0, left + photo.height, photo.height)).resize((side, side))
                squares.append(Path(folder) / f"{side}_{i}.jpg")
                square.save(squares[-1], quality=90)
            label = f"{side}x{side} JPEGs from files, {workers} reader processes"
            report(timings({label: lambda: read_files(squares)}, 5), len(squares))
    report(timings({f"{path.name}: 8 frames from file": lambda path=path: processor.preprocess_video(path, 8)
                    for path in clips}, args.repeats), unit="videos")


if __name__ == "__main__":
    main()
