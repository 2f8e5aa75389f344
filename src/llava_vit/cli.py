"""The ``llava-vit`` command: ``convert`` checkpoints and ``encode`` images and videos."""

from __future__ import annotations

import argparse
import sys

from .encoding.command import add_encode_arguments, run_encode


def add_conversion_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``llava-vit convert`` and the seed's ``model_factory/convert_llava_vit_packing_to_hf.py``."""
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights (default float32)")
    parser.add_argument("--device", default="cpu", help="device for verification (cpu or cuda)")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing the written model with the source")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-vit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a source checkpoint to the packed layout, and verify it")
    convert.add_argument("src", help="timm-source .pt/.pth/.bin/.safetensors file, or an HF LlavaViT/OneVision-Encoder folder")
    convert.add_argument("--output-dir", required=True, help="folder to write (config.json, model.safetensors, preprocessor_config.json)")
    arch = convert.add_mutually_exclusive_group()
    arch.add_argument("--model-name", help="source variant name (e.g. llava_vit_large_ln) giving the architecture")
    arch.add_argument("--config", help='JSON file of LlavaViTPackingConfig fields completing the tensor shapes, '
                                       'e.g. {"num_attention_heads": 16}')
    add_conversion_options(convert)

    encode = sub.add_parser("encode", help="encode images and videos into a feature store",
                            description="Encode images and videos into a feature store (see docs/ENCODING.md).")
    add_encode_arguments(encode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from .convert.command import run_convert

        return run_convert(args)
    return run_encode(args)


if __name__ == "__main__":
    sys.exit(main())
