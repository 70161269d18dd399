"""Fault-injection harness: run a real latentr3 command as a subprocess, SIGKILL it at seeded random
moments (after it has made new progress, or while it is inside a checkpoint save), re-run the same command
until it finishes, and report what happened.  The stages (prepare, sft, grpo, sasrec, eval) are defined
here once -- command, what counts as progress, what shows a save in flight, what must come out identical --
for tests/test_faults.py (a few kills per stage on tiny sizes, in CI) and benchmarks/fault_sweep.py (the
long sweep, larger sizes)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def latentr3_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "latentr3", *args]


def subprocess_env(cache: Path | None = None, **extra: str) -> dict:
    """One torch thread (results are compared bit for bit across runs), the project's src first."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")})
    if cache is not None:
        env["LATENTR3_CACHE"] = str(cache)
    env.update(extra)
    return env


@dataclass
class KillReport:
    kills: int = 0
    launches: int = 0
    kill_points: list[str] = field(default_factory=list)


def run_until_done(cmd: list[str], env: dict, log: Path, kills: int, seed: int,
                   progress: Callable[[], float], in_save: Callable[[], set] | None = None,
                   max_delay: float = 1.0, timeout: float = 300.0, save_kills: int = 0,
                   where: Callable[[], str] | None = None) -> KillReport:
    """Runs `cmd` until it exits 0, SIGKILLing the first `kills` launches.

    A launch is killed a seeded random 0..max_delay s after `progress()` exceeds its value at the launch's
    start (so every kill lands after new work), or, for the first `save_kills` kills, as soon as
    `in_save()` (the markers of the saves in flight: (path, mtime) of temporary directories, ...) holds a
    marker it did not hold at the launch's start (a save of this launch is in flight, not the debris of
    the last kill; use LATENTR3_TEST_SLOW_SAVE to widen the window).  `where()` describes a kill point
    (default: the progress value)."""
    rng = random.Random(seed)
    rep = KillReport()
    with open(log, "a") as logf:
        while True:
            start_progress = progress()
            target_save = in_save is not None and rep.kills < min(save_kills, kills)
            start_markers = set(in_save()) if target_save else set()
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
            rep.launches += 1
            deadline = time.time() + timeout
            if rep.kills < kills:
                while proc.poll() is None and time.time() < deadline:
                    if target_save and set(in_save()) - start_markers:
                        break
                    if not target_save and progress() > start_progress:
                        time.sleep(rng.uniform(0.0, max_delay))
                        break
                    time.sleep(0.02)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    rep.kills += 1
                    rep.kill_points.append(("in save: " if target_save else "after progress: ") +
                                           (where() if where is not None else f"{progress():g}"))
                    continue
            try:
                rc = proc.wait(timeout=max(deadline - time.time(), 1.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{' '.join(cmd)} hung (> {timeout} s); log: {log}")
            if rc != 0:
                tail = Path(log).read_text()[-3000:]
                raise AssertionError(f"{' '.join(cmd)} exited {rc} after {rep.kills} kills:\n{tail}")
            return rep


def partial_lines(path: Path) -> float:
    """Records written to an evaluation's partial file so far (its header excluded)."""
    try:
        return max(sum(1 for _ in open(path, "rb")) - 1, 0)
    except FileNotFoundError:
        return 0


def state_step(out: Path) -> float:
    """The optimizer step of a training run's last saved state (0 before the first save)."""
    try:
        return float(json.loads((out / "state" / "run_state.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0.0


def _markers(paths) -> set:
    out = set()
    for p in paths:
        try:
            out.add((str(p), p.stat().st_mtime_ns))
        except FileNotFoundError:
            pass
    return out


def save_in_flight(out: Path) -> set:
    """A checkpoint directory (best/, last/) or the training state is being written (or was, by a killed
    launch: the marker's mtime tells them apart)."""
    return _markers([*out.glob(".best.tmp-*"), *out.glob(".last.tmp-*"), out / "state.tmp"])


def newest_mtime(out: Path, names) -> float:
    """The newest modification time of the named files (a file renamed into place raises it)."""
    return float(max((m for _, m in _markers(out / n for n in names)), default=0))


def log_count(log: Path, text: str) -> float:
    try:
        return float(log.read_text(errors="replace").count(text))
    except FileNotFoundError:
        return 0.0


def digest_files(root: Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every file under `root` (hidden ones too: a leftover temporary is a difference)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file() and "MANIFEST" not in p.name}


def tensors(ckpt: Path) -> dict[str, str]:
    """sha256 of the bytes of every tensor of every safetensors file under `ckpt`."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(ckpt)}:{k}"] = (str(v.dtype), tuple(v.shape),
                                                 hashlib.sha256(v.numpy().tobytes()).hexdigest())
    return out


def _done(out: Path) -> dict:
    d = json.loads((out / "done.json").read_text())
    d.pop("train_seconds", None)
    return d


def eval_result(d: Path) -> dict:
    s = json.loads((d / "summary.json").read_text())
    s.pop("seconds", None), s.pop("users_per_second", None)
    return {"summary": s, "lists": [json.loads(line)["predicted"] for line in (d / "recommendations.jsonl").open()]}


# ------------------------------------------------------------------------------------------ the stages
STAGES = ("prepare", "sft", "grpo", "sasrec", "eval")
TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=400",
        "prompt.template=short", "prompt.cutoff_len=96"]
PREPARED = ("train.csv", "valid.csv", "test.csv", "info.txt", "stats.json")
# Sizes: "ci" for tests/test_faults.py (each launch is mostly the interpreter's start-up; enough saves,
# epochs or chunks that 3 kills always land before the end, however fast the machine), "sweep" for
# benchmarks/fault_sweep.py (20 kills a stage).
SIZES = {
    "ci": {
        # 14 steps, a save every 2
        "sft": ["sft.sample=224", "sft.valid_sample=16", "sft.micro_batch_size=8", "sft.batch_size=16",
                "sft.epochs=1", "sft.lr=3e-3", "sft.warmup_steps=1", "sft.save_steps=2", "sft.log_steps=1",
                "sft.patience=0"],
        # 24 steps over 1.5 epochs (a resume across the epoch boundary), a state save every 2, validation
        # (and a best/ save when it improves) every 8
        "grpo": ["grpo.sample=128", "grpo.batch_size=8", "grpo.micro_batch_size=4", "grpo.max_steps=24",
                 "grpo.warmup_steps=2", "grpo.save_steps=2", "grpo.eval_steps=8", "grpo.eval_sample=8"],
        "sasrec": ["sasrec.epochs=4", "sasrec.patience=0", "sasrec.valid_sample=200", "sasrec.hidden=32",
                   "sasrec.layers=1", "sasrec.device=cpu"],
        # 30 chunks of 4 users
        "eval": ["eval.sample=120", "eval.batch_size=4", "eval.resume_every=4", "eval.bootstrap=100",
                 "eval.diagnostics_sample=16"],
    },
    "sweep": {
        "sft": ["sft.sample=640", "sft.valid_sample=32", "sft.micro_batch_size=8", "sft.batch_size=16",
                "sft.epochs=1", "sft.warmup_steps=2", "sft.save_steps=2", "sft.eval_steps=10", "sft.patience=0"],
        "grpo": ["grpo.sample=512", "grpo.batch_size=8", "grpo.micro_batch_size=4", "grpo.max_steps=56",
                 "grpo.warmup_steps=2", "grpo.save_steps=2", "grpo.eval_steps=8", "grpo.eval_sample=16"],
        "sasrec": ["sasrec.epochs=3", "sasrec.patience=0", "sasrec.valid_sample=500", "sasrec.hidden=32"],
        "eval": ["eval.sample=480", "eval.batch_size=8", "eval.resume_every=8", "eval.bootstrap=200"],
    },
}


def stage_cmd(stage: str, out: Path, size: str = "ci", init: Path | None = None, data=()) -> list[str]:
    """The command of `stage` writing to `out`; `init`: the checkpoint GRPO starts from / eval scores;
    `data`: data.* overrides (the embedded MovieLens-100K when empty)."""
    args = SIZES[size].get(stage, [])
    if stage == "prepare":
        return latentr3_cmd("prepare", "movielens", "--out", str(out))
    if stage == "sft":
        return latentr3_cmd("sft", f"sft.output_dir={out}", *TINY, *data, *args)
    if stage == "grpo":
        return latentr3_cmd("grpo", f"grpo.init={init}", f"grpo.output_dir={out}", *TINY, *data, *args)
    if stage == "sasrec":
        return latentr3_cmd("baseline", "sasrec", f"sasrec.output_dir={out}", *data, *args)
    if stage == "eval":
        return latentr3_cmd("eval", f"--model={init}", *TINY, *data, *args, f"eval.output_dir={out}")
    raise ValueError(stage)


def stage_result(stage: str, out: Path):
    """What must come out bit for bit as in the uninterrupted run."""
    if stage == "prepare":  # the split CSVs, catalogue and stats.json, and no other file
        return digest_files(out)
    if stage in ("sft", "grpo"):  # every tensor of best/ and (GRPO) last/: backbone, LatentRATT; done.json
        return {d: tensors(out / d) for d in ("best", "last") if (out / d).is_dir()} | {"done": _done(out)}
    if stage == "sasrec":
        return {"weights": tensors(out), "done": _done(out)}
    if stage == "eval":  # summary.json without its timing fields, the lists
        return eval_result(out)
    raise ValueError(stage)


def stage_progress(stage: str, out: Path, log: Path) -> Callable[[], float]:
    """What counts as fresh progress of a launch (a kill after it loses work that was done)."""
    if stage == "prepare":  # a file of the dataset renamed into place
        return lambda: newest_mtime(out, PREPARED)
    if stage in ("sft", "grpo"):  # a training state saved (the step it resumes from)
        return lambda: state_step(out)
    if stage == "sasrec":  # an epoch trained (no resume: a relaunch trains again from the seed)
        return lambda: log_count(log, "sasrec epoch ")
    if stage == "eval":  # users appended to the partial file
        return lambda: partial_lines(out / "recommendations.partial.jsonl")
    raise ValueError(stage)


def stage_in_save(stage: str, out: Path) -> Callable[[], set] | None:
    """Markers of a save in flight (held open by LATENTR3_TEST_SLOW_SAVE), None: no such save."""
    if stage == "prepare":  # the dataset half written: stats.json (written last) absent
        return lambda: set() if (out / "stats.json").exists() else _markers(out / n for n in PREPARED)
    if stage in ("sft", "grpo"):
        return lambda: save_in_flight(out)
    if stage == "sasrec":  # weights, sasrec.json and the catalogue copy (written last) in place, the manifest not
        return lambda: set() if (out / "MANIFEST.json").exists() else _markers([out / "catalogue.txt"])
    return None


def stage_where(stage: str, out: Path) -> Callable[[], str] | None:
    """A kill point in words, where the progress value alone says little."""
    if stage == "prepare":  # the files in place and the temporaries of the atomic writes in flight
        return lambda: " ".join(sorted(p.name for p in out.iterdir())) if out.is_dir() else "(no directory)"
    return None


def kill_stage(stage: str, root: Path, env: dict, kills: int, seed: int, max_delay: float,
               save_kills: int = 0, slow_save: str | None = None, size: str = "ci", init: Path | None = None,
               data=(), log: Path | None = None, timeout: float = 300.0):
    """Runs `stage` once uninterrupted into root/<stage>_ref, then into root/<stage>_killed under `kills`
    SIGKILLs (the first `save_kills` inside a save), with LATENTR3_TEST_SLOW_SAVE=`slow_save` for the
    killed runs; returns (KillReport, result of the uninterrupted run, result of the killed one)."""
    ref, run = root / f"{stage}_ref", root / f"{stage}_killed"
    log = log or root / f"{stage}_log.txt"
    run_until_done(stage_cmd(stage, ref, size, init, data), env, log, 0, 0, progress=lambda: 0, timeout=timeout)
    killed_env = {**env, "LATENTR3_TEST_SLOW_SAVE": slow_save} if slow_save else env
    rep = run_until_done(stage_cmd(stage, run, size, init, data), killed_env, log, kills, seed,
                         progress=stage_progress(stage, run, log),
                         in_save=stage_in_save(stage, run) if save_kills else None,
                         save_kills=save_kills, max_delay=max_delay, timeout=timeout,
                         where=stage_where(stage, run))
    return rep, stage_result(stage, ref), stage_result(stage, run)
