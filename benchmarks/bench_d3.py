"""Cost of D3's text-free assistant per user, relative to the plain constrained beam search.

Run:  .venv/bin/python benchmarks/bench_d3.py [--sasrec runs/cds_sasrec] [--users 64 --batch 8 --beams 10
      --rounds 5 --threads 1]

Shape (as benchmarks/bench_eval.py): a random-init tiny Qwen2 (hidden 128, 2 layers) with a BPE tokenizer
(vocab 8000) trained on the CDs & Vinyl catalogue titles, one latent token, the "paper" prompt, the first
`--users` rows of test.csv, 10 beams, top-10, fp32 on CPU.  The assistant is the SASRec checkpoint given
with --sasrec (else a random-init SASRec over the catalogue: same cost).

Timed, all through `latentr3.evaluation.evaluate.recommend_prompts`, alternating round by round in one
process (the machine is noisy: ratios of medians, never absolute times across runs):
    plain    length penalty 0, no assistant
    d3       length penalty 0 + assistant (SASRec forward + subtree sums per batch, one gather per edge per step)
    d3~0     the same with weight 1e-12: every assistant operation runs but the search is plain's (same
             beams, same steps), so d3~0 / plain is the assistant's pure overhead
    bigrec   length penalty 1, no assistant (for reference)
The assistant also changes the search itself (which beams live, how many steps until the exact stopping
test holds), so d3 / plain mixes overhead and a different amount of LLM work; the LLM rows decoded per
run are counted and printed.  Also timed alone: the per-batch set-up (`TrieAssistant.scores`).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from latentr3.baselines.sasrec import SASRec, SASRecRecommender
from latentr3.config import EvalConfig
from latentr3.data.prompts import PromptBuilder
from latentr3.data.splits import read_catalogue, read_split
from latentr3.decoding.assistant import TrieAssistant
from latentr3.evaluation.evaluate import build_trie, output_vocab_size, recommend_prompts
from latentr3.model.backbones import add_latent_token, tiny_qwen2, tiny_tokenizer_corpus, train_tiny_tokenizer
from latentr3.model.latent_lm import LatentR3Model

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "cds_and_vinyl"))
    p.add_argument("--sasrec", default="", help="SASRec checkpoint (default: a random-init one)")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = Path(args.data)
    catalogue = read_catalogue(data / "info.txt")
    samples = read_split(data / "test.csv", catalogue)[: args.users]
    tok = train_tiny_tokenizer(tiny_tokenizer_corpus(catalogue.titles, "CDs"), 8000)
    backbone = tiny_qwen2(len(tok), hidden=128, layers=2, seed=0)
    latent_id = add_latent_token(backbone, tok)
    torch.manual_seed(0)
    model = LatentR3Model(backbone, latent_id, num_latent=1).eval()
    builder = PromptBuilder(tok, "paper", "CDs", 512, 1)
    trie = build_trie(catalogue, builder, output_vocab_size(model))
    prompts = [builder.prompt_ids(s.history_titles) for s in samples]
    histories = [s.history_ids for s in samples]
    if args.sasrec:
        rec = SASRecRecommender.from_pretrained(args.sasrec)
    else:
        torch.manual_seed(0)
        rec = SASRecRecommender(SASRec(len(catalogue.ids), 64, 2, 1, 10, 0.0), catalogue.ids)
    assistant = TrieAssistant(rec, trie, args.weight)
    shadow = TrieAssistant(rec, trie, 1e-12)
    rows = {"n": 0}
    run_model = model._run

    def counting_run(inputs_embeds, *a, **k):      # counts the LLM rows each decoder runs
        rows["n"] += inputs_embeds.shape[0]
        return run_model(inputs_embeds, *a, **k)

    model._run = counting_run
    print(f"{trie!r}; {len(samples)} users, batch {args.batch}, {args.beams} beams")

    cfgs = {"plain": EvalConfig(batch_size=args.batch, num_beams=args.beams, top_k=args.beams, length_penalty=0.0),
            "bigrec": EvalConfig(batch_size=args.batch, num_beams=args.beams, top_k=args.beams, length_penalty=1.0)}
    cfgs["d3"] = cfgs["plain"]
    pad = tok.pad_token_id

    cfgs["d3~0"] = cfgs["plain"]
    names = ("plain", "d3", "d3~0", "bigrec")

    def run(name):
        if name in ("d3", "d3~0"):
            return recommend_prompts(model, trie, prompts, pad, cfgs[name], histories=histories,
                                     assistant=assistant if name == "d3" else shadow)
        return recommend_prompts(model, trie, prompts, pad, cfgs[name])

    def setup_only():
        for s in range(0, len(histories), args.batch):
            assistant.scores(histories[s: s + args.batch])

    outs, llm_rows = {}, {}
    for name in names:                                                    # warm-up + results
        rows["n"] = 0
        outs[name] = run(name)
        llm_rows[name] = rows["n"]
    changed = sum(a[0] != b[0] for a, b in zip(outs["plain"], outs["d3"]))
    assert [o[0] for o in outs["d3~0"]] == [o[0] for o in outs["plain"]], "w=1e-12 changed the search"
    times: dict[str, list[float]] = {k: [] for k in (*names, "setup")}
    for _ in range(args.rounds):
        for name in names:
            t = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        setup_only()
        times["setup"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 / len(samples) for k, v in times.items()}
    print(f"ms/user (median of {args.rounds} rounds): plain {med['plain']:.2f}, d3 {med['d3']:.2f}, "
          f"d3~0 {med['d3~0']:.2f}, bigrec {med['bigrec']:.2f}; assistant set-up alone {med['setup']:.2f}")
    print(f"LLM rows decoded: {llm_rows}")
    print(f"d3 / plain = {med['d3'] / med['plain']:.3f}  (target <= 1.3; includes the different search: "
          f"{llm_rows['d3'] / llm_rows['plain']:.3f}x the LLM rows)")
    print(f"d3~0 / plain = {med['d3~0'] / med['plain']:.3f}  (pure assistant overhead, same search)")
    print(f"d3 / bigrec = {med['d3'] / med['bigrec']:.3f}")
    print(f"per-round ratios d3/plain: {[round(d / p_, 3) for d, p_ in zip(times['d3'], times['plain'])]}; "
          f"d3~0/plain: {[round(d / p_, 3) for d, p_ in zip(times['d3~0'], times['plain'])]}")
    print(f"users whose top-10 list the assistant changed: {changed}/{len(samples)}")


if __name__ == "__main__":
    main()
