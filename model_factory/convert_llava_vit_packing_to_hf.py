"""The seed's conversion script path, kept runnable verbatim; the work is ``llava-vit convert``.

    python model_factory/convert_llava_vit_packing_to_hf.py MODEL_NAME CKPT \\
        [--target_model_name NAME] [--output_dir DIR]

``MODEL_NAME`` is the source variant (``llava_vit_large_ln``); the target defaults to
``hf_llava_vit_packing_<size>_ln`` and the output to ``<CKPT stem>_hf_packing`` beside the
checkpoint. The written folder is verified against the source model (see
:mod:`llava_vit.convert.verify`). The original product document's examples also import the
video position helpers from here, so they are re-exported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_vit import compute_patch_positions_with_interpolated_temporal, interpolate_frame_indices
from llava_vit.cli import add_conversion_options
from llava_vit.convert.command import convert_to_folder
from llava_vit.model.variants import PACKING_MODEL_NAMES, SOURCE_MODEL_NAMES

__all__ = ["compute_patch_positions_with_interpolated_temporal", "interpolate_frame_indices", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a LlavaViT source checkpoint to the packed HF layout.")
    parser.add_argument("model_name", choices=sorted(SOURCE_MODEL_NAMES), help="source variant of the checkpoint")
    parser.add_argument("checkpoint", help="timm-source .pt/.pth/.bin/.safetensors file, or an HF LlavaViT folder")
    parser.add_argument("--target_model_name", choices=sorted(PACKING_MODEL_NAMES),
                        help="packed variant (default: hf_llava_vit_packing_<size>_ln of MODEL_NAME)")
    parser.add_argument("--output_dir", help="output folder (default: <checkpoint stem>_hf_packing beside it)")
    add_conversion_options(parser)
    args = parser.parse_args(argv)

    size = SOURCE_MODEL_NAMES[args.model_name][0]
    target = args.target_model_name or f"hf_llava_vit_packing_{size}_ln"
    if PACKING_MODEL_NAMES[target] != size:
        parser.error(f"--target_model_name {target} is the {PACKING_MODEL_NAMES[target]} variant, "
                     f"but {args.model_name} is {size}")
    checkpoint = Path(args.checkpoint)
    output_dir = args.output_dir or checkpoint.with_name(f"{checkpoint.stem}_hf_packing")
    return convert_to_folder(
        checkpoint,
        output_dir,
        model_name=args.model_name,
        dtype=args.dtype,
        device=args.device,
        verify=not args.no_verify,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
