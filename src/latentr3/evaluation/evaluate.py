"""Evaluation recipe: constrained beam search over a split, HR@K / NDCG@K, popularity baseline.

Launch: `latentr3 eval --model <checkpoint> --split test [--config <yaml>] [key=value ...]`, or
`accelerate launch -m latentr3 eval ...`: the rows are split between processes by accelerate and the
recommendations gathered back, so the metrics equal a single-process run.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, EvalConfig
from ..data.dataset import load_catalogue, load_split, subsample
from ..data.prompts import PromptBuilder
from ..data.splits import Catalogue, Sample
from ..decoding.assistant import load_assistant, resolve_decoding
from ..decoding.beam_search import beam_search_prompts
from ..decoding.trie import ItemTrie
from ..model.latent_lm import LatentR3Model
from .diagnostics import diagnose_records
from .metrics import compute_metrics, popularity_ranking
from .report import (PopularityBins, build_evidence, render_evidence, render_lists, score_row,
                     significance_sentences)


@dataclass
class EvalResult:
    metrics: dict
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    decoded: int | None = None  # users decoded in `seconds` (fewer than the records after a resume)

    @property
    def users_per_second(self) -> float:
        n = len(self.records) if self.decoded is None else self.decoded
        return n / self.seconds if self.seconds else 0.0


PARTIAL_NAME = "recommendations.partial.jsonl"


def _read_partial(path: Path, fingerprint: dict) -> dict[int, dict] | None:
    """Records of an interrupted evaluation with the same fingerprint, by row index; None when the file
    belongs to another evaluation.  A torn last line (the kill hit an append) is left out; a bad line
    elsewhere is an error naming it."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    try:
        header = json.loads(lines[0]) if lines else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("fingerprint") != fingerprint:
        return None
    done: dict[int, dict] = {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):
                break  # torn append
            raise ValueError(f"{path} line {n}: not a JSON record; delete the file to re-evaluate") from None
        done[int(rec["index"])] = rec
    return done


