"""Which part of each weight a tensor-parallel rank holds, and the head-count rules.

For ``N`` ranks, rank ``r`` holds (``D`` = head_dim, ``I`` = intermediate_size, ``V`` = vocab_size):

* query heads ``[r*H/N, (r+1)*H/N)``: rows of ``q_proj`` (weight and bias), columns of ``o_proj``;
* KV heads: with ``K >= N`` heads, ``[r*K/N, (r+1)*K/N)``; with ``K < N`` each KV head is
  replicated on ``N/K`` consecutive ranks and rank ``r`` holds head ``r // (N/K)`` (the one its
  query heads attend with), as if the checkpoint had every KV head repeated ``N/K`` times;
* ``[r*I/N, (r+1)*I/N)`` of the MLP: rows of ``gate_proj`` and ``up_proj``, columns of ``down_proj``;
* ``[r*V/N, (r+1)*V/N)`` of the vocabulary: rows of ``embed_tokens`` and ``lm_head``;
* of each ViT block, the same way: its heads (rows of each third of ``attn.qkv``, columns of
  ``attn.proj``) and ``[r*M/N, (r+1)*M/N)`` of its MLP (rows of ``fc1``, columns of ``fc2``);
* everything else whole: the norms, the patch embedding and the merger.

Rules (refused with the numbers named otherwise): ``N <= H`` and ``H % N == 0``; ``K % N == 0`` or
``N % K == 0``; ``I % N == 0``; ``V % N == 0``; the ViT's 16 heads and 5120 MLP columns divisible by ``N``. Released models: 2B (H=12, K=2) runs on 1, 2 or 4
ranks; 7B (H=28, K=4) on 1, 2 or 4; 72B (H=64, K=8) on 1, 2, 4 or 8.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass

import torch

from ..config import Qwen2VLConfig, TextConfig

# parameter name -> (what it is split by, dimension); names are the released checkpoint keys
_SPLITS = [
    (re.compile(r"model\.layers\.\d+\.self_attn\.q_proj\.(weight|bias)"), "q", 0),
    (re.compile(r"model\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)"), "kv", 0),
    (re.compile(r"model\.layers\.\d+\.self_attn\.o_proj\.weight"), "q", 1),
    (re.compile(r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight"), "mlp", 0),
    (re.compile(r"model\.layers\.\d+\.mlp\.down_proj\.weight"), "mlp", 1),
    (re.compile(r"(model\.embed_tokens|lm_head)\.weight"), "vocab", 0),
    (re.compile(r"visual\.blocks\.\d+\.attn\.qkv\.(weight|bias)"), "vision_qkv", 0),
    (re.compile(r"visual\.blocks\.\d+\.attn\.proj\.weight"), "vision_heads", 1),
    (re.compile(r"visual\.blocks\.\d+\.mlp\.fc1\.(weight|bias)"), "vision_mlp", 0),
    (re.compile(r"visual\.blocks\.\d+\.mlp\.fc2\.weight"), "vision_mlp", 1),
]


@dataclass(frozen=True)
class TensorParallelLayout:
    """The slices of rank ``rank`` out of ``world``; build with :meth:`for_config` (which checks the rules)."""

    rank: int
    world: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    vision_heads: int
    vision_head_dim: int
    vision_mlp: int

    @classmethod
    def for_config(cls, config: Qwen2VLConfig, rank: int, world: int) -> TensorParallelLayout:
        text, vision = config.text, config.vision
        h, k, n = text.num_attention_heads, text.num_key_value_heads, world
        vision_mlp = int(vision.embed_dim * vision.mlp_ratio)
        problems = []
        if n < 1 or not 0 <= rank < n:
            raise ValueError(f"rank {rank} of world size {n} is invalid")
        if n > h:
            problems.append(f"tensor-parallel size {n} is larger than the {h} attention heads")
        elif h % n:
            problems.append(f"{h} attention heads do not divide among {n} ranks")
        elif k % n and n % k:
            problems.append(f"{k} KV heads can neither be split among {n} ranks ({k} % {n} != 0) nor "
                            f"replicated evenly on them ({n} % {k} != 0)")
        for what, size in (("intermediate_size", text.intermediate_size), ("vocab_size", text.vocab_size),
                           ("vision num_heads", vision.num_heads), ("vision MLP width", vision_mlp)):
            if size % n:
                problems.append(f"{what} {size} is not divisible by the tensor-parallel size {n}")
        if problems:
            raise ValueError("cannot shard this model: " + "; ".join(problems))
        return cls(rank, n, h, k, text.head_dim, text.intermediate_size, text.vocab_size, vision.num_heads,
                   vision.head_dim, vision_mlp)

    @property
    def local_heads(self) -> int:
        return self.heads // self.world

    @property
    def local_kv_heads(self) -> int:
        return max(self.kv_heads // self.world, 1)

    def _range(self, kind: str) -> tuple[int, int]:
        r, n, d = self.rank, self.world, self.head_dim
        if kind in ("vision_heads", "vision_qkv"):  # qkv: the same rows of each of its q, k and v thirds
            width = self.vision_heads * self.vision_head_dim // n
            return r * width, (r + 1) * width
        if kind == "q":
            return r * self.local_heads * d, (r + 1) * self.local_heads * d
        if kind == "kv":
            first = r * self.kv_heads // n if self.kv_heads >= n else r // (n // self.kv_heads)
            return first * d, (first + self.local_kv_heads) * d
        size = {"mlp": self.intermediate, "vocab": self.vocab, "vision_mlp": self.vision_mlp}[kind]
        return r * size // n, (r + 1) * size // n

    def split(self, name: str) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of parameter ``name`` held by this rank; None if it is held whole.

        For a vision ``qkv`` the range is within each third (q, k, v): the rank holds three runs of rows.
        """
        for pattern, kind, dim in _SPLITS:
            if pattern.fullmatch(name):
                return (dim, *self._range(kind))
        return None

    def _thirds(self, name: str) -> bool:
        return name.startswith("visual.") and ".attn.qkv." in name

    # the hook of checkpoint.load_pretrained: the local shape, and the read of a safetensors slice
    def shape(self, name: str, full: tuple[int, ...]) -> tuple[int, ...]:
        split = self.split(name)
        if split is None:
            return full
        dim, start, stop = split
        rows = 3 * (stop - start) if self._thirds(name) else stop - start
        return full[:dim] + (rows,) + full[dim + 1:]

    def read(self, name: str, part) -> torch.Tensor:
        """This rank's part of ``name`` from a lazy ``safe_open(...).get_slice(key)``, copied out.

        Only the slice's bytes are read (for a column slice, the pages its rows touch). A slice is
        a view of the file's memory map; the copy lets the map go when the file is closed, so a rank
        holds its own slices only (a view would keep every page it ever touched mapped).
        """
        split = self.split(name)
        if split is None:
            return part[:].clone()
        dim, start, stop = split
        if self._thirds(name):
            third = part.get_shape()[0] // 3
            return torch.cat([part[i * third + start:i * third + stop] for i in range(3)])
        return (part[start:stop] if dim == 0 else part[:, start:stop]).clone(memory_format=torch.contiguous_format)

    def rank_config(self, config: Qwen2VLConfig) -> Qwen2VLConfig:
        """``config`` as this rank's modules see it: its own query and KV head counts (the KV cache
        is allocated from them), the whole model's head_dim."""
        text = RankTextConfig(**{f.name: getattr(config.text, f.name) for f in dataclasses.fields(TextConfig)},
                              full_attention_heads=self.heads)
        text.num_attention_heads, text.num_key_value_heads = self.local_heads, self.local_kv_heads
        local = copy.copy(config)
        local.text = text
        return local


@dataclass
class RankTextConfig(TextConfig):
    """The text config of one tensor-parallel rank: local head counts, head_dim of the whole model."""

    full_attention_heads: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.full_attention_heads
