"""`latentr3 run` end to end on a tiny setting: seeds, intervals, paired column, skip of finished seeds."""
from __future__ import annotations

import json

import pytest

from latentr3.config import load_config

TINY_RUN = [
    "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=400",
    "prompt.template=short", "prompt.cutoff_len=96",
    "sft.sample=32", "sft.valid_sample=8", "sft.micro_batch_size=16", "sft.batch_size=16", "sft.epochs=1",
    "sft.lr=3e-3", "sft.warmup_steps=1", "sft.save_steps=1000", "sft.log_steps=1",
    "grpo.sample=16", "grpo.batch_size=4", "grpo.micro_batch_size=4", "grpo.max_steps=2",
    "grpo.warmup_steps=1", "grpo.eval_steps=0", "grpo.eval_sample=4", "grpo.save_steps=1000",
    "run.sasrec=false",  # SASRec seeding: test_sasrec; here it would add ~20 s of training
    "eval.sample=12", "eval.batch_size=8", "eval.num_beams=10", "eval.top_k=10", "eval.ks=[1,10]",
    "eval.bootstrap=200", "run.seeds=[0,1]",
]


def test_run_with_seeds_reports_intervals_and_skips_finished_seeds(ml_cache, tmp_path):
    from latentr3.pipeline import NO_LATENT, POP_RECENT, run_pipeline

    root = tmp_path / "run"
    cfg = load_config(None, [f"run.output_dir={root}", *TINY_RUN])
    result = run_pipeline(cfg)
    for seed in (0, 1):
        for stage in ("sft_no_latent", "sft", "grpo"):
            assert (root / f"seed_{seed}" / stage / "done.json").exists(), (seed, stage)
    # the seeds really differ (initialisation and data order)
    a = json.loads((root / "seed_0" / "sft" / "done.json").read_text())
    b = json.loads((root / "seed_1" / "sft" / "done.json").read_text())
    assert a != b

    ev = result["evidence"]
    assert ev["reference"] == NO_LATENT and result["seeds"] == [0, 1]
    model = ev["rows"]["LatentR3 (SFT + GRPO)"]
    assert model["seeds"] == 2 and set(model["seed_std"]) >= {"legacy/HR@10", "item/NDCG@10"}
    lo, hi = model["ci"]["item/NDCG@10"]
    assert lo <= model["metrics"]["item/NDCG@10"] <= hi
    assert set(model["paired"]) == {"legacy/NDCG@10", "legacy/HR@10", "item/NDCG@10", "item/HR@10"}
    assert 0 < model["paired"]["item/NDCG@10"]["p"] <= 1
    assert ev["rows"][POP_RECENT]["lists"]["share_most_common_list"] == 1.0
    assert sum(ev["group_users"].values()) == 12
    text = (root / "results.md").read_text()
    assert "percentile bootstrap over test users (200 resamples" in text
    assert "mean ± sd over seeds [0, 1]" in text and "(reference)" in text and "same-list share" in text
    assert (root / "results.png").exists() and (root / "training_curves.png").exists()

    # a re-run skips every finished seed and reproduces the table
    marks = {p: p.stat().st_mtime_ns for p in root.glob("seed_*/*/done.json")}
    again = run_pipeline(cfg)
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
    assert again["rows"] == result["rows"]


def test_repeated_seeds_are_rejected(ml_cache, tmp_path):
    from latentr3.pipeline import run_pipeline

    with pytest.raises(ValueError, match="run.seeds repeats a"):  # refused when the config is loaded
        run_pipeline(load_config(None, [f"run.output_dir={tmp_path}", *TINY_RUN, "run.seeds=[1,1]"]))
