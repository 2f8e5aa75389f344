"""Images and videos in, packed model inputs out: the image processor, video I/O, packing helpers."""

from .image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    RESIZE_MODES,
    ImageInput,
    LlavaViTPackingImageProcessor,
    PackedSample,
    VideoInput,
    batch_images_to_packing_input,
    image_to_packing_input,
    load_image,
    patchify,
    smart_resize,
    split_packed,
    video_to_packing_input,
)
from .video import VIDEO_EXTENSIONS, VideoClip, is_video_file, read_video, sample_frame_indices

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "RESIZE_MODES",
    "ImageInput",
    "LlavaViTPackingImageProcessor",
    "PackedSample",
    "VideoInput",
    "batch_images_to_packing_input",
    "image_to_packing_input",
    "load_image",
    "patchify",
    "smart_resize",
    "split_packed",
    "video_to_packing_input",
    "VIDEO_EXTENSIONS",
    "VideoClip",
    "is_video_file",
    "read_video",
    "sample_frame_indices",
]
