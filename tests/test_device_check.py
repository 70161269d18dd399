"""benchmarks/device_check.sh runs (its --smoke mode: tiny sizes on CPU), so the GPU check is known to execute."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_smoke_runs():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), "--smoke"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for expected in ("users/s: HF generate", "identical top-4 lists: graph vs eager 6/6", "beam step (static)",
                     "GRPO:", "SFT (full fine-tune", "done in"):
        assert expected in out.stdout, (expected, out.stdout)
