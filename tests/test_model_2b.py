"""The full 2B shape with random bf16 weights: builds, saves, loads near one copy of the weights, runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "model_2b.py"


def test_2b_shape_loads_within_one_copy_and_runs(tmp_path):
    build = [sys.executable, "-c", "import torch; from qwen2vl import Qwen2VL; from qwen2vl.config import preset; "
             f"Qwen2VL.from_config(preset('qwen2-vl-2b'), dtype=torch.bfloat16, seed=0).save_pretrained({str(tmp_path)!r})"]
    subprocess.run(build, check=True)
    out = subprocess.run([sys.executable, str(SCRIPT), "--child", "--dir", str(tmp_path)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(result["weights_gb"] - 4.418) < 0.01
    assert result["logits_shape"] == [1, 25, 151936] and result["logits_finite"]
    assert result["peak_rss_after_forward_gb"] < 1.25 * result["weights_gb"]
