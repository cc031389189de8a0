"""Vision features keyed by the content of each media item, so a repeated image is encoded once.

The key is a hash of the item's patch rows and grid: the same picture at the same resolution
gives the same key whatever its source (path, URL, bytes), and any change of pixels or size gives
a new key. Entries are dropped least-recently-used beyond ``max_items``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def item_key(pixels: torch.Tensor, grid: tuple[int, int, int]) -> str:
    digest = hashlib.blake2b(pixels.contiguous().cpu().numpy().tobytes(), digest_size=16)
    digest.update(repr(grid).encode())
    return digest.hexdigest()


class VisionCache:
    def __init__(self, max_items: int = 64):
        self.max_items = max_items
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, encoder, pixel_values: torch.Tensor | None, grid_thw: torch.Tensor | None,
               merge: int = 2) -> torch.Tensor | None:
        """Features of all items ``(sum t*h*w/merge^2, hidden)``, encoding only the items not cached.

        ``encoder(pixel_values, grid_thw)`` runs the vision tower on the missing items in one call.
        """
        if pixel_values is None:
            return None
        grids = [tuple(g) for g in grid_thw.tolist()]
        sizes = [t * h * w for t, h, w in grids]
        items = list(pixel_values.split(sizes))
        keys = [item_key(p, g) for p, g in zip(items, grids)] if self.max_items > 0 else [None] * len(items)
        missing = [i for i, k in enumerate(keys) if k is None or k not in self.entries]
        self.hits += len(items) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            feats = encoder(torch.cat([items[i] for i in missing]), grid_thw[missing])
            for i, f in zip(missing, feats.split([sizes[i] // merge**2 for i in missing])):
                fresh[i] = f
                if keys[i] is not None:
                    self.entries[keys[i]] = f
        out = []
        for i, k in enumerate(keys):
            if i in fresh:
                out.append(fresh[i])
            else:
                self.entries.move_to_end(k)
                out.append(self.entries[k])
        while len(self.entries) > self.max_items:
            self.entries.popitem(last=False)
        return torch.cat(out)
