"""Packing: several encoded samples per sequence, each with its own 3-D positions and attention.

A packed row concatenates whole samples (never cutting one, so never cutting a vision span).
Per token it carries ``segment_ids`` (k for the k-th sample, 0 for padding: the decoder attends
causally within a segment only), ``position_ids`` from ``rope_index`` of each sample alone, and
``targets``: the label of the *next* token of the same sample, so no sample predicts its neighbour.

Example: samples of 5 and 3 tokens in a row of 10 give segment_ids ``1 1 1 1 1 2 2 2 0 0`` and
text positions ``0 1 2 3 4 0 1 2 0 0``.

The vision tower attends within each frame group only, so the samples' pixel rows and grids are
concatenated in token order (row by row) and encoded in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.positions import rope_index

IGNORE = -100


def pack_in_order(lengths: list[int], order: list[int], seq_len: int) -> list[list[int]]:
    """Greedy packing of samples taken in ``order``: a row is closed when the next sample does not fit.

    >>> pack_in_order([5, 3, 4, 2], [0, 1, 2, 3], seq_len=8)
    [[0, 1], [2, 3]]
    """
    rows: list[list[int]] = []
    used = seq_len + 1
    for index in order:
        n = lengths[index]
        if n > seq_len:
            raise ValueError(f"sample {index} has {n} tokens, more than seq_len {seq_len}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += n
    return rows


class PackedStream:
    """An endless sequence of packed rows: epoch after epoch, each shuffled with ``(seed, epoch)``.

    Row ``g`` of the stream is a pure function of (lengths, seq_len, seed, g), so a run resumed at
    step s reads exactly the rows an uninterrupted run would, whatever the number of processes.
    """

    def __init__(self, lengths: list[int], seq_len: int, seed: int, shuffle: bool = True):
        if not lengths:
            raise ValueError("no usable samples to pack")
        self.lengths, self.seq_len, self.seed, self.shuffle = lengths, seq_len, seed, shuffle
        self._epochs: list[list[list[int]]] = []

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            n = len(self.lengths)
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
                order = torch.randperm(n, generator=gen).tolist()
            else:
                order = list(range(n))
            self._epochs.append(pack_in_order(self.lengths, order, self.seq_len))
        return self._epochs[e]

    def rows(self, start: int, count: int) -> list[tuple[int, list[int]]]:
        """Rows ``start .. start + count - 1`` of the stream as ``(epoch, sample indices)``."""
        out: list[tuple[int, list[int]]] = []
        epoch, first = 0, 0  # first: stream index of the epoch's first row
        while len(out) < count:
            rows = self.epoch(epoch)
            g = start + len(out)
            if g < first + len(rows):
                out += [(epoch, row) for row in rows[g - first:g - first + count - len(out)]]
            first += len(rows)
            epoch += 1
        return out


@dataclass
class PackedBatch:
    """B packed rows padded on the right to T tokens; vision inputs in token order."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token labels, IGNORE where nothing is learnt
    segment_ids: torch.Tensor  # (B, T) 0 = padding, k = k-th sample of the row
    position_ids: torch.Tensor  # (3, B, T)
    pixel_values: torch.Tensor | None  # (N_img, patch_dim)
    image_grid_thw: torch.Tensor | None  # (n_img, 3)
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def supervised(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return PackedBatch(**moved)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned to the token that predicts them: ``targets[t] = labels[t + 1]``, last = IGNORE."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE)])


def collate(rows: list[list], config, pad_id: int = 0) -> PackedBatch:
    """Packed rows of samples (objects with ``input_ids``, ``labels``, ``pixel_values``,
    ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``) -> one :class:`PackedBatch`."""
    width = max(sum(int(s.input_ids.numel()) for s in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), IGNORE, dtype=torch.long)
    segments = torch.zeros((b, width), dtype=torch.long)
    positions = torch.zeros((3, b, width), dtype=torch.long)
    vision: dict[str, list[torch.Tensor]] = {k: [] for k in ("pv", "ig", "pvv", "vg")}
    for r, row in enumerate(rows):
        cursor = 0
        for k, sample in enumerate(row, start=1):
            n = int(sample.input_ids.numel())
            span = slice(cursor, cursor + n)
            ids[r, span] = sample.input_ids
            targets[r, span] = shifted_targets(sample.labels)
            segments[r, span] = k
            pos, _ = rope_index(config, sample.input_ids[None], sample.image_grid_thw, sample.video_grid_thw)
            positions[:, r, span] = pos[:, 0]
            for key, attr in (("pv", "pixel_values"), ("ig", "image_grid_thw"),
                              ("pvv", "pixel_values_videos"), ("vg", "video_grid_thw")):
                value = getattr(sample, attr)
                if value is not None:
                    vision[key].append(value)
            cursor += n

    def cat(key):
        return torch.cat(vision[key]) if vision[key] else None

    return PackedBatch(ids, targets, segments, positions, cat("pv"), cat("ig"), cat("pvv"), cat("vg"))
