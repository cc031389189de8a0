"""qwen2vl: a compact, fast, from-scratch PyTorch implementation of Qwen2-VL."""

from .config import Qwen2VLConfig
from .model import KVCache, Qwen2VL, rope_index

__version__ = "0.1.0"
__all__ = ["KVCache", "Qwen2VL", "Qwen2VLConfig", "rope_index"]