def evaluate_resumable(model, tokenizer, builder: PromptBuilder, samples: list[Sample], catalogue: Catalogue,
                       cfg: EvalConfig, out: Path, fingerprint: dict) -> EvalResult:
    """`evaluate_samples` in chunks of cfg.resume_every users, each chunk appended (fsynced) to
    out/recommendations.partial.jsonl, so a killed evaluation re-run with the same settings decodes only
    the users not yet written.  Lists do not depend on which users share a batch, so the result equals an
    uninterrupted run's."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from ..atomic import atomic_open

    state = PartialState(cpu=not torch.cuda.is_available())
    partial = out / PARTIAL_NAME
    done: dict[int, dict] = {}
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        found = _read_partial(partial, fingerprint) if partial.exists() else None
        if found is None and partial.exists():
            print(f"{partial} belongs to another evaluation (model or settings differ): starting over")
        done = found or {}
        with atomic_open(partial) as f:  # header + the intact records (drops a torn last line)
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            for i in sorted(done):
                f.write(json.dumps(done[i], ensure_ascii=False) + "\n")
        if done:
            print(f"resuming evaluation: {len(done)} of {len(samples)} users already in {partial}")
    state.wait_for_everyone()
    if not state.is_main_process:
        done = _read_partial(partial, fingerprint) or {}
    todo = [i for i in range(len(samples)) if i not in done]
    chunk = cfg.resume_every if cfg.resume_every > 0 else max(len(todo), 1)
    bar = tqdm(total=len(samples), initial=len(done), desc="eval", unit="user",
               disable=not state.is_main_process)
    seconds = 0.0
    trie = build_trie(catalogue, builder, output_vocab_size(model)) if todo else None
    for start in range(0, len(todo), chunk):
        idx = todo[start: start + chunk]
        res = evaluate_samples(model, tokenizer, builder, [samples[i] for i in idx], catalogue, cfg, trie=trie)
        seconds += res.seconds
        recs = [{**r, "index": idx[r["index"]]} for r in res.records]
        if state.is_main_process:
            with partial.open("a", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        done.update((r["index"], r) for r in recs)
        bar.update(len(idx))
    bar.close()
    records = [done[i] for i in range(len(samples))]
    metrics = compute_metrics([r["predicted"] for r in records], [r["target"] for r in records],
                              title_counts(catalogue), reported_ks(cfg))
    return EvalResult(metrics, records, seconds, decoded=len(todo))


def build_trie(catalogue: Catalogue, builder: PromptBuilder, vocab_size: int) -> ItemTrie:
    """The trie over exactly the token ids the model is trained to emit (PromptBuilder.target_ids)."""
    seqs = [builder.target_ids(t) for t in catalogue.titles]
    return ItemTrie.build(seqs, catalogue.titles, catalogue.ids, vocab_size)


def reported_ks(cfg: EvalConfig) -> list[int]:
    """Cut-offs that the top_k list can answer."""
    return [k for k in cfg.ks if k <= cfg.top_k]


def title_counts(catalogue: Catalogue) -> Counter:
    return Counter(catalogue.titles)


def output_vocab_size(model: LatentR3Model) -> int:
    return model.backbone.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def recommend_prompts(model: LatentR3Model, trie: ItemTrie, prompts: list[list[int]], pad_id: int,
                      cfg: EvalConfig, progress=None, histories: list[list[int]] | None = None,
                      assistant=None) -> list[tuple[list[str], list[float]]]:
    """Top titles for each tokenized prompt, up to cfg.batch_size users decoded at once.

    cfg.decoding presets apply; with an `assistant` (decoding.assistant.TrieAssistant) the history item
    ids of each prompt (`histories`) give its text-free scores (D3).
    """
    cfg = resolve_decoding(cfg)
    if assistant is not None and histories is None:
        raise ValueError("an assistant needs the history item ids of every prompt")
    # Shorter prompts first: users decoded together then have similar prompt lengths (less padding).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    scores_of = None
    if assistant is not None:
        scores_of = lambda idx: assistant.scores([histories[order[i]] for i in idx], model.device)  # noqa: E731
    res = beam_search_prompts(model, trie, [prompts[i] for i in order], pad_id, cfg.batch_size, cfg.num_beams,
                              cfg.top_k, cfg.length_penalty, scores_of, refill=cfg.refill, progress=progress,
                              cuda_graphs=cfg.cuda_graphs)
    out: list = [None] * len(prompts)
    for j, i in enumerate(order):
        out[i] = (res.titles[j], res.scores[j])
    return out


def evaluate_samples(model: LatentR3Model, tokenizer, builder: PromptBuilder, samples: list[Sample],
                     catalogue: Catalogue, cfg: EvalConfig, accelerator=None, progress: bool = False,
                     trie: ItemTrie | None = None) -> EvalResult:
    """Recommends for every sample and scores the lists; rows are shared out between processes."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo group under torchrun
    cfg = resolve_decoding(cfg)
    was_training = model.training
    model.eval()
    trie = trie or build_trie(catalogue, builder, output_vocab_size(model))
    trie = trie.to(model.device)
    assistant = load_assistant(cfg, trie, model.device)
    t0 = time.time()
    indices = list(range(len(samples)))
    with state.split_between_processes(indices) as mine:
        prompts = [builder.prompt_ids(samples[i].history_titles) for i in mine]
        bar = tqdm(total=len(mine), desc="eval", unit="user", disable=not (progress and state.is_main_process))
        recs = recommend_prompts(model, trie, prompts, tokenizer.pad_token_id, cfg, bar,
                                 [samples[i].history_ids for i in mine], assistant)
        bar.close()
        local = [{"index": i, "history": samples[i].history_titles, "target": samples[i].target_title,
                  "target_id": samples[i].target_id, "predicted": titles, "scores": scores}
                 for i, (titles, scores) in zip(mine, recs)]
    records = gather_object(local) if state.num_processes > 1 else local
    records = sorted({r["index"]: r for r in records}.values(), key=lambda r: r["index"])
    seconds = time.time() - t0
    if was_training:
        model.train()
    metrics = compute_metrics([r["predicted"] for r in records], [r["target"] for r in records],
                              title_counts(catalogue), reported_ks(cfg))
    return EvalResult(metrics, records, seconds)


def popularity_metrics(source: list[Sample], samples: list[Sample], catalogue: Catalogue,
                       cfg: EvalConfig) -> dict:
    """The title-popularity baseline: the source split's most frequent target titles, for everyone."""
    top = popularity_ranking([s.target_title for s in source], cfg.top_k)
    return compute_metrics([top] * len(samples), [s.target_title for s in samples], title_counts(catalogue),
                           reported_ks(cfg))


