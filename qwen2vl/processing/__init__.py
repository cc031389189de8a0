"""Native-resolution preprocessing: conversations with images and videos -> model inputs."""

from .chat import apply_chat_template, render_chat
from .image import (
                    CLIP_MEAN,
                    CLIP_STD,
                    MAX_PIXELS,
                    MIN_PIXELS,
                    frames_to_patches,
                    image_to_patches,
                    load_image,
                    open_image,
                    resize_image,
                    smart_resize,
                    to_rgb,
)
from .processor import IGNORE_INDEX, Batch, MediaInfo, Processor, Sample
from .sources import MediaAccess, MediaError
from .tokenizer import IncrementalDecoder, Tokenizer
from .video import (
                    frame_indices,
                    frame_range,
                    qwen_vl_utils_resize,
                    resize_frames,
                    smart_nframes,
                    video_frame_size,
)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IGNORE_INDEX", "MAX_PIXELS", "MIN_PIXELS", "Batch", "IncrementalDecoder",
    "MediaAccess", "MediaError", "MediaInfo", "Processor", "Sample", "Tokenizer", "apply_chat_template",
    "frame_indices", "frame_range", "frames_to_patches", "image_to_patches", "load_image", "open_image",
    "qwen_vl_utils_resize", "render_chat", "resize_frames", "resize_image", "smart_nframes", "smart_resize",
    "to_rgb", "video_frame_size",
]
