"""`evaluate_samples` on 2 processes (torchrun, gloo, CPU) gives the records and metrics of 1 process.

A tiny checkpoint and a 24-row split are written to tmp_path; a driver script (also written there) is
run once as a single process and once with `torchrun --nproc_per_node 2`.  With 2, accelerate's PartialState sees
a 2-process MULTI_CPU group, each rank decodes its half of the rows and the records are gathered.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_SIBLING = Path(sys.executable).with_name("torchrun")
TORCHRUN = shutil.which("torchrun") or (str(_SIBLING) if _SIBLING.exists() else None)

DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import torch
    from accelerate import PartialState

    from latentr3.config import EvalConfig
    from latentr3.data.splits import read_catalogue, read_split
    from latentr3.evaluation.evaluate import builder_for_checkpoint, evaluate_samples
    from latentr3.model.latent_lm import LatentR3Model

    torch.set_num_threads(1)
    ckpt, data, out = map(Path, sys.argv[1:4])
    model, tok, meta = LatentR3Model.from_pretrained(ckpt)
    builder = builder_for_checkpoint(tok, meta, model.num_latent)
    catalogue = read_catalogue(data / "info.txt")
    samples = read_split(data / "train.csv", catalogue)
    cfg = EvalConfig(batch_size=4, num_beams=5, top_k=5, ks=[1, 3, 5])
    result = evaluate_samples(model, tok, builder, samples, catalogue, cfg)
    state = PartialState()  # after: evaluate_samples must be the one that sets the shared state up
    info = {"num_processes": state.num_processes, "distributed_type": str(state.distributed_type),
            "rows": len(samples), "records": result.records, "metrics": result.metrics}
    if state.is_main_process:
        out.write_text(json.dumps(info))
''')


def _run(tmp_path: Path, ckpt: Path, data: Path, n: int) -> dict:
    driver = tmp_path / "eval_driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / f"eval_w{n}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # 1 process: plain python (saves torchrun's start-up); 2: torchrun, which sets up the gloo group
    launch = [sys.executable] if n == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={n}"]
    cmd = [*launch, str(driver), str(ckpt), str(data), str(out)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=50, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"{n} process(es): {time.time() - t0:.1f}s")
    return json.loads(out.read_text())


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not available")
def test_two_process_eval_matches_one(tmp_path):
    sys.path.insert(0, str(HERE))
    from test_grpo import make_checkpoint, make_data

    data = make_data(tmp_path / "data", n_train=24)
    ckpt = make_checkpoint(tmp_path, data)
    one, two = _run(tmp_path, ckpt, data, 1), _run(tmp_path, ckpt, data, 2)
    assert one["num_processes"] == 1
    assert two["num_processes"] == 2 and "MULTI_CPU" in two["distributed_type"]
    assert len(one["records"]) == len(two["records"]) == one["rows"] == 24
    for r1, r2 in zip(one["records"], two["records"]):
        # each rank batches its own half, so padding (and float rounding) differs; rankings must not
        assert {k: v for k, v in r1.items() if k != "scores"} == {k: v for k, v in r2.items() if k != "scores"}
        assert r1["scores"] == pytest.approx(r2["scores"], abs=1e-4)
    assert one["metrics"] == pytest.approx(two["metrics"])
