"""Rotary position embeddings: the vision tower's 2-D (h, w) rotary and the decoder's M-RoPE.

Both rotate pairs (d, d + D/2) of each head ("rotate_half" pairing). Angles and cos/sin are
always computed in float32 from float32 inverse frequencies ``1 / theta ** (arange(0, D, 2) / D)``.
"""

from __future__ import annotations

import torch


def inverse_frequencies(dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / theta ** (2j / dim)`` for j in [0, dim/2), float32 (computing in float64 changes the last ulp)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a; b] -> [-b; a]`` on the two halves of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in the dtype of ``x`` (cos/sin must broadcast to ``x``)."""
    return x * cos + rotate_half(x) * sin


def vision_rotary_ids(grids: list[tuple[int, int, int]], merge: int, device=None) -> torch.Tensor:
    """(row, col) of every patch, in the processor's merge-window order; shape ``(N, 2)``.

    For one frame of ``h x w`` patches the rows run over 2x2 windows in raster order and, inside a
    window, over (0,0) (0,1) (1,0) (1,1). A 4x4 grid gives rows
    (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3) (2,0) (2,1) (3,0) (3,1) ...
    Every temporal group of an item repeats its frame's ids.
    """
    parts = []
    for t, h, w in grids:
        rows = torch.arange(h, device=device).view(h, 1).expand(h, w)
        cols = torch.arange(w, device=device).view(1, w).expand(h, w)
        ids = torch.stack((rows, cols), dim=-1)  # (h, w, 2)
        ids = ids.view(h // merge, merge, w // merge, merge, 2).permute(0, 2, 1, 3, 4).reshape(h * w, 2)
        parts.append(ids.repeat(t, 1))
    return torch.cat(parts)


def vision_cos_sin(rotary_ids: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos/sin ``(N, head_dim)`` float32 for 2-D rotary ids ``(N, 2)``.

    The first quarter of the head rotates with the row, the second with the column:
    angles = [row * f, col * f] with f the ``head_dim/2``-dim inverse frequencies, duplicated.
    """
    inv = inverse_frequencies(head_dim // 2, theta, rotary_ids.device)  # (head_dim/4,)
    angles = (rotary_ids.to(torch.float32).unsqueeze(-1) * inv).flatten(1)  # (N, head_dim/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def mrope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, mrope_section: list[int],
                  dtype: torch.dtype):
    """M-RoPE cos/sin ``(B, T, head_dim)`` in ``dtype`` for 3-D positions ``(3, B, T)``.

    Frequency j uses the temporal position for j < s0, the height position for s0 <= j < s0+s1 and
    the width position after that (``mrope_section = [s0, s1, s2]``, summing to head_dim/2).
    For text tokens all three positions are equal and this is plain 1-D RoPE.
    """
    inv = inverse_frequencies(head_dim, theta, position_ids.device)  # (head_dim/2,)
    j = torch.arange(head_dim // 2, device=position_ids.device)  # built on the device: no host copy
    component = (j >= mrope_section[0]).long() + (j >= mrope_section[0] + mrope_section[1]).long()
    # pick, for every frequency j, the position component it rotates with: (B, T, head_dim/2)
    positions = position_ids.permute(1, 2, 0)[..., component].to(torch.float32)
    angles = positions * inv
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
