"""``llava-vit encode``: a thin command over :func:`llava_vit.encode_files`.

Exit status: 0 every input encoded, 1 some inputs could not be read (listed in the store and on
stderr), 2 bad options, inputs or output (one line, nothing done), 130 interrupted (the store holds
the completed shards; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import sys

from ..processing import RESIZE_MODES
from ..processing.image_processing import VIDEO_SAMPLINGS
from .distributed import from_environment
from .pipeline import DEFAULT_SHARD_SIZE, EncodeError, encode_files, interrupt_on_sigterm
from .store import SAVE_DTYPES, SAVE_MODES, StoreError


def add_encode_arguments(encode: argparse.ArgumentParser) -> None:
    encode.add_argument("inputs", nargs="+", help="image/video files, folders (searched recursively) or glob patterns")
    encode.add_argument("--model", required=True,
                        help="converted model folder, or a variant name (small, base, large, ...: random weights)")
    encode.add_argument("--output", default="llava_vit_features",
                        help="feature store folder: new or empty, or an existing store with --resume "
                             "(default: %(default)s)")
    encode.add_argument("--resume", action="store_true",
                        help="add to an existing store only the inputs it lacks (same model, dtypes and processor "
                             "settings required)")
    encode.add_argument("--save", choices=SAVE_MODES, default="pooled",
                        help="what to store per input: its pooled vector (about 2 kB in bf16 at D=1024), its "
                             "patch features, or both (default: %(default)s)")
    encode.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), default=None,
                        help="dtype of the stored features (default: the model's dtype)")
    encode.add_argument("--shard-size", type=int, default=None,
                        help=f"inputs per shard file (default: {DEFAULT_SHARD_SIZE['pooled']} with --save pooled, "
                             f"else {DEFAULT_SHARD_SIZE['all']}; a shard also closes at 1 GiB of patch features)")
    encode.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    encode.add_argument("--dtype", choices=tuple(SAVE_DTYPES), default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    encode.add_argument("--max-tokens", type=int, default=16384,
                        help="tokens in one forward pass; a larger input is scaled down to fit, with a warning "
                             "(default: %(default)s)")
    encode.add_argument("--frames", type=int, default=None,
                        help="frames sampled uniformly from each video "
                             "(default: the model folder's preprocessor_config.json, else 8)")
    encode.add_argument("--video-sampling", choices=VIDEO_SAMPLINGS, default=None,
                        help="uniform: every patch of --frames frames; codec: the salient patches (motion vectors "
                             "and frame differences) of 64 frames, at most --patch-budget of them (see "
                             "docs/CODEC_SAMPLING.md) (default: the model folder's preprocessor_config.json, else uniform)")
    encode.add_argument("--patch-budget", type=int, default=None,
                        help="patches kept per video with --video-sampling codec, first frame included "
                             "(default: the model folder's preprocessor_config.json, else 4096)")
    encode.add_argument("--resize-mode", choices=RESIZE_MODES, default=None,
                        help="floor: each side floored to a patch multiple; fixed: every picture to --size; "
                             "budget: aspect kept, area brought into [--min-pixels, --max-pixels] "
                             "(default: the model folder's preprocessor_config.json, else floor)")
    encode.add_argument("--size", type=int, default=None, help="side of the square pictures with --resize-mode fixed")
    encode.add_argument("--min-pixels", type=int, default=None, help="smallest area with --resize-mode budget")
    encode.add_argument("--max-pixels", type=int, default=None, help="largest area with --resize-mode budget")
    encode.add_argument("--workers", type=int, default=None,
                        help="reader processes that decode and preprocess files (default: CPU cores - 2, at most 16; "
                             "0 reads in the main process)")
    encode.add_argument("--visualize", action="store_true",
                        help="also draw each input beside its patch features' first 3 principal components, "
                             "in OUTPUT/pictures/")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")


def run_encode(args: argparse.Namespace) -> int:
    """The ``encode`` subcommand; returns the exit status."""
    interrupt_on_sigterm()
    try:
        summary = encode_files(
            args.inputs, model=args.model, output=args.output, save=args.save, save_dtype=args.save_dtype,
            shard_size=args.shard_size, max_tokens=args.max_tokens, frames=args.frames,
            resize_mode=args.resize_mode, size=args.size, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
            video_sampling=args.video_sampling, patch_budget=args.patch_budget,
            resume=args.resume, visualize=args.visualize, device=args.device, dtype=args.dtype,
            workers=args.workers, progress=not args.quiet,
        )
    except (EncodeError, StoreError) as error:
        print(f"llava-vit encode: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llava-vit encode: interrupted before any input was encoded", file=sys.stderr)
        return 130
    ranks = from_environment()
    if ranks is not None and not ranks.leader:  # rank 0 prints the run's totals, and the failures of every rank
        return 130 if summary.interrupted else 0
    print(summary.line())
    if summary.interrupted:
        return 130
    if summary.failed:
        print(f"FAILED {len(summary.failed)}:", file=sys.stderr)
        for source, reason in summary.failed:
            print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0
