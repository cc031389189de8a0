"""Replicated or sharded vision tower under tensor parallelism: what the replicated ViT costs a rank.

    python benchmarks/tp_vision.py                       # 72B at TP=8, one 448x448 image, float32
    python benchmarks/tp_vision.py --model qwen2-vl-72b --tp 2 --repeats 5

Times, in one process, one ViT block at its real width over the image's patches and one decoder
layer at one rank's width (1/N of the heads and MLP) over the image's merged tokens, alternating
the two; then scales by the depths (32 ViT blocks, the decoder's layers). A replicated ViT costs
every rank the whole tower; sharding it would save (1 - 1/N) of that and add two all-reduces per block.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from qwen2vl.config import preset
from qwen2vl.distributed import TensorParallelLayout
from qwen2vl.model.rope import mrope_cos_sin, vision_cos_sin, vision_rotary_ids
from qwen2vl.model.text import DecoderLayer
from qwen2vl.model.vision import FrameGroups, VisionBlock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2-vl-72b")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--image", type=int, default=448, help="square image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = preset(args.model)
    layout = TensorParallelLayout.for_config(config, 0, args.tp)
    text = dataclasses.replace(layout.rank_config(config).text, intermediate_size=config.text.intermediate_size // args.tp)
    side = args.image // 14
    grid = [(1, side, side)]
    patches, tokens = side * side, side * side // 4

    with torch.no_grad():
        block = VisionBlock(config.vision).eval()
        x = torch.randn(patches, config.vision.embed_dim)
        cos, sin = vision_cos_sin(vision_rotary_ids(grid, 2, x.device), config.vision.head_dim)
        cos, sin, groups = cos.unsqueeze(1), sin.unsqueeze(1), FrameGroups.from_grids(grid)
        layer = DecoderLayer(text, 0).eval()
        h = torch.randn(1, tokens, text.hidden_size)
        positions = torch.arange(tokens).view(1, 1, tokens).expand(3, 1, tokens)
        tcos, tsin = mrope_cos_sin(positions, text.head_dim, text.rope_theta, text.mrope_section, torch.float32)
        runs = {"vit_block": lambda: block(x, cos, sin, groups), "decoder_layer": lambda: layer(h, tcos, tsin, None)}
        times = {name: [] for name in runs}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    vit = statistics.median(times["vit_block"][1:]) * config.vision.depth
    decoder = statistics.median(times["decoder_layer"][1:]) * config.text.num_hidden_layers
    print(f"{args.model} TP={args.tp}, one {args.image}x{args.image} image ({patches} patches, {tokens} tokens), "
          f"{torch.get_num_threads()} threads, float32")
    print(f"  replicated ViT, whole tower per rank:   {vit:.2f} s")
    print(f"  decoder prefill of its tokens per rank: {decoder:.2f} s")
    print(f"  ViT share of a rank's prefill: {vit / (vit + decoder):.0%}; sharding it would save at most "
          f"{vit * (1 - 1 / args.tp) / (vit + decoder):.0%}")


if __name__ == "__main__":
    main()
