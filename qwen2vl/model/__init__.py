from .kv_cache import KVCache
from .positions import rope_index
from .qwen2vl import Qwen2VL

__all__ = ["KVCache", "Qwen2VL", "rope_index"]
