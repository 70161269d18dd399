"""SFT on 2 processes (torchrun, gloo, CPU) matches 1 process, with and without the latent token.

The test launches this file as a worker, once as a plain single process and once under
`torchrun --nproc_per_node 2`.  Each worker trains two tiny SFT runs on the same global batches
(`model.num_latent` 1, and 0: the "w/o reasoning" ablation that `latentr3 run` trains first) and saves
the weights of each best checkpoint.  With 0 latents a trainable LatentRATT that gets no gradient made
DDP fail on the second step ("Expected to have finished reduction in the prior iteration").
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
_SIBLING = Path(sys.executable).with_name("torchrun")
TORCHRUN = shutil.which("torchrun") or (str(_SIBLING) if _SIBLING.exists() else None)
LATENTS = (1, 0)


def sft_config(data: Path, out: Path, num_latent: int):
    from latentr3.config import load_config

    # 16 rows, micro-batch 2, global batch 8: 2 optimizer steps of 4 micro-batches (1 process: 4
    # accumulated; 2 processes: 2 each).
    return load_config(None, [
        f"data.dir={data}", "data.item_noun=albums", "model.backbone=tiny", "model.tiny_hidden=32",
        "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=300", f"model.num_latent={num_latent}",
        "prompt.template=short", "prompt.cutoff_len=128", f"sft.output_dir={out}", "sft.sample=-1",
        "sft.micro_batch_size=2", "sft.batch_size=8", "sft.max_steps=2", "sft.epochs=1", "sft.lr=3e-3",
        "sft.warmup_steps=0", "sft.scheduler=constant", "sft.save_steps=1000", "sft.log_steps=1",
        "sft.patience=0"])


def worker(data: Path, root: Path) -> None:
    from safetensors.torch import load_file

    from latentr3.training.sft import train_sft

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for n in LATENTS:
        best = train_sft(sft_config(data, root / f"sft_n{n}_w{world}", n))
        if rank == 0:
            weights = {f"backbone.{k}": v for k, v in load_file(str(best / "backbone" / "model.safetensors")).items()}
            weights.update({f"ratt.{k}": v for k, v in load_file(str(best / "latent_ratt.safetensors")).items()})
            torch.save(weights, root / f"weights_n{n}_w{world}.pt")


def _run(data: Path, root: Path, n: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    # 1 process: plain python (saves torchrun's start-up); 2: torchrun, which sets up the gloo group
    launch = [sys.executable] if n == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={n}"]
    cmd = [*launch, str(Path(__file__)), str(data), str(root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not available")
def test_two_process_sft_matches_one(tmp_path):
    sys.path.insert(0, str(HERE))
    from test_grpo import make_data

    data = make_data(tmp_path / "data", n_train=16)
    _run(data, tmp_path, 1)
    _run(data, tmp_path, 2)
    for n in LATENTS:
        one = torch.load(tmp_path / f"weights_n{n}_w1.pt")
        two = torch.load(tmp_path / f"weights_n{n}_w2.pt")
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k], two[k], atol=2e-5), (n, k, (one[k] - two[k]).abs().max())
        for w in (1, 2):
            done = json.loads((tmp_path / f"sft_n{n}_w{w}" / "done.json").read_text())
            assert done["steps"] == 2 and done["processes"] == w, done


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