def builder_for_checkpoint(tokenizer, meta: dict, num_latent: int) -> PromptBuilder:
    return PromptBuilder(tokenizer, meta.get("template", "paper"), meta.get("item_noun", "items"),
                         meta.get("cutoff_len", 512), num_latent)


def _manifest_digest(ckpt: Path) -> str:
    """sha256 of the checkpoint's MANIFEST.json: a partial evaluation of other weights is never reused."""
    import hashlib

    m = ckpt / "MANIFEST.json"
    return hashlib.sha256(m.read_bytes()).hexdigest() if m.exists() else ""


def checkpoint_label(path: str) -> str:
    """The row label of a checkpoint: its last two path parts ("sft/best", "grpo/best")."""
    parts = Path(path).resolve().parts
    return "/".join(parts[-2:])


def evaluate_sasrec(model_dir: str | Path, samples: list[Sample], catalogue: Catalogue, cfg: EvalConfig,
                    title_score: str = "max"):
    """An EvalResult for a SASRec checkpoint, records in the LLM eval's format (full-catalogue ranking of
    item ids -> distinct titles, see baselines/sasrec.py)."""
    from ..baselines.sasrec import SASRecRecommender, recommend_titles, resolve_device

    rec = SASRecRecommender.from_pretrained(model_dir, resolve_device("auto"))
    t0 = time.time()
    recs = recommend_titles(rec, [s.history_ids for s in samples], catalogue, cfg.top_k, title_score)
    seconds = time.time() - t0
    records = [{"index": i, "history": s.history_titles, "target": s.target_title, "target_id": s.target_id,
                "predicted": titles, "scores": scores} for i, (s, (titles, scores)) in enumerate(zip(samples, recs))]
    metrics = compute_metrics([r["predicted"] for r in records], [r["target"] for r in records],
                              title_counts(catalogue), reported_ks(cfg))
    return EvalResult(metrics, records, seconds)


def run_eval(cfg: Config) -> dict:
    """The `latentr3 eval` command: evaluate a checkpoint on a split, write records and a summary."""
    from accelerate import PartialState

    from ..model.build import resolve_dtype

    from ..baselines.sasrec import is_sasrec_checkpoint

    e = cfg.eval
    if not e.model:
        raise ValueError("eval.model (--model) must name a checkpoint directory")
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only: gloo group under torchrun
    device = state.device
    catalogue = load_catalogue(cfg.data)
    samples = subsample(load_split(cfg.data, e.split, catalogue), e.sample, e.seed)
    extra: dict = {}
    if is_sasrec_checkpoint(e.model):
        # full-catalogue ranking of item ids -> distinct titles (see baselines/sasrec.py)
        result = evaluate_sasrec(e.model, samples, catalogue, e, cfg.sasrec.title_score)
        label = f"{checkpoint_label(e.model)} (SASRec)"
        extra = {"recommender": "sasrec", "title_score": cfg.sasrec.title_score}
    else:
        e = resolve_decoding(e)
        model, tokenizer, meta = LatentR3Model.from_pretrained(e.model, resolve_dtype(e.dtype, device), device)
        builder = builder_for_checkpoint(tokenizer, meta, model.num_latent)
        fingerprint = {"model": str(Path(e.model).resolve()), "split": e.split, "rows": len(samples),
                       "sample": e.sample, "seed": e.seed, "num_beams": e.num_beams, "top_k": e.top_k,
                       "length_penalty": e.length_penalty, "decoding": e.decoding, "assistant": e.assistant,
                       "assistant_weight": e.assistant_weight, "dtype": e.dtype,
                       "checkpoint": _manifest_digest(Path(e.model))}
        result = evaluate_resumable(model, tokenizer, builder, samples, catalogue, e, Path(e.output_dir),
                                    fingerprint)
        label = f"{checkpoint_label(e.model)} (LLM, {model.num_latent} latent)"
        extra = {"decoding": e.decoding, "assistant": e.assistant if e.assistant_weight else "",
                 "assistant_weight": e.assistant_weight if e.assistant else 0.0}
        if e.diagnostics_sample:
            extra["diagnostics"] = diagnose_records(model, builder, result.records, catalogue, e,
                                                    cfg.grpo.noise_std, e.diagnostics_sample)

    pop_source = e.popularity_source or "train"
    pop_rows = load_split(cfg.data, pop_source, catalogue)
    pop_label = f"popularity ({pop_source} targets)"
    train_rows = pop_rows if pop_source == "train" else load_split(cfg.data, "train", catalogue)
    pop_list = popularity_ranking([s.target_title for s in pop_rows], e.top_k)
    evidence = table_evidence(
        {label: [[r["predicted"] for r in result.records]], pop_label: [[pop_list] * len(samples)]},
        samples, train_rows, catalogue, e, reference=pop_label)
    rows = {label: result.metrics, pop_label: evidence["rows"][pop_label]["metrics"]}
    summary = {"model": e.model, "split": e.split, "rows": len(samples), "metrics": result.metrics,
               "popularity": rows[pop_label], "evidence": evidence, "seconds": result.seconds,
               "users_per_second": result.users_per_second, "num_beams": e.num_beams,
               "length_penalty": e.length_penalty, "processes": state.num_processes, **extra}
    if state.is_main_process:
        from ..atomic import atomic_open, atomic_write_json

        out = Path(e.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / "recommendations.jsonl") as f:
            for r in result.records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        atomic_write_json(out / "summary.json", summary)
        (out / PARTIAL_NAME).unlink(missing_ok=True)
        print(f"\n{len(samples)} {e.split} rows, {result.users_per_second:.1f} users/s; "
              f"share of targets whose title is not unique: {result.metrics['share_nonunique_target_titles']:.3f}")
        print("\n" + render_tables(evidence, reported_ks(e)))
        if "diagnostics" in extra:
            print(render_diagnostics({label: extra["diagnostics"]}))
        print(f"written: {out / 'recommendations.jsonl'}, {out / 'summary.json'}")
    return summary


