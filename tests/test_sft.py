"""Tests of the SFT recipe on the embedded MovieLens-100K: learning, exact resume, config errors, CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAVE_RECBOLE
from latentr3.config import ConfigError, load_config
from latentr3.training.sft import train_sft

needs_movielens = pytest.mark.skipif(
    not HAVE_RECBOLE, reason="the embedded MovieLens-100K needs recbole (pip install --no-deps recbole==1.2.1)")

# 400 rows, micro-batch 16, batch 32: 25 micro-batches = 13 optimizer steps per epoch (the last one
# a single micro-batch), 39 steps in all.
STEPS_PER_EPOCH = 13
TINY = [
    "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=500",
    "prompt.template=short", "prompt.cutoff_len=128",
    "sft.sample=400", "sft.valid_sample=100", "sft.micro_batch_size=16", "sft.batch_size=32",
    "sft.epochs=3", "sft.lr=3e-3", "sft.warmup_steps=2", "sft.scheduler=cosine", "sft.save_steps=1000",
    "sft.log_steps=1", "sft.patience=0",
]


def tiny_config(out: Path, *extra: str):
    return load_config(None, [f"sft.output_dir={out}", *TINY, *extra])


@pytest.fixture(scope="module")
def ml_env(tmp_path_factory):
    """LATENTR3_CACHE pointed at a private directory for the whole module."""
    if not HAVE_RECBOLE:
        pytest.skip("the embedded MovieLens-100K needs recbole (pip install --no-deps recbole==1.2.1)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTR3_CACHE", str(tmp_path_factory.mktemp("sft_cache")))
        yield


@pytest.fixture(scope="module")
def full_run(ml_env, tmp_path_factory):
    """One uninterrupted SFT run (shared by the learning and the resume tests)."""
    out = tmp_path_factory.mktemp("sft") / "full"
    best = train_sft(tiny_config(out))
    return out, best


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_valid_loss(ckpt: Path, cfg) -> float:
    """Mean target-token NLL of a checkpoint on the configured validation rows (own loop, no accelerate)."""
    from latentr3.data.dataset import collate, load_catalogue, load_split, subsample, tokenize_samples
    from latentr3.data.prompts import PromptBuilder
    from latentr3.model.latent_lm import LatentR3Model

    model, tok, meta = LatentR3Model.from_pretrained(ckpt)
    model.eval()
    cat = load_catalogue(cfg.data)
    rows = subsample(load_split(cfg.data, "valid", cat), cfg.sft.valid_sample, cfg.sft.seed)
    builder = PromptBuilder(tok, cfg.prompt.template, meta["item_noun"], cfg.prompt.cutoff_len,
                            meta["num_latent"])
    examples = tokenize_samples(rows, builder)
    nll = n = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            b = collate(examples[i: i + 32], tok.pad_token_id)
            logp = model(b["prompt_ids"], b["prompt_mask"], b["target_ids"], b["target_mask"])
            nll -= logp.sum().item()
            n += b["target_mask"].sum().item()
    return nll / n


def state_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((out / "state").glob("model*.safetensors"))
    assert files, f"no model weights in {out / 'state'}"
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


# ----------------------------------------------------------------------------------------- learning
@needs_movielens
def test_short_sft_lowers_validation_loss(full_run, tmp_path):
    out, best = full_run
    cfg = tiny_config(out)
    # The model before fine-tuning: sample=0 saves the initial model (same seeds, same tokenizer).
    init_best = train_sft(tiny_config(tmp_path / "init", "sft.sample=0"))
    before = checkpoint_valid_loss(init_best, cfg)
    after = checkpoint_valid_loss(best, cfg)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 0.5, (before, after)

    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert all(math.isfinite(r["loss"]) and r["lr"] >= 0 and "grad_norm" in r for r in train)
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    assert len(valid) == 3 and valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    # The best checkpoint's loss, recomputed outside the recipe, is the best one logged.
    assert after == pytest.approx(min(r["valid_loss"] for r in valid), rel=1e-4)
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 3 * STEPS_PER_EPOCH and done["train_rows"] == 400 and done["epochs"] == 3
    assert done["best_valid_loss"] == pytest.approx(after, rel=1e-4)
    # A completed run is not redone.
    assert train_sft(cfg) == best
    assert len(read_metrics(out)) == len(records)


# ----------------------------------------------------------------------------------------- resume
@needs_movielens
@pytest.mark.parametrize("halt", [STEPS_PER_EPOCH + 4])  # mid-epoch 2: 8 of its 25 micro-batches done
def test_resume_after_halt_matches_uninterrupted_run(full_run, tmp_path, halt):
    full_out, full_best = full_run
    out = tmp_path / "halted"
    cfg = tiny_config(out, f"sft.halt_after_steps={halt}")
    train_sft(cfg)
    assert not (out / "done.json").exists()
    state = json.loads((out / "state" / "run_state.json").read_text())
    assert state["step"] == halt and state["epoch"] == 1 and 0 < state["batches_in_epoch"] < 25
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-1] == halt

    train_sft(cfg)  # the same config again: picks up the state (resume=True)
    assert (out / "done.json").exists()

    a, b = state_weights(full_out), state_weights(out)
    assert a.keys() == b.keys()
    assert any("latent_ratt" in k for k in a) and any("layers.0" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    # Training losses after the halt match step for step, and so does the best checkpoint.
    la = [r["loss"] for r in read_metrics(full_out) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    ra = load_file(str(full_best / "latent_ratt.safetensors"))
    rb = load_file(str(out / "best" / "latent_ratt.safetensors"))
    for k in ra:
        assert torch.allclose(ra[k], rb[k], rtol=0, atol=1e-6), k


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override, message", [
    ("sft.micro_batch_size=0", "sft.micro_batch_size must be >= 1"),
    ("sft.batch_size=20", "not a multiple of sft.micro_batch_size"),
    ("sft.save_steps=0", "sft.save_steps must be >= 1"),
    ("sft.log_steps=0", "sft.log_steps"),
    ("sft.valid_sample=0", "sft.valid_sample"),
    ("sft.sample=-2", "sft.sample"),
    ("sft.lr=0", "sft.lr must be > 0"),
    ("sft.scheduler=cosine_with_restarts", "sft.scheduler must be one of"),
    ("sft.epochs=0", "sft.epochs"),
    ("model.num_latent=-1", "model.num_latent"),
    ("prompt.template=nonsense", "prompt.template"),
])
def test_bad_sft_values_are_rejected_up_front(tmp_path, override, message):
    # Most are refused when the config is loaded (config.RULES), the rest when SFT starts.
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        train_sft(load_config(None, [f"sft.output_dir={tmp_path / 'o'}", override]))
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_missing_data_dir_is_named(tmp_path):
    cfg = load_config(None, [f"sft.output_dir={tmp_path / 'o'}", f"data.dir={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="data.dir"):
        train_sft(cfg)


def test_constant_scheduler_keeps_the_warmup():
    from latentr3.training.common import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "constant", warmup=4, total=10)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])


def test_cli_reports_config_errors(tmp_path, capsys):
    from latentr3.cli import main

    assert main(["sft", f"sft.output_dir={tmp_path}", "sft.micro_batch_size=0"]) == 2
    assert "sft.micro_batch_size" in capsys.readouterr().err
    assert main(["sft", "sft.lrr=1"]) == 2
    assert "lrr" in capsys.readouterr().err


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "latentr3", "sft", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout and "key=value" in r.stdout


def test_length_grouped_sampler_is_a_seeded_permutation_with_less_padding():
    import random

    from latentr3.training.common import EpochShuffleSampler

    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    plain = EpochShuffleSampler(1000, 3)
    grouped = EpochShuffleSampler(1000, 3, lengths=lengths, batch=8, window=16)
    a, b = list(grouped), list(grouped)
    assert a == b and sorted(a) == list(range(1000)) and a != list(plain)
    grouped.epoch = 1
    assert list(grouped) != a  # a new order every epoch

    def padded(order):
        return sum(8 * max(lengths[j] for j in order[i:i + 8]) for i in range(0, 1000, 8))
    assert padded(a) < 0.8 * padded(list(plain))
