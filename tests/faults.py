"""Fault-injection harness: run a real latentr3 command as a subprocess, SIGKILL it at seeded random
moments (after it has made new progress, or while it is inside a checkpoint save), re-run the same command
until it finishes, and report what happened.  Used by tests/test_faults.py (a few kills per stage, in CI)
and benchmarks/fault_sweep.py (the long sweep)."""
from __future__ import annotations

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
                   progress: Callable[[], float], in_save: Callable[[], bool] | None = None,
                   max_delay: float = 1.0, timeout: float = 300.0, save_kills: int = 0) -> KillReport:
    """Runs `cmd` until it exits 0, SIGKILLing the first `kills` launches.

    A launch is killed a seeded random 0..max_delay s after `progress()` exceeds its value at the launch's
    start (so every kill lands after new work), or, for the first `save_kills` kills, as soon as
    `in_save()` is true (a checkpoint save is in flight; use LATENTR3_TEST_SLOW_SAVE to widen it)."""
    rng = random.Random(seed)
    rep = KillReport()
    with open(log, "a") as logf:
        while True:
            start_progress = progress()
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
            rep.launches += 1
            deadline = time.time() + timeout
            if rep.kills < kills:
                target_save = in_save is not None and rep.kills < save_kills
                while proc.poll() is None and time.time() < deadline:
                    if target_save and in_save():
                        break
                    if not target_save and progress() > start_progress:
                        time.sleep(rng.uniform(0.0, max_delay))
                        break
                    time.sleep(0.02)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    rep.kills += 1
                    rep.kill_points.append(("in save" if target_save else "after progress ") +
                                           f"{progress():g}")
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
    import json

    try:
        return float(json.loads((out / "state" / "run_state.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0.0


def save_in_flight(out: Path) -> bool:
    """A checkpoint directory (best/, last/) or the training state is being written."""
    return any(out.glob(".best.tmp-*")) or any(out.glob(".last.tmp-*")) or (out / "state.tmp").exists()
