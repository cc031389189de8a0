"""The training forward: packed batch -> summed (optionally weighted) cross-entropy over the supervised tokens.

Logits are computed only at supervised positions, in chunks that are recomputed in the backward
pass, so a 150k-word vocabulary never costs a float32 ``(T, vocab)`` tensor for a whole row.

The wrapper is the FSDP root: everything it calls (vision tower, embedding, decoder, lm_head)
runs inside its ``forward``, so sharded parameters are gathered when they are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.text import Segments
from .packing import IGNORE, PackedBatch


class LossModel(nn.Module):
    """``forward(batch, power) -> loss_sum`` (float32 scalar): the sum, not the mean, of token losses,
    each weighted ``n ** -power`` where n is the number of tokens of its answer (0: unweighted).

    ``lockstep`` (under FSDP) makes every process run the same collectives in the same order
    whatever its rows hold: the vision tower runs on every call (on a blank 1-item input joined to
    the loss with weight zero when the rows have no media), and the decoder input always requires
    grad, so every decoder layer's backward (and its reduce-scatter) runs right after its forward's
    mirror image, even when the embeddings are frozen and the rows hold no trainable vision features.
    """

    def __init__(self, net: nn.Module, lockstep: bool = False, chunk_tokens: int = 2048):
        super().__init__()
        self.net = net
        self.lockstep = lockstep
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: PackedBatch, power: float = 0.0) -> torch.Tensor:
        net = self.net
        image_embeds, video_embeds, zero = self._vision(batch)
        x = net.embed(batch.input_ids, image_embeds, video_embeds)  # (B, T, H)
        if self.lockstep and torch.is_grad_enabled() and not x.requires_grad:
            x.requires_grad_(True)
        mask = Segments.from_ids(batch.segment_ids)
        hidden = net.decode(x, batch.position_ids, mask)  # (B, T, H)
        weights = token_weights(batch.targets, batch.segment_ids, power)
        loss = supervised_loss_sum(hidden, batch.targets, net.lm_head, self.chunk_tokens, weights)
        return loss if zero is None else loss + zero

    def _vision(self, batch: PackedBatch):
        """Image and video features from one vision call (images first, then videos)."""
        net = self.net
        pixels = [p for p in (batch.pixel_values, batch.pixel_values_videos) if p is not None]
        grids = [g for g in (batch.image_grid_thw, batch.video_grid_thw) if g is not None]
        if not pixels:
            if not self.lockstep:
                return None, None, None
            m = net.config.vision.spatial_merge_size
            blank = torch.zeros(m * m, net.config.vision.patch_dim, device=batch.input_ids.device)
            grid = torch.tensor([[1, m, m]], device=batch.input_ids.device)
            return None, None, net.encode_vision(blank, grid).sum() * 0.0
        feats = net.encode_vision(torch.cat(pixels), torch.cat(grids))  # (N/4, H)
        merge = net.config.vision.spatial_merge_size
        n_image = 0 if batch.image_grid_thw is None else int(batch.image_grid_thw.prod(-1).sum()) // merge**2
        image = feats[:n_image] if batch.pixel_values is not None else None
        video = feats[n_image:] if batch.pixel_values_videos is not None else None
        return image, video, None


def token_weights(targets: torch.Tensor, segment_ids: torch.Tensor, power: float) -> torch.Tensor | None:
    """(B, T) weight of each supervised position: ``n ** -power``, n = the tokens of its answer.

    An answer is a run of supervised positions within one sample: a sample's reply, or each reply of
    a multi-turn sample. None for power 0 (every token weighs 1). With power 1 every answer's tokens
    sum to 1 (below: one sample of two answers, then a sample of one):

    >>> t = torch.tensor([[5, -100, 6, 7, -100, 7, 8, 9, -100]]); seg = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2, 0]])
    >>> token_weights(t, seg, 1.0)
    tensor([[1.0000, 0.0000, 0.5000, 0.5000, 0.0000, 0.3333, 0.3333, 0.3333, 0.0000]])
    """
    if power == 0:
        return None
    keep = targets != IGNORE  # (B, T)
    answer = answer_ids(keep, segment_ids)
    counts = torch.bincount(answer[keep], minlength=int(answer.max()) + 1).float()  # tokens per answer
    return torch.where(keep, counts[answer].clamp(min=1) ** -power, 0.0)


def answer_ids(keep: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) number (from 1) of the answer each supervised position belongs to: an answer is a run of
    supervised positions (``keep``) within one sample (``segment_ids``); 0 before the first answer."""
    continues = F.pad(keep[:, :-1] & (segment_ids[:, 1:] == segment_ids[:, :-1]), (1, 0), value=False)
    return torch.cumsum((keep & ~continues).flatten(), 0).view_as(keep)


def answer_lengths(labels: torch.Tensor) -> list[int]:
    """Tokens of each answer (run of supervised targets) of one sample's labels, unshifted (T,).

    >>> answer_lengths(torch.tensor([-100, 4, 5, -100, -100, 6]))
    [2, 1]
    """
    keep = (labels[1:] != IGNORE)[None]  # (1, T - 1)
    answer = answer_ids(keep, torch.zeros_like(keep, dtype=torch.long))
    return torch.bincount(answer[keep]).tolist()[1:]


def answer_weight_sum(answer_tokens: list[int], power: float) -> float:
    """The total weight of answers with these token counts (the trainer's loss denominator)."""
    return float(sum(n ** (1 - power) for n in answer_tokens if n > 0))


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()


def supervised_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, chunk: int,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of cross-entropy at positions whose target is not IGNORE, times ``weights`` if given;
    hidden (B, T, H), targets and weights (B, T)."""
    keep = targets != IGNORE
    h, y = hidden[keep], targets[keep]  # (N, H), (N,)
    w = None if weights is None else weights[keep]  # (N,)
    if y.numel() == 0:  # keep the graph (and FSDP's backward collectives) alive
        return hidden.sum().float() * 0.0
    recompute = torch.is_grad_enabled() and y.numel() > chunk
    total = None
    for start in range(0, y.numel(), chunk):
        part_w = None if w is None else w[start:start + chunk]
        args = (head, h[start:start + chunk], y[start:start + chunk], part_w)
        part = checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute else _chunk_loss(*args)
        total = part if total is None else total + part
    return total
