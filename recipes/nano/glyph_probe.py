"""Does the vision tower keep what a glyph looks like? A linear probe on its features, against a random tower.

    python recipes/nano/glyph_probe.py runs/nano-v2/state-model            # + the same tower at random init
    python recipes/nano/glyph_probe.py MODEL --train 1500 --test 400

Each item is one character (A-Z, 0-9, a-z: 62 classes, chance 1.6 %) on a sign filling the image, drawn
by the ``letters`` generator in the plain style. For every stage of the tower (the patch embedding,
each block, the merger: what the LLM sees) the features of an image are pooled over its patches (mean
and max, concatenated), standardised, and a linear classifier is fitted on ``--train`` items and
scored on ``--test`` others. A tower at random init is the baseline: its features are random
projections of the pixels, which keep much of a glyph's shape. A trained tower that scores below it
has made its pooled features more selective, for better or worse: whether a glyph's identity is gone
or only no longer linear after pooling, the probe cannot say; a tower that learns to read should
climb back above the baseline. Measured on the v2 run (docs/resolution-ablation.md, segment 4): from
55-67 % at random init to 12-40 % within 400 steps of a fresh run that opens on shapes, with or
without ``letters`` in the mix, and 14-18 % at steps 7900 and 10,100; a fresh run on ``letters`` alone
stays at 47-69 % (1,300 steps), yet reads no single letter: the probe is necessary, not sufficient.
"""

from __future__ import annotations

import argparse
import random
import string

import torch

from qwen2vl import Qwen2VL
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.data.synthetic import reading
from qwen2vl.data.synthetic.common import size_policy
from qwen2vl.processing.image import image_to_patches

ALPHABET = string.ascii_uppercase + string.digits + string.ascii_lowercase


def glyphs(n: int, seed: int) -> tuple[list, torch.Tensor]:
    """``n`` (image, class) items: one random character each, on a sign filling the image."""
    rng, policy = random.Random(seed), size_policy("per-task").for_task("letters")
    images, labels = [], []
    for _ in range(n):
        char = rng.choice(ALPHABET)
        images.append(reading.sign(rng, policy, False, reading.PLAIN, char).image)
        labels.append(ALPHABET.index(char))
    return images, torch.tensor(labels)


@torch.no_grad()
def stage_features(model: Qwen2VL, images: list, max_pixels: int) -> dict[str, torch.Tensor]:
    """{stage: (items, 2 * width)}: each stage's output pooled over an image's patches (mean, max)."""
    visual = model.visual
    stages = {"embed": visual.patch_embed, **{f"block{i}": b for i, b in enumerate(visual.blocks)},
              "merger": visual.merger}
    outputs, pooled = {}, {name: [] for name in stages}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, module in stages.items()]
    try:
        for image in images:
            patches, grid = image_to_patches(image, max_pixels=max_pixels)
            visual(patches, torch.tensor([grid]))
            for name in stages:
                pooled[name].append(torch.cat([outputs[name].mean(0), outputs[name].amax(0)]).float())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.stack(rows) for name, rows in pooled.items()}


def probe_accuracy(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                   steps: int = 400) -> float:
    """Test accuracy of a linear classifier (Adam, light weight decay) on standardised features."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train.shape[1], len(ALPHABET))
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(test).argmax(1) == test_y).float().mean().item()


def probe(model: Qwen2VL, n_train: int, n_test: int, max_pixels: int = 512 * 512) -> dict[str, float]:
    """{stage: test accuracy} of the glyph probe on ``model``'s vision tower."""
    train_images, train_y = glyphs(n_train, 0)
    test_images, test_y = glyphs(n_test, 1)
    model.eval()
    train = stage_features(model, train_images, max_pixels)
    test = stage_features(model, test_images, max_pixels)
    return {name: probe_accuracy(train[name], train_y, test[name], test_y) for name in train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="+", help="checkpoint directories")
    p.add_argument("--train", type=int, default=1500, help="items the classifier is fitted on")
    p.add_argument("--test", type=int, default=400, help="items it is scored on")
    p.add_argument("--no-random", action="store_true", help="skip the random-init baseline")
    args = p.parse_args(argv)
    rows = []
    for path in args.model:
        model = Qwen2VL.from_pretrained(path, dtype=torch.float32)
        rows.append((path, probe(model, args.train, args.test)))
    if not args.no_random:
        config = Qwen2VLConfig.from_pretrained(args.model[0])
        rows.append(("random init (seed 0)", probe(Qwen2VL.from_config(config, dtype=torch.float32, seed=0),
                                                   args.train, args.test)))
    stages = list(rows[0][1])
    print(f"glyph probe: {len(ALPHABET)} classes (chance {100 / len(ALPHABET):.1f} %), {args.train} train / "
          f"{args.test} test items; test accuracy % per stage")
    print(f"{'model':<40} " + " ".join(f"{s:>7}" for s in stages))
    for name, scores in rows:
        print(f"{name[-40:]:<40} " + " ".join(f"{100 * scores[s]:>7.1f}" for s in stages))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
