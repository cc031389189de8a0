"""qwen2vl: a compact, fast, from-scratch PyTorch implementation of Qwen2-VL."""

from .config import Qwen2VLConfig
from .generation.chat import ChatSession
from .generation.engine import Engine, GenerationResult
from .generation.sampling import SamplingParams
from .model import KVCache, Qwen2VL, rope_index
from .processing import Batch, IncrementalDecoder, MediaError, Processor, Sample, Tokenizer, smart_resize

__version__ = "0.1.0"
__all__ = ["Batch", "ChatSession", "Engine", "GenerationResult", "IncrementalDecoder", "KVCache", "MediaError",
           "Processor", "Qwen2VL", "Qwen2VLConfig", "Sample", "SamplingParams", "Tokenizer", "rope_index",
           "smart_resize"]
