"""The long fault-injection sweep: every stage SIGKILLed many times, each time resumed, compared with an
uninterrupted run.

For each stage (prepare, sft, grpo, sasrec, eval) the same command runs once uninterrupted, then again
under `--kills` seeded SIGKILLs (the first `--save-kills` of prepare, SFT, GRPO and SASRec while a save is
held open by LATENTR3_TEST_SLOW_SAVE, the others at a random moment after new progress), re-launched after
each kill until it exits 0.  Then the outputs are compared bit for bit:
prepare -> every file of the dataset; sft / grpo -> every tensor of best/ (and GRPO's last/) and done.json;
sasrec -> sasrec.safetensors and done.json; eval -> summary.json without its timing fields and the lists
in recommendations.jsonl.  One torch thread everywhere (the comparison is exact).  The stages (commands,
progress, saves in flight, results) are tests/faults.py's, shared with the CI kill tests
(tests/test_faults.py); this runs them on larger sizes ("sweep") and the embedded MovieLens-100K.

Run (from the repository root; ~1-2 h for 20 kills per stage on 2 cores):
    .venv/bin/python benchmarks/fault_sweep.py --kills 20 --out runs/fault_sweep
Options: --stages prepare sft grpo sasrec eval --seed 0 --save-kills 5
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from faults import STAGES, kill_stage, subprocess_env  # noqa: E402

# the longest a kill waits after fresh progress, per stage (a launch must not finish first)
MAX_DELAY = {"prepare": 1.5, "sft": 1.0, "grpo": 1.0, "sasrec": 1.0, "eval": 0.5}
# LATENTR3_TEST_SLOW_SAVE of the killed runs: prepare's pauses between files make the window its kills land
# in (2 s after the first file), so it always has them
SLOW = {"prepare": "0.5", "sft": "0.3", "grpo": "0.3", "sasrec": "1.0"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--save-kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--out", default="runs/fault_sweep")
    args = p.parse_args(argv)
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = subprocess_env(root / "cache")
    log = root / "log.txt"
    rows = []
    sft_ckpt = root / "sft_ref" / "best"
    # GRPO and eval start from the SFT checkpoint of this sweep
    stages = [s for s in STAGES if s in args.stages or (s == "sft" and {"grpo", "eval"} & set(args.stages))]
    for name in stages:
        t0 = time.time()
        save_kills = 0 if name == "eval" else args.save_kills
        rep, ref, killed = kill_stage(name, root, env, args.kills, args.seed, MAX_DELAY[name], save_kills=save_kills,
                                      slow_save=SLOW[name] if save_kills or name == "prepare" else None, size="sweep",
                                      init=sft_ckpt, log=log, timeout=1800.0)
        same = ref == killed
        rows.append((name, rep.kills, rep.launches, same, time.time() - t0))
        print(f"{name}: {rep.kills} kills, {rep.launches} launches, identical to the uninterrupted run: {same}",
              flush=True)

    print("\n| stage | SIGKILLs | launches | identical to uninterrupted | seconds |\n|---|---:|---:|---|---:|")
    for name, kills, launches, same, secs in rows:
        print(f"| {name} | {kills} | {launches} | {'yes' if same else 'NO'} | {secs:.0f} |")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