def table_evidence(lists: dict[str, list[list[list[str]]]], samples: list[Sample], train_rows: list[Sample],
                   catalogue: Catalogue, cfg: EvalConfig, reference: str | None) -> dict:
    """Intervals, paired tests, popularity groups and list statistics (evaluation/report.py) of a table
    whose rows are given as their top-K lists (one set per seed) over `samples`, in order."""
    ks = reported_ks(cfg)
    counts = title_counts(catalogue)
    n_titles = len(counts)
    scored = {name: score_row(per_seed, [s.target_title for s in samples], counts, ks, n_titles)
              for name, per_seed in lists.items()}
    bins = PopularityBins.from_targets([s.target_id for s in train_rows])
    return build_evidence(scored, [s.target_id for s in samples], bins, reference, ks, cfg.bootstrap,
                          cfg.bootstrap_seed, cfg.ci_level)


def render_diagnostics(rows: dict[str, dict]) -> str:
    """Markdown: the latent diagnostics (evaluation/diagnostics.py) of each LLM row."""
    lines = ["## Latent diagnostics (evaluation/diagnostics.py)\n",
             "| method | users | ‖r‖ | noise σ√d | σ√d / ‖r‖ | attention entropy / log(tokens) | "
             "Δ target log-prob, latent vs zeroed | rank corr(reward, NDCG@10) |", "|---|" + "---:|" * 7]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, d in rows.items():
        if not d.get("num_latent"):
            lines.append(f"| {name} | {d.get('users', 0):.0f} | (no latent) | | | | | |")
            continue
        lines.append(f"| {name} | {d['users']:.0f} | {fmt(d.get('latent_norm'), '.2f')} | {d['noise_norm']:.2f} | "
                     f"{fmt(d.get('noise_to_latent'), '.2f')} | {fmt(d.get('attention_entropy_ratio'), '.3f')} | "
                     f"{fmt(d.get('logprob_gain'), '+.3f')} | {fmt(d.get('reward_ndcg_spearman'), '+.3f')} |")
    return "\n".join(lines) + "\n"


def render_tables(evidence: dict, ks: list[int]) -> str:
    """Both protocols' tables with intervals and the paired columns, then the list statistics."""
    parts = [f"{evidence['method']}; Δ: row minus the reference row ({evidence['reference']}), "
             f"* = interval excludes 0.\n"]
    for protocol, what in (("legacy", "title match, the paper's protocol"),
                           ("item", "item level: a title shared by m items counts 1/m")):
        parts.append(f"## {protocol} ({what})\n\n{render_evidence(evidence, ks, protocol)}")
    parts.append(f"## What the lists look like (item level @{evidence['k']})\n\n{render_lists(evidence)}")
    parts.append("\n".join(significance_sentences(evidence)) + "\n")
    return "\n".join(parts)
