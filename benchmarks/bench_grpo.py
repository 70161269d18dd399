"""RL samples/s of the single-pass latent GRPO step vs a reference-style step.

Run (jemalloc for stable timings; `apt-get install -y libjemalloc2`):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .venv/bin/python benchmarks/bench_grpo.py --threads 1 --rounds 5

(--threads 1 keeps timings stable on a shared machine.)  Each round runs every variant for --block (10)
consecutive steps, in an order that rotates round by round (see the timing loop for why).

Measured on the 2-core dev box, 1 thread, jemalloc, 2 prompts x 8 samples (`--prompts 2 --micro 2
--rounds 6`), three runs alternating with the tree before the grouped step (7f0ee66, its timing loop
patched to the same blocks), whose "two passes, keep" variant is the step as it was when issue 15 was
filed: that one 314 / 293 / 321 samples/s, the current default 914 / 804 / 877 (2.91x / 2.74x / 2.73x);
the fused LM head + target log-prob (`linear_logprobs`) is 1.03-1.06x of it ("logits head" 886 / 772 /
824).  The timing loop before this one ran one step per variant per round in a fixed order (the
default always right after the reference step); with it, the same day, same trees (`--rounds 8`): as
filed 302 / 304 / 322, the current default 754 / 728 / 737 (2.49x / 2.40x / 2.29x); on earlier days as
filed 338 / 328 / 345 vs 748 / 753 / 763 (2.21-2.29x, before `linear_logprobs`), and on a slower day
158 / 191 / 212 vs 446 / 486 / 450.  At 32 prompts (`--prompts 32 --micro 8 --rounds 3 --block 5`,
two runs alternating with 7f0ee66): as filed 271 / 249, the current default 764 / 794 (2.82x / 3.19x),
"logits head" 646 / 655 (the fused head: 1.18x / 1.21x); earlier, with a 2-thread training run beside
it, 139 as filed, 278 then.  Where the
remaining ~16-21 ms go (1 thread): matmuls ~4 ms at ~190 GFLOP/s (this CPU's peak at these shapes), the
rest small kernels and their dispatch (prompt prefill ~3 ms, of which ~1 ms matmul).  Tried and not kept:
a hand-written backward for the frozen backbone (autograd bypassed, the LM head's log-softmax gradient
formed in the forward): same log-probs and gradients, 1.5 % faster; `torch.compile` of the grouped pass
+ log-softmax: 0.8x with dynamic shapes, 1.04x with static ones (recompiled for every new batch shape).
`--profile` (20 steps, by operator and by input shape), at 2 prompts, this tree: 17.9 ms of operator
time per step (20.8 ms with the logits head, whose log-softmax and its backward took 2.6 ms), the LM head's
two 144 x 128 x 4097 matmuls 2.9 ms, the six 144 x 128 x 512 MLP matmuls 1.0 ms.

Options: --prompts 16 --micro 4 --generations 8 --history 10 --rounds 3 --block 10 --threads 0 (0 = torch default)
--device cpu|cuda --hidden 128 --layers 2, --profile (torch profiler table of 20 steps of ours).

The reference step follows the authors' design: every prompt is repeated G times and run in full for
each of (1) the latent, (2) the old log-probs / rewards, (3) the latent again with grad and (4) the loss
over prompt + latent + target.  Ours (`latentr3.training.grpo.grpo_step`) runs each prompt once, shares
its KV cache with the G samples, and runs only latent + target tokens per sample; by default
(grpo.single_pass, num_iterations 1) the rollout's target pass keeps its graph and is the loss pass, the
two-pass variants run it again for the loss.  Both are full
optimizer steps on the same batch and noise; the variants are interleaved round by round.

Variants: "single pass (default)" is what `train_grpo` runs (grpo.single_pass, grpo.share_prompt_prefix:
the instruction prefilled once per run, the G samples as one set of queries over each prompt's KV);
"no shared" prefills whole prompts every step; "logits head" scores the targets from full (rows, vocab)
logits instead of `linear_logprobs`.

`reference_loss` is also the executable specification the tests compare our loss and gradients to.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from latentr3.config import GRPOConfig
from latentr3.model.latent_rollout import perplexity_reward
from latentr3.training.advantages import compute_advantages


# ------------------------------------------------------------------------------- reference-style step
def _expand(batch: dict, G: int) -> dict:
    return {k: v.repeat_interleave(G, dim=0) for k, v in batch.items() if k != "index"}


def reference_rollout(model, batch, noise, G):
    """(expanded batch, old log-probs, rewards (P, G)) with two full forwards per sample."""
    x = _expand(batch, G)
    noise = noise.reshape(-1, *noise.shape[-2:])
    with torch.no_grad():
        old = model.two_pass_target_logprobs(x["prompt_ids"], x["prompt_mask"], x["target_ids"], x["target_mask"],
                                             noise)
    return x, noise, old, perplexity_reward(old, x["target_mask"]).view(-1, G)


def reference_policy_loss(model, x, noise, old, adv, g: GRPOConfig):
    logp = model.two_pass_target_logprobs(x["prompt_ids"], x["prompt_mask"], x["target_ids"], x["target_mask"], noise)
    tm = x["target_mask"].to(logp.dtype)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - g.clip_eps_low, 1 + g.clip_eps_high) * a)
    return ((per_token * tm).sum(-1) / tm.sum(-1).clamp(min=1)).mean()


def reference_loss(model, batch, noise, G, g: GRPOConfig):
    """Loss of one micro-batch that is the whole batch (advantages on it alone)."""
    x, noise, old, rewards = reference_rollout(model, batch, noise, G)
    adv = compute_advantages(g.advantage, rewards).reshape(-1)
    return reference_policy_loss(model, x, noise, old, adv, g)


def reference_step(model, optimizer, micro_batches, noise, g: GRPOConfig):
    G = g.num_generations
    params = [p for p in model.parameters() if p.requires_grad]
    ros, k = [], 0
    for mb in micro_batches:
        P = mb["prompt_ids"].shape[0]
        ros.append(reference_rollout(model, mb, noise[k:k + P], G))
        k += P
    adv = compute_advantages(g.advantage, torch.cat([r[3] for r in ros]))
    k = 0
    for x, nz, old, rw in ros:
        P = rw.shape[0]
        loss = reference_policy_loss(model, x, nz, old, adv[k:k + P].reshape(-1), g)
        (loss / len(ros)).backward()
        k += P
    torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------- benchmark
def _words(rng, n):
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "da", "pe", "gu", "ch", "ar", "el", "on", "is",
            "be", "zo", "fi", "qu", "ma", "re", "tu", "xa", "ly", "om", "st", "wi", "ho", "ne"]
    return [" ".join("".join(rng.choice(syll) for _ in range(rng.randint(2, 4))).capitalize()
                     for _ in range(rng.randint(1, 4))) for _ in range(n)]


def _with_logits_head(step):
    """`step()` with the samples' target log-probs taken from full (rows, vocab) logits (LM head, then
    `gather_logprobs`) instead of `linear_logprobs`: what that fusion saves."""
    from latentr3.model import latent_rollout
    from latentr3.model.latent_lm import gather_logprobs

    fused = latent_rollout.linear_logprobs
    latent_rollout.linear_logprobs = lambda h, head, labels: gather_logprobs(head(h), labels)
    try:
        return step()
    finally:
        latent_rollout.linear_logprobs = fused


class _OneProcess:
    num_processes, process_index = 1, 0

    def gather(self, t):
        return t

    def reduce(self, t, reduction="sum"):
        return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=10, help="consecutive steps of a variant per round")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--profile", action="store_true", help="torch profiler table of 20 steps of ours")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from latentr3.data.dataset import collate
    from latentr3.data.prompts import PromptBuilder
    from latentr3.model.backbones import add_latent_token, tiny_qwen2, tiny_tokenizer_corpus, train_tiny_tokenizer
    from latentr3.model.latent_lm import LatentR3Model
    from latentr3.training import grpo
    from latentr3.training.common import adamw

    rng = random.Random(0)
    titles = _words(rng, 3000)
    tok = train_tiny_tokenizer(tiny_tokenizer_corpus(titles, "music albums"), 4096)
    dtype = getattr(torch, args.dtype)
    backbone = tiny_qwen2(len(tok), hidden=args.hidden, layers=args.layers, heads=4).to(dtype)
    latent_id = add_latent_token(backbone, tok)
    model = LatentR3Model(backbone, latent_id, 1).to(args.device).eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    builder = PromptBuilder(tok, "paper", "music albums", 512, 1)
    ex = []
    from latentr3.data.dataset import Example

    for i in range(args.prompts):
        hist = rng.sample(titles, args.history)
        ex.append(Example(*builder.example(hist, rng.choice(titles)), i))
    def micro_batches(examples):
        out = []
        for i in range(0, args.prompts, args.micro):
            b = collate(examples[i:i + args.micro], tok.pad_token_id)
            out.append({k: v.to(args.device) for k, v in b.items()})
        return out

    micro = micro_batches(ex)
    # what train_grpo does (grpo.share_prompt_prefix): the instruction prefilled once, prompts cut after it
    shared, cut = grpo.share_template_prefix(model, builder.template_prefix(), ex)
    micro_cut = micro_batches(cut)
    G = args.generations
    g = GRPOConfig(num_generations=G, noise_std=1.5, batch_size=args.prompts, micro_batch_size=args.micro)
    noise = grpo.draw_noise(0, 0, args.prompts, G, 1, args.hidden, g.noise_std).to(args.device)
    opt = adamw(model.latent_ratt.parameters(), 1e-6, 0.0)   # the optimizer train_grpo builds
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    lp = [len(e.prompt) for e in ex]
    lt = [len(e.target) for e in ex]
    print(f"device {args.device} {args.dtype}, threads {torch.get_num_threads()}; tiny Qwen2 hidden "
          f"{args.hidden} x {args.layers} layers, vocab {len(tok)}; paper template; {args.prompts} prompts "
          f"(micro {args.micro}) x {G} samples; prompt tokens {statistics.mean(lp):.0f} (max {max(lp)}), "
          f"target tokens {statistics.mean(lt):.1f}")

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    variants = {
        "reference (4 full forwards)": lambda: reference_step(model, opt, micro, noise, g),
        "ours, single pass (default)": lambda: grpo.grpo_step(model, opt, sched, micro_cut, noise, g,
                                                               _OneProcess(), shared=shared),
        "ours, single pass, no shared": lambda: grpo.grpo_step(model, opt, sched, micro, noise, g, _OneProcess()),
        "ours, single pass, logits head": lambda: _with_logits_head(
            lambda: grpo.grpo_step(model, opt, sched, micro_cut, noise, g, _OneProcess(), shared=shared)),
        "ours, two passes, keep": lambda: grpo.grpo_step(
            model, opt, sched, micro_cut, noise, GRPOConfig(**{**g.__dict__, "single_pass": False}), _OneProcess(),
            shared=shared),
        "ours, two passes, recompute": lambda: grpo.grpo_step(
            model, opt, sched, micro_cut, noise,
            GRPOConfig(**{**g.__dict__, "single_pass": False, "prefix_cache": "recompute"}), _OneProcess(),
            shared=shared),
    }
    if args.profile:
        from torch.profiler import profile

        for _ in range(3):
            variants["ours, single pass (default)"]()
        with profile(record_shapes=True) as prof:
            for _ in range(20):
                variants["ours, single pass (default)"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print("\nby input shape (self CPU ms per step, calls per step, shapes):")
        rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)[:20]
        for e in rows:
            print(f"  {e.self_cpu_time_total / 20e3:7.2f} ms {e.count / 20:5.1f}x  {e.key:40.40s} {e.input_shapes}")
        return
    times = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    names = list(variants)
    for r in range(args.rounds):
        # Each round runs every variant for --block consecutive steps (as training does; the reference,
        # ~25x slower, one step), in an order that rotates round by round.  Single interleaved steps
        # measured the cache state the previous variant left: a step right after the reference ran ~10 %
        # slower, and a variant allocating other buffers than its neighbour paid for that.
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = variants[name], 1 if name.startswith("reference") else args.block
            sync()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times[name].append((time.perf_counter() - t) / n)
    samples = args.prompts * G
    ref = statistics.median(times["reference (4 full forwards)"])
    print(f"\n{'step':32s} {'median s/step':>14s} {'samples/s':>10s} {'speed-up':>9s}  per-round s")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:32s} {m:14.3f} {samples / m:10.1f} {ref / m:8.1f}x  {' '.join(f'{t:.3f}' for t in ts)}")


if __name__ == "__main__":
    main()
