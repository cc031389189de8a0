"""Tensor-parallel inference over torch.distributed (DTensor) under torchrun; docs/distributed.md.

``layout`` (which slice each rank holds, the head-count rules), ``parallel`` (slices -> DTensors and
PyTorch's parallel styles), ``launch`` (process group, sharded loading); ``Engine.from_pretrained(...,
tensor_parallel=N)`` builds an engine over this rank's shard.
"""

from .follow import Leader, follow
from .launch import (
                     close,
                     init_tensor_parallel,
                     is_main_process,
                     load_tensor_parallel,
                     shared_seed,
)
from .layout import TensorParallelLayout
from .parallel import parallelize

__all__ = ["Leader", "TensorParallelLayout", "close", "follow", "init_tensor_parallel", "is_main_process", "load_tensor_parallel",
           "parallelize", "shared_seed"]
