"""3-D M-RoPE positions (temporal, height, width) for a prompt, and the per-row decode delta.

Walk each row's real tokens (``attention_mask == 1``), keeping ``next = max position so far + 1``:

* a text span of n tokens gets ``next + arange(n)`` on all three axes;
* a vision item with grid ``(t, h, w)`` (``lh = h/2``, ``lw = w/2`` merged tokens per frame group)
  gets ``(next + g, next + i, next + j)`` for its tokens in raster order (g, i, j), so the span
  advances ``next`` by ``max(t, lh, lw)``, not by its ``t*lh*lw`` tokens.

Example: 15 text tokens (positions 0-14), then an image of grid (1, 4, 6) (2 x 3 merged tokens):
t = 15 15 15 15 15 15, h = 15 15 15 16 16 16, w = 15 16 17 15 16 17; the next token is at 18.

``delta[b] = max position + 1 - padded row length``: a token in cache slot s (counting left
padding) decodes at rope position ``s + delta[b]``.
"""

from __future__ import annotations

import torch


def _vision_positions(t: int, lh: int, lw: int, start: int) -> torch.Tensor:
    """(3, t*lh*lw) positions of one vision item whose first position is ``start``."""
    g = torch.arange(t).view(t, 1, 1).expand(t, lh, lw)
    i = torch.arange(lh).view(1, lh, 1).expand(t, lh, lw)
    j = torch.arange(lw).view(1, 1, lw).expand(t, lh, lw)
    return torch.stack((g, i, j)).reshape(3, -1) + start


def _row_positions(ids: list[int], config, image_grids: list, video_grids: list) -> torch.Tensor:
    """Positions (3, len(ids)) of one row's real tokens; consumes grids from the given lists."""
    merge = config.vision.spatial_merge_size
    image_id, video_id = config.image_token_id, config.video_token_id
    blocks, cursor, next_pos = [], 0, 0
    while True:
        # the next vision item starts at the next image or video placeholder
        starts = [ids.index(tok, cursor) for tok, grids in ((image_id, image_grids), (video_id, video_grids))
                  if grids and tok in ids[cursor:]]
        if not starts:
            break
        start = min(starts)
        grids = image_grids if ids[start] == image_id else video_grids
        t, h, w = grids.pop(0)
        text_len = start - cursor
        blocks.append(torch.arange(text_len).expand(3, text_len) + next_pos)
        next_pos += text_len
        lh, lw = h // merge, w // merge
        blocks.append(_vision_positions(t, lh, lw, next_pos))
        next_pos += max(t, lh, lw)
        cursor = start + t * lh * lw
    tail = len(ids) - cursor
    blocks.append(torch.arange(tail).expand(3, tail) + next_pos)
    return torch.cat(blocks, dim=1)


def rope_index(config, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
               video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
    """3-D positions ``(3, B, T)`` and rope deltas ``(B,)`` for (left-padded) prompts.

    Grids are consumed in order of appearance across the batch, row by row. Padded slots get
    position 1 (their value never matters).
    """
    b, t = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.bool()
    if image_grid_thw is None and video_grid_thw is None:
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        positions = pos.unsqueeze(0).expand(3, b, t).clone()
        deltas = pos.max(dim=-1).values + 1 - t
        return positions, deltas
    image_grids = [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    video_grids = [tuple(g) for g in video_grid_thw.tolist()] if video_grid_thw is not None else []
    positions = torch.ones(3, b, t, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    mask_cpu = mask.cpu()
    for row, ids in enumerate(input_ids.cpu()):
        real = ids[mask_cpu[row]].tolist()
        pos = _row_positions(real, config, image_grids, video_grids)
        positions[:, row, mask_cpu[row]] = pos
        deltas[row] = pos.max() + 1 - t
    if image_grids or video_grids:
        raise ValueError(f"{len(image_grids)} image grid(s) and {len(video_grids)} video grid(s) were not "
                         "used: there are fewer placeholders in input_ids than items")
    return positions.to(device), deltas.to(device)
