"""Source checkpoints to packed model folders: the conversion library and the ``convert`` command."""

from .checkpoint import ConversionError, convert_checkpoint

__all__ = ["ConversionError", "convert_checkpoint"]
