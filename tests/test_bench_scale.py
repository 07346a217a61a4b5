"""The scale benchmark runs on the CPU here at tiny sizes (issue 14: "runs on the CPU here (small
sizes)"; its GPU figures need a GPU). It prints every figure it promises, and its two methods of
evaluating every stitch agree on every prediction."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_bench_runs_on_the_cpu_and_prints_its_figures():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.bench_scale", "--small", "--device", "cpu", "--precisions", "fp32",
                          "--fit-images", "16", "--eval-images", "4", "--batch-size", "8", "--train-batch", "2",
                          "--train-steps", "1", "--threads", "1", "--decode-images", "32", "--workers", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "35 networks (3 anchors + 32 stitches)" in text
    for row in ("fit: time / forward passes alone", "fit: peak memory at 16 images, MiB",
                "eval all: speed-up of shared prefixes", "train step: overhead SN-Net / Sequential",
                "train step: overhead SN-Net / timm"):
        assert re.search(re.escape(row) + r"\s+[\d.]+x?\s*$", text, re.M), row
    assert re.search(r"eval all: predictions equal \(fraction\)\s+1\.0000", text)
    assert re.search(r"one process: \d+ images/s", text) and "bounds training here" in text
