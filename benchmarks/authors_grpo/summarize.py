"""Reads timing_rank*.json of one run and prints the AUTHORS samples/s line.

Timed seconds T = rank 0's wall time from the first on_step_begin to the last on_step_end: all N optimizer
steps, including the trainer's own per-step work between them (logging every step, fetching + collating
the next batch), excluding model load, data prep, trainer init and the final save.
samples/s = prompts/step x 8 x steps / T."""
import glob
import json
import os
import statistics
import sys

run, prompts, gens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ranks = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run, "timing_rank*.json")))]
r0 = [r for r in ranks if r["rank"] == 0][0]
steps = r0["global_step"]
T = r0["step_end"][-1] - r0["step_begin"][0]
per = [e - b for b, e in zip(r0["step_begin"], r0["step_end"])]
rest = per[1:] if len(per) > 1 else per
print(f"details: ranks {len(ranks)}, threads/rank {r0['threads']}, dtype {r0['dtype']}, device {r0['device']}; "
      f"sum of step_begin->step_end {sum(per):.3f} s; step 1 {per[0]:.3f} s, median of steps 2.. "
      f"{statistics.median(rest):.3f} s; HF train_runtime {r0['train_runtime']} s; "
      f"backend {r0.get('backend')}, model wrapped as {r0.get('wrapped')}, peak RSS/rank "
      f"{max(r['maxrss_mib'] for r in ranks):.0f} MiB; attention weights equal across ranks: "
      f"{len({r['attention_sha256'] for r in ranks}) == 1}")
print(f"AUTHORS samples/s: {prompts * gens * steps / T:.2f} (steps {steps}, prompts/step {prompts}, "
      f"samples/prompt {gens}, timed seconds {T:.3f})")
