"""Qwen2VL: the vision tower (``visual``), the decoder (``model``) and ``lm_head``.

Module paths equal the checkpoint keys of the released models (``visual.blocks.0.attn.qkv.weight``,
``model.layers.0.self_attn.q_proj.bias``, ``lm_head.weight``), so loading needs no renaming.
The forward is pure: caches and rope deltas belong to the caller (the generation engine).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Qwen2VLConfig
from .kv_cache import KVCache
from .positions import rope_index
from .rope import mrope_cos_sin
from .text import Segments, TextModel
from .vision import VisionTransformer


class Qwen2VL(nn.Module):
    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = TextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # a quantized model's table may be int8 rows (qwen2vl.quant.linear.Int8Embedding): nothing to tie
        if self.config.text.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    # ------------------------------------------------------------------ pieces
    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Patches ``(N, 1176)`` -> merged vision tokens ``(N/4, hidden)`` in the decoder dtype."""
        return self.visual(pixel_values.to(self.visual.patch_embed.proj.weight.device), grid_thw).to(self.dtype)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              video_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``(B, T, H)`` with vision tokens written into their placeholder slots.

        Placeholders are filled in sequence order (row-major over the batch); their count must equal
        the number of feature rows.
        """
        x = self.model.embed_tokens(input_ids)
        for name, token, feats in (("image", self.config.image_token_id, image_embeds),
                                   ("video", self.config.video_token_id, video_embeds)):
            slots = input_ids == token
            count = int(slots.sum())
            rows = 0 if feats is None else feats.shape[0]
            if count != rows:
                raise ValueError(f"{name} placeholder tokens and {name} features do not match: "
                                 f"{count} <|{name}_pad|> tokens in input_ids, {rows} {name} feature rows")
            if rows:
                x = x.masked_scatter(slots.unsqueeze(-1), feats.to(x.dtype))
        return x

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        t = self.config.text
        return mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, dtype)

    def decode(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | Segments | None,
               cache: KVCache | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder hidden states ``(B, T, H)`` (after the final norm)."""
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        return self.model(inputs_embeds, cos, sin, mask, cache, slots)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` for whole sequences (no cache).

        ``attention_mask`` (B, T) marks real tokens (1) and left padding (0). For packed training
        pass ``segment_ids`` (B, T; 0 = padding, k > 0 = sample k) and per-sample ``position_ids``
        (3, B, T) instead. ``return_hidden`` gives the final hidden states instead of logits.
        """
        image_embeds = self.encode_vision(pixel_values, image_grid_thw) if pixel_values is not None else None
        video_embeds = (self.encode_vision(pixel_values_videos, video_grid_thw)
                        if pixel_values_videos is not None else None)
        x = self.embed(input_ids, image_embeds, video_embeds)
        if position_ids is None:
            position_ids, _ = rope_index(self.config, input_ids, image_grid_thw, video_grid_thw, attention_mask)
        if segment_ids is None and attention_mask is not None and not bool(attention_mask.all()):
            segment_ids = attention_mask.long()
        mask = Segments.from_ids(segment_ids) if segment_ids is not None else None
        hidden = self.decode(x, position_ids, mask)
        return hidden if return_hidden else self.lm_head(hidden)

    def fuse_projections(self) -> Qwen2VL:
        """Fuse each decoder layer's q/k/v and gate/up projections (inference; saving splits them back)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def quantize(self, scheme: str = "int4", group_size: int | None = None, sym: bool = True,
                 lm_head: bool = True, vision: bool = True) -> Qwen2VL:
        """Weight-only quantization in place: ``"int8"`` (one scale per output row unless ``group_size``)
        or ``"int4"`` (groups of ``group_size``, default 64, of 32/64/128/256), symmetric or with zero
        points. Fuses the projections first; quantizes the decoder's linears, ``lm_head`` and the
        vision tower's linears (``lm_head`` / ``vision`` False keep those in float)."""
        from ..quant.model import quantize_model
        return quantize_model(self, scheme, group_size, sym, lm_head, vision)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, progress: bool | None = None) -> Qwen2VL:
        """Load a Hugging Face checkpoint directory (or hub id); dtype defaults to config.json's."""
        from ..checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device, progress=progress)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json (flat layout) and safetensors with the released key layout."""
        from ..checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_config(cls, config: Qwen2VLConfig, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, seed: int | None = None) -> Qwen2VL:
        """A randomly initialised model (normal(0, initializer_range) weights, unit norms, zero biases)."""
        from ..checkpoint import random_init
        return random_init(cls, config, dtype=dtype, device=device, seed=seed)
