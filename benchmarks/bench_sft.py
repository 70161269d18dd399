"""SFT training throughput: single-pass LatentR3Model.forward vs the two-pass reference design.

Both implementations train the same model (same weights, same optimizer) on the same micro-batches:
forward + backward + AdamW step.  They are interleaved in alternating blocks of steps within one run
(after warm-up steps that are not timed), so machine noise hits both alike.

Data: the CDs valid.csv at ../shared/data/cds_and_vinyl when present (the CDs release trains on valid),
otherwise the MovieLens-100K train split (embedded default, needs recbole).  Backbone: the tiny Qwen2
(hidden 128, 2 layers, vocab 4096), one latent token, micro-batch 16, cutoff 512.  Templates: "paper"
(the realistic Alpaca-style prompt) and "short".

Run (from the repository root; jemalloc lowers allocator noise):
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .venv/bin/python benchmarks/bench_sft.py --threads 1
On a shared 2-core machine use --threads 1: with torch's default (all cores) the OpenMP threads fight
other processes for the cores and both implementations slow down ~5x, with block-to-block noise larger
than the effect being measured.
Options: --rounds 6 --block 4 --warmup 3 --templates paper short --num-latent 1 --threads 0 (0 = torch default)
         --data DIR (a split directory) --profile (cProfile/torch.profiler summary of each implementation)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CDS = REPO.parent / "shared" / "data" / "cds_and_vinyl"


def load_rows(data: str | None):
    from latentr3.config import DataConfig
    from latentr3.data.dataset import load_catalogue, load_split

    if data:
        cfg = DataConfig(dir=data)
    elif (CDS / "valid.csv").exists():
        cfg = DataConfig(dir=str(CDS), train_split="valid", item_noun="music albums")
    else:
        cfg = DataConfig()  # embedded MovieLens-100K
    cat = load_catalogue(cfg)
    rows = load_split(cfg, "train", cat)
    return cfg, cat, rows


def make_batches(rows, tokenizer, template, item_noun, num_latent, micro, n_batches):
    from latentr3.data.dataset import collate, tokenize_samples
    from latentr3.data.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer, template, item_noun, 512, num_latent)
    exs = tokenize_samples(rows[: micro * n_batches], builder)
    batches = [collate(exs[i: i + micro], tokenizer.pad_token_id) for i in range(0, len(exs), micro)]
    prompt_tokens = statistics.mean(len(e.prompt) for e in exs)
    target_tokens = statistics.mean(len(e.target) for e in exs)
    return batches, prompt_tokens, target_tokens


def train_step(model, optimizer, batch, impl):
    fn = model if impl == "single" else model.two_pass_target_logprobs
    logp = fn(batch["prompt_ids"], batch["prompt_mask"], batch["target_ids"], batch["target_mask"])
    loss = -logp.sum() / batch["target_mask"].sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def bench_template(model, optimizer, batches, args):
    impls = ["single", "two_pass"]
    it = iter(range(10**9))

    def next_batch():
        return batches[next(it) % len(batches)]

    for _ in range(args.warmup):
        for impl in impls:
            train_step(model, optimizer, next_batch(), impl)
    elapsed = {i: 0.0 for i in impls}
    steps = {i: 0 for i in impls}
    per_round = {i: [] for i in impls}
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first
        for impl in order:
            t = time.perf_counter()
            for _ in range(args.block):
                # both implementations see the same batches in the same round
                train_step(model, optimizer, batches[(r * args.block + _) % len(batches)], impl)
            dt = time.perf_counter() - t
            elapsed[impl] += dt
            steps[impl] += args.block
            per_round[impl].append(args.block * args.micro / dt)
    return {i: (steps[i] * args.micro / elapsed[i], per_round[i]) for i in impls}


def profile(model, optimizer, batches, impl, n=3):
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(n):
            train_step(model, optimizer, batches[k % len(batches)], impl)
    print(f"\n--- torch.profiler, {impl}, {n} steps (top 15 by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--num-latent", type=int, default=1)
    p.add_argument("--templates", nargs="+", default=["paper", "short"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from latentr3.config import ModelConfig
    from latentr3.model.build import build_model

    cfg, cat, rows = load_rows(args.data)
    mcfg = ModelConfig(backbone="tiny", tiny_hidden=128, tiny_layers=2, tiny_heads=4, tiny_vocab=4096,
                       num_latent=args.num_latent)
    model, tok = build_model(mcfg, cat.titles, cfg.item_noun)
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    n_batches = args.rounds * args.block + args.warmup * 2 + 4

    jemalloc = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    print(f"data: {cfg.dir or 'MovieLens-100K (embedded)'} ({cfg.train_split}, {len(rows)} rows); "
          f"backbone tiny h128 L2 V{len(tok)}; num_latent {args.num_latent}; micro-batch {args.micro}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"jemalloc {'on' if jemalloc else 'off'}; {args.warmup} warm-up steps each, then {args.rounds} "
          f"alternating blocks of {args.block} steps each")
    results = []
    for template in args.templates:
        batches, ptok, ttok = make_batches(rows, tok, template, cfg.item_noun, args.num_latent, args.micro,
                                           n_batches)
        # sanity: both implementations compute the same thing on these batches
        with torch.no_grad():
            model.eval()
            b = batches[0]
            a = model(b["prompt_ids"], b["prompt_mask"], b["target_ids"], b["target_mask"])
            c = model.two_pass_target_logprobs(b["prompt_ids"], b["prompt_mask"], b["target_ids"],
                                               b["target_mask"])
            model.train()
        maxdiff = (a - c).abs().max().item()
        res = bench_template(model, optimizer, batches, args)
        results.append((template, ptok, ttok, res, maxdiff))
        if args.profile:
            profile(model, optimizer, batches, "single")
            profile(model, optimizer, batches, "two_pass")

    print()
    print("| template | prompt tok (mean) | target tok (mean) | single-pass samples/s | two-pass samples/s "
          "| ratio | per-block ratio min..max | max |logp diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for template, ptok, ttok, res, maxdiff in results:
        s, s_blocks = res["single"]
        t, t_blocks = res["two_pass"]
        ratios = [a / b for a, b in zip(s_blocks, t_blocks)]
        print(f"| {template} | {ptok:.0f} | {ttok:.1f} | {s:.1f} | {t:.1f} | {s / t:.2f}x | "
              f"{min(ratios):.2f}..{max(ratios):.2f} | {maxdiff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
