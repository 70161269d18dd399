"""The long fault-injection sweep: every stage SIGKILLed many times, each time resumed, compared with an
uninterrupted run.

For each stage (prepare, sft, grpo, sasrec, eval) the same command runs once uninterrupted, then again
under `--kills` seeded SIGKILLs (the first `--save-kills` of SFT and GRPO while a checkpoint or training
state save is held open by LATENTR3_TEST_SLOW_SAVE, the others at a random moment after new progress),
re-launched after each kill until it exits 0.  Then the outputs are compared bit for bit:
prepare -> the split CSVs, catalogue and stats.json; sft / grpo -> every tensor of best/ (backbone and
LatentRATT); sasrec -> sasrec.safetensors; eval -> summary.json without its timing fields and the lists
in recommendations.jsonl.  One torch thread everywhere (the comparison is exact).

Run (from the repository root; ~1-2 h for 20 kills per stage on 2 cores):
    .venv/bin/python benchmarks/fault_sweep.py --kills 20 --out runs/fault_sweep
Options: --stages prepare sft grpo sasrec eval --seed 0 --save-kills 5
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from faults import (latentr3_cmd, partial_lines, run_until_done, save_in_flight, state_step,  # noqa: E402
                    subprocess_env)

TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=400",
        "prompt.template=short", "prompt.cutoff_len=96"]
SFT = [*TINY, "sft.sample=640", "sft.valid_sample=32", "sft.micro_batch_size=8", "sft.batch_size=16",
       "sft.epochs=1", "sft.warmup_steps=2", "sft.save_steps=2", "sft.eval_steps=10", "sft.patience=0"]
GRPO = [*TINY, "grpo.sample=512", "grpo.batch_size=8", "grpo.micro_batch_size=4", "grpo.max_steps=56",
        "grpo.warmup_steps=2", "grpo.save_steps=2", "grpo.eval_steps=8", "grpo.eval_sample=16"]
SASREC = ["sasrec.epochs=3", "sasrec.patience=0", "sasrec.valid_sample=500", "sasrec.hidden=32"]
EVAL = [*TINY, "eval.sample=480", "eval.batch_size=8", "eval.resume_every=8", "eval.bootstrap=200"]


def digest_files(root: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob(pattern)) if p.is_file() and "MANIFEST" not in p.name}


def tensors(ckpt: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(ckpt)}:{k}"] = hashlib.sha256(v.numpy().tobytes()).hexdigest()
    return out


def eval_result(d: Path) -> dict:
    s = json.loads((d / "summary.json").read_text())
    s.pop("seconds", None), s.pop("users_per_second", None)
    return {"summary": s, "lists": [json.loads(line)["predicted"] for line in (d / "recommendations.jsonl").open()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--save-kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=["prepare", "sft", "grpo", "sasrec", "eval"])
    p.add_argument("--out", default="runs/fault_sweep")
    args = p.parse_args(argv)
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = subprocess_env(root / "cache")
    slow = {**env, "LATENTR3_TEST_SLOW_SAVE": "0.3"}
    log = root / "log.txt"
    rows = []

    def stage(name, cmd_for, compare, progress_for, save_for=None, max_delay=1.0):
        ref, run = root / f"{name}_ref", root / f"{name}_killed"
        t0 = time.time()
        run_until_done(cmd_for(ref), env, log, 0, 0, progress=lambda: 0)
        rep = run_until_done(cmd_for(run), slow if save_for else env, log, args.kills, args.seed,
                             progress=progress_for(run), in_save=save_for(run) if save_for else None,
                             save_kills=args.save_kills if save_for else 0, max_delay=max_delay)
        same = compare(ref) == compare(run)
        rows.append((name, rep.kills, rep.launches, same, time.time() - t0))
        print(f"{name}: {rep.kills} kills, {rep.launches} launches, identical to the uninterrupted run: {same}",
              flush=True)

    if "prepare" in args.stages:
        stage("prepare", lambda d: latentr3_cmd("prepare", "movielens", "--out", str(d)),
              lambda d: digest_files(d, "*"), lambda d: (lambda: time.time()), max_delay=6.0)
    sft_ckpt = None
    if {"sft", "grpo", "eval"} & set(args.stages):
        stage("sft", lambda d: latentr3_cmd("sft", f"sft.output_dir={d}", *SFT), lambda d: tensors(d / "best"),
              lambda d: (lambda: state_step(d)), save_for=lambda d: (lambda: save_in_flight(d)))
        sft_ckpt = root / "sft_ref" / "best"
    if "grpo" in args.stages:
        stage("grpo", lambda d: latentr3_cmd("grpo", f"grpo.init={sft_ckpt}", f"grpo.output_dir={d}", *GRPO),
              lambda d: tensors(d / "best"), lambda d: (lambda: state_step(d)),
              save_for=lambda d: (lambda: save_in_flight(d)))
    if "sasrec" in args.stages:
        stage("sasrec", lambda d: latentr3_cmd("baseline", "sasrec", f"sasrec.output_dir={d}", *SASREC),
              lambda d: tensors(d), lambda d: (lambda: time.time()), max_delay=8.0)
    if "eval" in args.stages:
        stage("eval", lambda d: latentr3_cmd("eval", f"--model={sft_ckpt}", *EVAL, f"eval.output_dir={d}"),
              eval_result, lambda d: (lambda: partial_lines(d / "recommendations.partial.jsonl")), max_delay=0.5)

    print("\n| stage | SIGKILLs | launches | identical to uninterrupted | seconds |\n|---|---:|---:|---|---:|")
    for name, kills, launches, same, secs in rows:
        print(f"| {name} | {kills} | {launches} | {'yes' if same else 'NO'} | {secs:.0f} |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
