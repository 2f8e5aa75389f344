"""llava-vit: a packed LlavaViT / OneVision-Encoder vision encoder for images and videos of any size."""

from .model.configuration import LlavaViTConfig, LlavaViTPackingConfig, OneVisionEncoderConfig
from .model.modeling import LlavaViTPackingModel, LlavaViTPackingPreTrainedModel
from .reference import LlavaViT, LlavaViTModel, OneVisionEncoderModel
from .model.variants import VARIANTS, packing_config, source_config
from .model.positions import (
    compute_patch_positions_from_grid_thw,
    compute_patch_positions_with_interpolated_temporal,
    interpolate_frame_indices,
)
from .encoding.pipeline import EncodeError, EncodeSummary, encode_files
from .encoding.store import FeatureStore, StoreError
from .processing import (
    LlavaViTPackingImageProcessor,
    batch_images_to_packing_input,
    image_to_packing_input,
    split_packed,
    video_to_packing_input,
)

__version__ = "0.1.0"

__all__ = [
    "encode_files",
    "EncodeError",
    "EncodeSummary",
    "FeatureStore",
    "StoreError",
    "LlavaViTConfig",
    "LlavaViTPackingConfig",
    "LlavaViTPackingModel",
    "LlavaViTPackingPreTrainedModel",
    "LlavaViT",
    "LlavaViTModel",
    "OneVisionEncoderConfig",
    "OneVisionEncoderModel",
    "VARIANTS",
    "packing_config",
    "source_config",
    "compute_patch_positions_from_grid_thw",
    "compute_patch_positions_with_interpolated_temporal",
    "interpolate_frame_indices",
    "LlavaViTPackingImageProcessor",
    "batch_images_to_packing_input",
    "image_to_packing_input",
    "split_packed",
    "video_to_packing_input",
]
