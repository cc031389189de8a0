"""Shared helpers for tests: tiny configs, prompts with vision placeholders, and the transformers oracle."""

from __future__ import annotations

import torch

VOCAB = 256
IMAGE, VIDEO, VSTART, VEND = 251, 252, 249, 250


def tiny_config(tied: bool = False, **text) -> dict:
    """A flat (hub layout) config.json dict for a tiny random Qwen2-VL."""
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": tied,
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_start_token_id": VSTART,
        "vision_end_token_id": VEND,
        "vision_token_id": 248,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
        "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 4, "hidden_size": 64,
                          "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }
    cfg.update(text)
    cfg["vision_config"]["hidden_size"] = cfg["hidden_size"]
    return cfg


def hf_model(cfg: dict, seed: int = 0, std: float = 0.02, dtype=torch.float32):
    """transformers 4.57.1 Qwen2VLForConditionalGeneration with seeded random weights."""
    from transformers import Qwen2VLConfig as HFConfig
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = HFConfig(**cfg)
    config._attn_implementation = "sdpa"
    model = Qwen2VLForConditionalGeneration(config).to(dtype).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            else:  # norm weights: near one
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def prompt(*parts, vocab: int = 240, seed: int = 0) -> list[int]:
    """Token ids from parts: an int n -> n random text tokens; ("image", t, h, w) / ("video", t, h, w)
    -> vision_start, t*h*w/4 pads, vision_end."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(2, vocab, (part,), generator=gen).tolist()
        else:
            kind, t, h, w = part
            ids += [VSTART] + [IMAGE if kind == "image" else VIDEO] * (t * h * w // 4) + [VEND]
    return ids


def pixels(grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 1176, generator=gen), torch.tensor(grids, dtype=torch.long)


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask
