"""Real kills: a stage run as a subprocess is SIGKILLed at seeded random moments (also in the middle of a
checkpoint save), re-run until it finishes, and must end exactly where an uninterrupted run ends.
Torn files are detected and named, never loaded.  The long sweep is benchmarks/fault_sweep.py."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import HAVE_RECBOLE
from faults import (latentr3_cmd, partial_lines, run_until_done, save_in_flight, state_step,
                    subprocess_env)

needs_movielens = pytest.mark.skipif(
    not HAVE_RECBOLE, reason="the embedded MovieLens-100K needs recbole (pip install --no-deps recbole==1.2.1)")

TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=400",
        "prompt.template=short", "prompt.cutoff_len=96"]
SFT = [*TINY, "sft.sample=224", "sft.valid_sample=16", "sft.micro_batch_size=8", "sft.batch_size=16",
       "sft.epochs=1", "sft.lr=3e-3", "sft.warmup_steps=1", "sft.save_steps=2", "sft.log_steps=1",
       "sft.patience=0"]


def _weights(ckpt):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        out.update({f"{f.relative_to(ckpt)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not HAVE_RECBOLE:
        pytest.skip("the embedded MovieLens-100K needs recbole (pip install --no-deps recbole==1.2.1)")
    return subprocess_env(tmp_path_factory.mktemp("fault_cache"))


@needs_movielens
def test_sft_killed_anywhere_resumes_to_the_same_weights(env, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "killed"
    log = tmp_path / "log.txt"
    run_until_done(latentr3_cmd("sft", f"sft.output_dir={ref}", *SFT), env, log, kills=0, seed=0,
                   progress=lambda: 0)
    # 1 kill inside a checkpoint save (held open by the fault-injection pause), then 2 at random moments
    slow = {**env, "LATENTR3_TEST_SLOW_SAVE": "0.5"}
    rep = run_until_done(latentr3_cmd("sft", f"sft.output_dir={run}", *SFT), slow, log, kills=3, seed=1,
                         progress=lambda: state_step(run), in_save=lambda: save_in_flight(run), save_kills=1,
                         max_delay=0.2)  # 14 steps, a save every 2: room for 3 kills on a fast machine
    assert rep.kills == 3, rep
    a, b = _weights(ref / "best"), _weights(run / "best")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    done_a, done_b = (json.loads((d / "done.json").read_text()) for d in (ref, run))
    for key in ("train_seconds",):
        done_a.pop(key, None), done_b.pop(key, None)
    assert done_a == done_b


@needs_movielens
def test_eval_killed_resumes_to_the_same_summary(env, tmp_path):
    ckpt_run = tmp_path / "sft0"
    log = tmp_path / "log.txt"
    # the initial model (sft.sample=0) is enough: the lists only have to be reproducible
    run_until_done(latentr3_cmd("sft", f"sft.output_dir={ckpt_run}", *SFT, "sft.sample=0"), env, log, 0, 0,
                   progress=lambda: 0)
    # 30 chunks of 4 users: enough fresh progress for 3 kills however fast the machine decodes
    common = [f"--model={ckpt_run / 'best'}", *TINY, "eval.sample=120", "eval.batch_size=4",
              "eval.resume_every=4", "eval.bootstrap=100", "eval.diagnostics_sample=16"]
    ref, out = tmp_path / "eval_ref", tmp_path / "eval_killed"
    run_until_done(latentr3_cmd("eval", *common, f"eval.output_dir={ref}"), env, log, 0, 0, progress=lambda: 0)
    rep = run_until_done(latentr3_cmd("eval", *common, f"eval.output_dir={out}"), env, log, kills=3, seed=2,
                         progress=lambda: partial_lines(out / "recommendations.partial.jsonl"), max_delay=0.1)
    assert rep.kills == 3
    assert "resuming evaluation" in log.read_text()
    s_ref, s_out = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    for key in ("seconds", "users_per_second"):
        s_ref.pop(key), s_out.pop(key)
    assert s_ref == s_out
    recs = [[json.loads(line)["predicted"] for line in (d / "recommendations.jsonl").open()] for d in (ref, out)]
    assert recs[0] == recs[1] and len(recs[0]) == 120
    assert not (out / "recommendations.partial.jsonl").exists()


def test_torn_checkpoint_is_named_not_loaded(tmp_path, titles):
    from latentr3.atomic import CheckpointError
    from latentr3.config import ModelConfig
    from latentr3.model.build import build_model
    from latentr3.model.latent_lm import LatentR3Model

    model, tok = build_model(ModelConfig(tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_vocab=300), titles,
                             "movies")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt, tok)
    LatentR3Model.from_pretrained(ckpt)  # intact: loads
    weights = next((ckpt / "backbone").glob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated by a failed copy
    with pytest.raises(CheckpointError, match=f"{weights.name}.*truncated"):
        LatentR3Model.from_pretrained(ckpt)
    weights.write_bytes(good[:-8] + b"\0" * 8)  # same size, bytes flipped
    with pytest.raises(CheckpointError, match="corrupt"):
        LatentR3Model.from_pretrained(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        LatentR3Model.from_pretrained(ckpt)
    weights.write_bytes(good)
    (ckpt / "MANIFEST.json").unlink()  # killed before the manifest: incomplete
    with pytest.raises(CheckpointError, match="incomplete"):
        LatentR3Model.from_pretrained(ckpt)


def test_a_save_killed_between_its_renames_is_recovered(tmp_path):
    from latentr3.atomic import atomic_directory, verify_manifest

    target = tmp_path / "best"
    with atomic_directory(target) as d:
        (d / "w.bin").write_bytes(b"v1")
    # the kill window: old version renamed aside, new one not yet in place
    target.rename(tmp_path / "best.old")
    with atomic_directory(target) as d:
        assert (tmp_path / "best").exists()  # the old version came back first
        (d / "w.bin").write_bytes(b"v2")
    verify_manifest(target)
    assert (target / "w.bin").read_bytes() == b"v2" and not (tmp_path / "best.old").exists()
    # an exception inside the block leaves the previous version untouched
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as d:
            (d / "w.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert (target / "w.bin").read_bytes() == b"v2"
    assert not list(tmp_path.glob(".best.tmp-*"))
    shutil.rmtree(target)


@pytest.mark.parametrize("errno_, where", [(28, "write"), (30, "replace")])
def test_full_or_read_only_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, errno_, where):
    import os

    from latentr3 import atomic

    target = tmp_path / "summary.json"
    atomic.atomic_write_json(target, {"v": 1})
    if where == "write":  # ENOSPC while the content is written
        real = os.fsync
        monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno_, "No space left on device")))
    else:  # EROFS when the new file is renamed into place
        monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno_, "Read-only file system")))
    with pytest.raises(atomic.OutputWriteError, match=rf"cannot write {target}.*(No space|Read-only).*unchanged"):
        atomic.atomic_write_json(target, {"v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left
    if where == "write":
        assert real is os.fsync
