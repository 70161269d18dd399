"""Device check: decoding, GRPO and SFT throughput at the real Qwen2.5-0.5B / 1.5B shapes on one GPU.

Run (from the repository root, only the working tree needed):

    bash benchmarks/device_check.sh            # one H200: both shapes, bf16 and fp32, <= 8 minutes
    bash benchmarks/device_check.sh --smoke    # tiny sizes on CPU, well under a minute (CI runs this)

Nothing is downloaded: the models are random-init Qwen2 built from config at the Qwen2.5-0.5B and
Qwen2.5-1.5B shapes (hidden 896 / 1536, 24 / 28 layers, 14 / 12 query heads, 2 KV heads, MLP 4864 / 8960,
tied embeddings, vocabulary 151936), the catalogue is synthetic (titles of `--words` made-up words),
the tokenizer a byte-level BPE trained here on it (`model.backbones.train_tiny_tokenizer`), prompts the
"paper" template over random histories, one latent token.

Fixed number of decode steps: a random init scores the titles nearly uniformly, so with titles of
different lengths how long a search runs would be noise.  Here every catalogue title has the same token
length (titles are filtered to the most common target length), so every user's search runs exactly that
many beam steps (all beams reach EOS at the same step), for HF, eager and static alike.

Printed for each shape and dtype:
* users/s of HF `generate` with beam search and a prefix-constrained logits processor
  (benchmarks/reference_decoder.py, fewer users: it is slow), of our eager step (eval.cuda_graphs=off)
  and of our static-shape step with CUDA graphs (on); the first static run (the graph captures) is not timed;
* the time of one beam step at 10 / 40 / 160 / 640 live beam rows (1 / 4 / 16 / 64 users of 10 beams),
  eager and graph;
* how many top-10 lists are identical: graph vs eager (both dtypes), HF (early_stopping="never") vs eager
  (fp32 only; near-ties of a random init make bf16 comparisons meaningless);
* GRPO samples/s (`training.grpo.grpo_step`, backbone frozen, LatentRATT trained) and SFT tokens/s of
  full fine-tuning (forward + backward + AdamW) with model-FLOP utilisation against the H200's dense peak
  (bf16 989 TFLOP/s; fp32 67 TFLOP/s without tensor cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reference_decoder import ReferenceDecoder  # noqa: E402

from latentr3.config import EvalConfig, GRPOConfig  # noqa: E402
from latentr3.data.prompts import PromptBuilder  # noqa: E402
from latentr3.data.splits import Catalogue  # noqa: E402
from latentr3.decoding.beam_search import BeamBatch  # noqa: E402
from latentr3.decoding.engine import DecodeRequest  # noqa: E402
from latentr3.evaluation.evaluate import build_trie, output_vocab_size, recommend_prompts  # noqa: E402
from latentr3.model.backbones import add_latent_token, tiny_tokenizer_corpus, train_tiny_tokenizer  # noqa: E402
from latentr3.model.latent_lm import LatentR3Model  # noqa: E402

SHAPES = {   # Qwen2.5 configs (config.json of the released checkpoints)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "smoke": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=0),   # 0: the tokenizer's size
}
PEAK_TFLOPS = {"bfloat16": 989.0, "float32": 67.0}   # H200 SXM dense
ITEM_NOUN = "music albums"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes on CPU (CI)")
    p.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"], choices=sorted(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--titles", type=int, default=5000)
    p.add_argument("--words", type=int, default=4, help="words per title (fixes the decode length)")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--hf-users", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--history", type=int, default=10)
    p.add_argument("--rows", type=int, nargs="+", default=[10, 40, 160, 640])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--grpo-prompts", type=int, default=16)
    p.add_argument("--sft-micro", type=int, default=8)
    p.add_argument("--skip-train", action="store_true", help="decoding only (no GRPO / SFT)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.dtypes = ["smoke"], ["float32"]
        args.titles, args.users, args.hf_users, args.batch, args.beams = 120, 6, 3, 3, 4
        args.history, args.rows, args.rounds, args.grpo_prompts, args.sft_micro = 3, [4, 8], 1, 4, 2
    return args


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def make_world(args):
    """Synthetic catalogue (every title the same token length), tokenizer, prompts, GRPO/SFT examples."""
    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "da", "pe", "gu", "ar", "el", "on", "be", "zo"]
    words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(400)})
    titles = sorted({" ".join(rng.choice(words) for _ in range(args.words)) for _ in range(args.titles)})
    tok = train_tiny_tokenizer(tiny_tokenizer_corpus(titles, ITEM_NOUN), 2000)
    builder = PromptBuilder(tok, "paper", ITEM_NOUN, 512, 1)
    lengths = [len(builder.target_ids(t)) for t in titles]
    common = Counter(lengths).most_common(1)[0][0]
    titles = [t for t, n in zip(titles, lengths) if n == common]
    catalogue = Catalogue(path="synthetic", ids=list(range(len(titles))), titles=titles)
    histories = [rng.sample(titles, args.history) for _ in range(max(args.users, max(args.rows) // args.beams))]
    prompts = [builder.prompt_ids(h) for h in histories]
    targets = [rng.choice(titles) for _ in histories]
    return dict(tok=tok, builder=builder, catalogue=catalogue, prompts=prompts, histories=histories,
                targets=targets, steps=common)


def make_model(shape: str, dtype, device, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    spec["vocab_size"] = spec["vocab_size"] or len(tok) + 1
    cfg = Qwen2Config(**spec, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-6, use_cache=True)
    torch.manual_seed(0)
    with torch.device(device):            # initialised on the device (a 1.5B init on the CPU is slow)
        backbone = Qwen2ForCausalLM(cfg).to(dtype)
    latent_id = add_latent_token(backbone, tok)
    return LatentR3Model(backbone, latent_id, num_latent=1).to(device=device).eval()   # LatentRATT stays fp32


def same_lists(a, b) -> int:
    return sum(x[0] == y[0] for x, y in zip(a, b))


def decode_checks(model, world, args, dtype_name, device) -> None:
    tok, trie = world["tok"], world["trie"]
    prompts = world["prompts"][: args.users]
    cfg = EvalConfig(batch_size=args.batch, num_beams=args.beams, top_k=args.beams, length_penalty=1.0)

    def ours(mode, ps=prompts):
        return recommend_prompts(model, trie, ps, tok.pad_token_id, dataclasses.replace(cfg, cuda_graphs=mode))

    results, speed = {}, {}
    for mode in ("off", "on"):
        ours(mode)   # warm-up (graphs captured on CUDA)
        times = []
        for _ in range(args.rounds):
            results[mode], dt = timed(lambda: ours(mode), device)
            times.append(dt)
        speed[mode] = len(prompts) / statistics.median(times)
    hf_prompts = prompts[: args.hf_users]
    ref = ReferenceDecoder(model, world["catalogue"].titles, world["builder"], tok.eos_token_id, tok.pad_token_id,
                           args.beams, args.beams, 1.0, "never")
    hf, dt = timed(lambda: ref.recommend(hf_prompts, args.batch), device)
    speed["hf"] = len(hf_prompts) / dt
    print(f"  users/s: HF generate {speed['hf']:.1f} ({len(hf_prompts)} users) | eager {speed['off']:.1f} | "
          f"static{'+graphs' if device.type == 'cuda' else ''} {speed['on']:.1f} ({len(prompts)} users, batch "
          f"{args.batch}, {world['steps']} steps per user); static / eager {speed['on'] / speed['off']:.2f}x")
    line = f"  identical top-{args.beams} lists: graph vs eager {same_lists(results['on'], results['off'])}/{len(prompts)}"
    if dtype_name == "float32":
        line += f", HF vs eager {same_lists(hf, results['off'][: len(hf_prompts)])}/{len(hf_prompts)}"
    print(line)
    for mode in ("off", "on"):
        print(f"  beam step ({'eager' if mode == 'off' else 'graph' if device.type == 'cuda' else 'static'}): " + ", ".join(
            f"{rows} rows {ms:.2f} ms" for rows, ms in step_times(model, world, args, mode, device)))


def step_times(model, world, args, mode, device):
    """Mean time of the beam steps that run exactly `rows` live beam rows (rows / K users, all beams live)."""
    K, tok = args.beams, world["tok"]
    batch = BeamBatch(model, world["trie"], tok.pad_token_id, K, K, 1.0, cuda_graphs=mode)
    out = []
    for rows in args.rows:
        users = max(1, rows // K)
        times = []
        for _ in range(2):          # the first pass warms up (captures the graphs), the second is timed
            times = []
            batch.admit([DecodeRequest(p, K) for p in world["prompts"][:users]])
            while len(batch):
                live = int(torch.isfinite(batch.act.sums).sum())
                _, dt = timed(batch.step, device)
                if live == users * K:
                    times.append(dt)
        out.append((users * K, 1000 * statistics.mean(times) if times else float("nan")))
    return out


def grpo_check(model, world, args, device) -> None:
    from bench_grpo import _OneProcess

    from latentr3.data.dataset import Example, collate
    from latentr3.training import grpo

    builder, tok = world["builder"], world["tok"]
    P, G, micro = args.grpo_prompts, 8, max(1, args.grpo_prompts // 4)
    ex = [Example(*builder.example(h, t), i) for i, (h, t) in
          enumerate(zip(world["histories"][:P], world["targets"][:P]))]
    batches = [{k: v.to(device) for k, v in collate(ex[i: i + micro], tok.pad_token_id).items()}
               for i in range(0, P, micro)]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    g = GRPOConfig(num_generations=G, noise_std=1.5, batch_size=P, micro_batch_size=micro)
    hidden = model.backbone.config.hidden_size
    noise = grpo.draw_noise(0, 0, P, G, 1, hidden, g.noise_std).to(device=device)
    opt = torch.optim.AdamW(model.latent_ratt.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    step = lambda: grpo.grpo_step(model, opt, sched, batches, noise, g, _OneProcess())  # noqa: E731
    step()
    _, dt = timed(step, device)
    print(f"  GRPO: {P * G / dt:.1f} samples/s ({P} prompts x {G} samples, micro {micro}, one step {dt:.2f} s)")
    for p in model.backbone.parameters():
        p.requires_grad_(True)


def sft_check(model, world, args, dtype_name, device) -> None:
    from bench_sft import model_flops_per_sample, train_step

    from latentr3.data.dataset import Example, collate

    builder, tok, m = world["builder"], world["tok"], args.sft_micro
    ex = [Example(*builder.example(h, t), i) for i, (h, t) in enumerate(zip(world["histories"], world["targets"]))]
    batches = [{k: v.to(device) for k, v in collate(ex[i: i + m], tok.pad_token_id).items()}
               for i in range(0, len(ex) - m + 1, m)][:4]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    train_step(model, opt, [batches[0]], "single")
    # input tokens: the prompt, the latent and t_1 .. t_{T-1}
    tokens = sum(int(b["prompt_mask"].sum() + b["target_mask"].sum()) for b in batches)
    _, dt = timed(lambda: [train_step(model, opt, [b], "single") for b in batches], device)
    model.eval()
    flops = model_flops_per_sample(model.backbone, [{k: v.cpu() for k, v in b.items()} for b in batches], 1, False)
    achieved = flops * len(batches) * m / dt
    mfu = f", MFU {achieved / (PEAK_TFLOPS[dtype_name] * 1e12):.1%} of the H200 {dtype_name} peak" \
        if device.type == "cuda" else ""
    print(f"  SFT (full fine-tune, micro {m}): {tokens / dt:.0f} tokens/s, {achieved / 1e12:.2f} model TFLOP/s{mfu}")


FAILED: list = []


def section(name: str, fn, *a) -> None:
    """Runs one part; a failure is printed and recorded (the exit status), the other parts still run."""
    try:
        fn(*a)
    except Exception as e:  # noqa: BLE001 - reported, then the next part
        import traceback

        FAILED.append(name)
        print(f"  {name} FAILED: {type(e).__name__}: {e}")
        traceback.print_exc()


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    t0 = time.perf_counter()
    world = make_world(args)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; {len(world['catalogue'].titles)} "
          f"titles of {world['steps']} tokens (= decode steps per user), {args.beams} beams, "
          f"prompts {statistics.mean(map(len, world['prompts'])):.0f} tokens")
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            model = make_model(shape, getattr(torch, dtype_name), device, world["tok"])
            world["trie"] = build_trie(world["catalogue"], world["builder"], output_vocab_size(model)).to(device)
            n = sum(p.numel() for p in model.backbone.parameters())
            print(f"{shape} {dtype_name} ({n / 1e6:.0f}M parameters) [{time.perf_counter() - t0:.0f} s]")
            section(f"{shape} {dtype_name} decoding", decode_checks, model, world, args, dtype_name, device)
            if not args.skip_train:
                section(f"{shape} {dtype_name} GRPO", grpo_check, model, world, args, device)
                section(f"{shape} {dtype_name} SFT", sft_check, model, world, args, dtype_name, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - t0:.0f} s" + (f"; FAILED: {', '.join(FAILED)}" if FAILED else ""))
    if FAILED:
        sys.exit(1)


if __name__ == "__main__":
    main()
