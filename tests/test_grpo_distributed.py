"""Latent GRPO on 2 processes (torchrun, gloo, CPU) matches 1 process with the same global batch.

The test launches this file as a torchrun worker, once with 1 and once with 2 processes.  Each worker
(1) runs one `grpo_step` on a fixed global batch with a real Accelerator and saves the gathered
advantages and its updated LatentRATT; (2) runs `train_grpo` for a few steps (popularity rule, so the
gathered popularity groups are exercised) and saves its final LatentRATT.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun") or (str(Path(sys.executable).with_name("torchrun"))
                                        if Path(sys.executable).with_name("torchrun").exists() else None)


def worker(root: Path, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from test_grpo import a_batch, load, make_config  # noqa: E402

    from latentr3.config import GRPOConfig
    from latentr3.training import grpo
    from latentr3.training.common import make_accelerator

    data, ckpt = root / "data", root / "sft"
    B, mb, G = 8, 2, 4
    acc = make_accelerator(B, mb, mixed_precision="no")
    assert acc.num_processes == int(os.environ["WORLD_SIZE"])
    world, rank = acc.num_processes, acc.process_index
    torch.manual_seed(0)
    model, tok, builder = load(ckpt)
    g = GRPOConfig(num_generations=G, noise_std=0.5, lr=0.05, batch_size=B, micro_batch_size=mb)
    local = B // world
    micro = [a_batch(data, builder, tok, n=mb, start=rank * local + i) for i in range(0, local, mb)]
    noise = grpo.draw_noise(3, 0, B, G, 1, model.latent_ratt.hidden_size, g.noise_std)[rank * local:(rank + 1) * local]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=g.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    st = grpo.grpo_step(model, opt, sched, micro, noise, g, acc)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"advantages": st["advantages"], "rewards": st["rewards"],
                "ratt": {k: v.detach().clone() for k, v in model.latent_ratt.state_dict().items()}},
               out / f"step_rank{rank}.pt")

    cfg = make_config(root, data, ckpt, f"train_w{world}", advantage="popularity_group", batch_size=4,
                      micro_batch_size=2 // world, max_steps=3)
    grpo.train_grpo(cfg)
    from safetensors.torch import load_file

    torch.save({"saved": load_file(str(root / f"train_w{world}" / "last" / "latent_ratt.safetensors"))},
               out / f"train_rank{rank}.pt")


def _run(root: Path, n: int) -> Path:
    out = root / f"out{n}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={n}", str(Path(__file__)), str(root), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not available")
def test_two_processes_match_one(tmp_path):
    sys.path.insert(0, str(HERE))
    from test_grpo import make_checkpoint, make_data

    data = make_data(tmp_path / "data")
    make_checkpoint(tmp_path, data)
    one, two = _run(tmp_path, 1), _run(tmp_path, 2)
    s1 = torch.load(one / "step_rank0.pt")
    s2 = [torch.load(two / f"step_rank{r}.pt") for r in range(2)]
    for s in s2:
        assert torch.allclose(s["rewards"], s1["rewards"], atol=1e-5)
        assert torch.allclose(s["advantages"], s1["advantages"], atol=1e-6)
        for k in s1["ratt"]:
            assert torch.allclose(s["ratt"][k], s1["ratt"][k], atol=1e-6), k
    for k in s1["ratt"]:
        assert torch.equal(s2[0]["ratt"][k], s2[1]["ratt"][k])
    t1 = torch.load(one / "train_rank0.pt")
    t2 = torch.load(two / "train_rank0.pt")
    for k in t1["saved"]:
        assert torch.allclose(t2["saved"][k], t1["saved"][k], atol=1e-5), k


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
