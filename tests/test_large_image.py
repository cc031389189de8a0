"""A 4096x4096 image (max_pixels raised) encodes with attention memory linear in its patch count.

Its 85,264 patches form one frame group; an N x N attention matrix would take 29 GB in float32
per head, more than this machine has. The encode runs in a subprocess whose peak resident memory
is checked.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from oracle import tiny_config
    from qwen2vl import Qwen2VL, Qwen2VLConfig
    from qwen2vl.processing import image_to_patches
    torch.set_num_threads(2)
    model = Qwen2VL.from_config(Qwen2VLConfig.from_dict(tiny_config()), seed=0)
    image = np.random.default_rng(0).integers(0, 256, (4096, 4096, 3), dtype=np.uint8)
    pixels, grid = image_to_patches(image, max_pixels=4096 * 4096)
    with torch.inference_mode():
        features = model.encode_vision(pixels, torch.tensor([grid]))
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({{"grid": list(grid), "features": list(features.shape), "peak": peak,
                      "finite": bool(torch.isfinite(features).all())}}))
""")


def test_4096_square_image_encodes_in_linear_memory():
    code = SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grid"] == [1, 292, 292] and result["features"] == [292 * 292 // 4, 64] and result["finite"]
    assert result["peak"] < 6e9, f"peak resident memory {result['peak'] / 1e9:.1f} GB"
