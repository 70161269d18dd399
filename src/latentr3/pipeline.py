"""`latentr3 run`: the whole LatentR3 pipeline, ending with a comparison table.

Launch: `latentr3 run --config configs/demo.yaml` (CPU), or `accelerate launch -m latentr3 run --config
<paper config>` on GPUs.  Stages, each in its own sub-directory of run.output_dir, each skipped when it
has completed and resumed when it was interrupted:

    data/            the resolved split files' sizes
    sft/             latent SFT (stage 1)
    sft_no_latent/   the same backbone fine-tuned without a latent token (the "w/o reasoning" ablation)
    grpo/            latent GRPO on sft/best (stage 2)
    sasrec/          the SASRec baseline over item ids (run.sasrec; also the D3 assistant)
    eval/<row>/      constrained beam search on the test split, per model
    seed_<s>/        with run.seeds: all of the training stages and eval/ above, once per seed
    results.md, results.json, *.png  (intervals, paired tests, popularity groups: evaluation/report.py)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .atomic import atomic_write_json, atomic_write_text
from .config import Config, save_config
from .data.dataset import data_dir, load_catalogue, load_split, split_path, subsample, train_and_valid


def _stage_cfg(cfg: Config, **sections) -> Config:
    new = copy.deepcopy(cfg)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(new, section), key, value)
    return new


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _eval_stage(cfg: Config, ckpt: Path, out: Path) -> tuple[dict, list[list[str]]]:
    """The test evaluation of one checkpoint (skipped when done) and its lists, in test-row order."""
    from accelerate import PartialState

    from .evaluation.evaluate import run_eval

    if not (out / "summary.json").exists():
        run_eval(_stage_cfg(cfg, eval__model=str(ckpt), eval__output_dir=str(out), eval__split="test"))
    PartialState().wait_for_everyone()  # the main process wrote the files
    records = [json.loads(line) for line in (out / "recommendations.jsonl").read_text().splitlines() if line]
    records.sort(key=lambda r: r["index"])
    return _read_json(out / "summary.json"), [r["predicted"] for r in records]


def _seeded(cfg: Config, seed: int | None) -> Config:
    if seed is None:
        return cfg
    return _stage_cfg(cfg, sft__seed=seed, grpo__seed=seed, sasrec__seed=seed, model__init_seed=seed)


def _train_and_eval(cfg: Config, root: Path, splits: dict, state) -> dict[str, dict]:
    """Every training stage of one seed under `root`, each model evaluated on the test split.

    Returns {row name: {"lists": top-K lists per test row, "summary": eval summary, "train_seconds"}}."""
    from .training.sft import train_sft

    timings: dict[str, float] = {}
    models: dict[str, Path] = {}
    if cfg.run.no_latent_baseline:
        models[NO_LATENT] = train_sft(_stage_cfg(
            cfg, sft__output_dir=str(root / "sft_no_latent"), model__num_latent=0))
        timings[NO_LATENT] = _read_json(root / "sft_no_latent" / "done.json").get("train_seconds", 0.0)
    sft_best = train_sft(_stage_cfg(cfg, sft__output_dir=str(root / "sft")))
    sft_time = _read_json(root / "sft" / "done.json").get("train_seconds", 0.0)
    models["latent SFT (stage 1)"] = sft_best
    timings["latent SFT (stage 1)"] = sft_time
    if cfg.run.grpo:
        from .training.grpo import train_grpo

        grpo_best = train_grpo(_stage_cfg(cfg, grpo__init=str(sft_best), grpo__output_dir=str(root / "grpo")))
        models["LatentR3 (SFT + GRPO)"] = grpo_best
        timings["LatentR3 (SFT + GRPO)"] = sft_time + _read_json(root / "grpo" / "done.json").get(
            "train_seconds", 0.0)

    # --- SASRec baseline (item ids, no text); trained by the main process only
    sasrec_dir = None
    if cfg.run.sasrec:
        from .baselines.sasrec import train_sasrec

        sasrec_dir = root / "sasrec"
        if state.is_main_process:
            train_sasrec(_stage_cfg(cfg, sasrec__output_dir=str(sasrec_dir)))
        state.wait_for_everyone()
        timings["SASRec (item ids)"] = _read_json(sasrec_dir / "done.json").get("train_seconds", 0.0)
    # the D3 preset's assistant defaults to the run's SASRec
    assistant = cfg.eval.assistant or (str(sasrec_dir) if sasrec_dir else "")
    if cfg.eval.decoding == "d3" and not cfg.eval.assistant and assistant:
        cfg = _stage_cfg(cfg, eval__assistant=assistant)
    if cfg.run.d3:
        if not assistant:
            raise ValueError("run.d3 needs eval.assistant or run.sasrec=true (the D3 assistant)")
        final = next(n for n in ("LatentR3 (SFT + GRPO)", "latent SFT (stage 1)") if n in models)
        d3_models = {f"{final.split(' (')[0]}, D3 decoding (+SASRec assistant)": (models[final], final)}
    else:
        d3_models = {}

    # --- evaluation on the test split
    rows: dict[str, dict] = {}

    def add_row(name: str, evaluated: tuple[dict, list], train_seconds: float | None) -> None:
        summary, lists = evaluated
        rows[name] = {"lists": lists, "summary": summary, "train_seconds": train_seconds}
    for i, (name, ckpt) in enumerate(models.items()):
        add_row(name, _eval_stage(cfg, ckpt, root / "eval" / f"{i}_{Path(ckpt).parent.name}"), timings.get(name))
    for name, (ckpt, base) in d3_models.items():
        add_row(name, _eval_stage(_stage_cfg(cfg, eval__decoding="d3", eval__assistant=assistant), ckpt,
                                  root / "eval" / f"d3_{Path(ckpt).parent.name}"), timings.get(base))
    if sasrec_dir is not None:
        name = "SASRec (item ids)"
        add_row(name, _eval_stage(cfg, sasrec_dir, root / "eval" / "sasrec"), timings.get(name))
    return rows


NO_LATENT = "SFT w/o latent (BIGRec-style)"
POP_ALL, POP_RECENT = "popularity, all-time (train targets)", "popularity, recent (valid targets)"


def run_pipeline(cfg: Config) -> dict:
    from accelerate import PartialState

    from .evaluation.evaluate import table_evidence
    from .evaluation.metrics import popularity_ranking

    state = PartialState()
    root = Path(cfg.run.output_dir)
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, root / "config.yaml")

    # --- data: the rows the stages use (train/valid after data.valid_holdout), not the files' sizes
    catalogue = load_catalogue(cfg.data)
    train_rows, valid_rows = train_and_valid(cfg.data, catalogue)
    splits = {"train": train_rows, "valid": valid_rows, "test": load_split(cfg.data, "test", catalogue)}
    if state.is_main_process:
        (root / "data").mkdir(exist_ok=True)
        files = {role: str(split_path(cfg.data, role)) for role in ("train", "valid", "test")}
        if cfg.data.valid_holdout > 0:
            files["valid"] = f"the last {len(valid_rows)} rows of {files['train']} (data.valid_holdout)"
        atomic_write_json(root / "data" / "summary.json", {
            "dir": str(data_dir(cfg.data)), "items": len(catalogue), "distinct_titles": len(set(catalogue.titles)),
            **{f"{k}_rows": len(v) for k, v in splits.items()}, "valid_holdout": cfg.data.valid_holdout,
            "files": files})

    # --- training and test evaluation, once per seed (run.seeds) or once with the config's seeds
    seeds: list[int | None] = list(cfg.run.seeds) or [None]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"run.seeds repeats a seed: {cfg.run.seeds}")
    per_seed = {}
    for seed in seeds:
        seed_root = root if seed is None else root / f"seed_{seed}"
        per_seed[seed] = _train_and_eval(_seeded(cfg, seed), seed_root, splits, state)

    # --- the table: popularity rows (seed-free) first, then the models, all on the same test rows
    e = cfg.eval
    test_rows = subsample(splits["test"], e.sample, e.seed)  # the rows run_eval scores
    lists = {POP_ALL: [[popularity_ranking([s.target_title for s in splits["train"]], e.top_k)] * len(test_rows)],
             POP_RECENT: [[popularity_ranking([s.target_title for s in splits["valid"]], e.top_k)] * len(test_rows)]}
    extra: dict[str, dict] = {}
    for name in per_seed[seeds[0]]:
        runs = [per_seed[s][name] for s in seeds]
        for r in runs:
            if len(r["lists"]) != len(test_rows):
                raise ValueError(f"{name}: its evaluation scored {len(r['lists'])} test rows, the table "
                                 f"{len(test_rows)}; delete its eval/ directory to re-evaluate")
        lists[name] = [r["lists"] for r in runs]
        ups = [r["summary"].get("users_per_second") for r in runs]
        secs = [r["train_seconds"] for r in runs if r["train_seconds"] is not None]
        extra[name] = {"ms_per_user": 1000.0 / (sum(ups) / len(ups)) if all(ups) else None,
                       "train_seconds": sum(secs) / len(secs) if secs else None}
        diags = [r["summary"]["diagnostics"] for r in runs if "diagnostics" in r["summary"]]
        if diags:
            extra[name]["diagnostics"] = _mean_over_seeds(diags)
    reference = NO_LATENT if NO_LATENT in lists else POP_RECENT
    evidence = table_evidence(lists, test_rows, splits["train"], catalogue, e, reference)
    rows = {name: row["metrics"] for name, row in evidence["rows"].items()}

    # --- report
    result = {"data": _read_json(root / "data" / "summary.json"), "rows": rows, "extra": extra,
              "evidence": evidence, "seeds": [s for s in seeds if s is not None],
              "num_beams": e.num_beams, "length_penalty": e.length_penalty}
    text = render_report(evidence, extra, cfg)
    if state.is_main_process:
        atomic_write_json(root / "results.json", result)
        atomic_write_text(root / "results.md", text)
        if cfg.run.plots:
            from .plots import plot_run

            curves = root if seeds[0] is None else root / f"seed_{seeds[0]}"
            plot_run(root, evidence, curves_root=curves)
        print("\n" + text)
    return result


def _mean_over_seeds(dicts: list[dict]) -> dict:
    """Numeric fields averaged over the seeds' dicts (None where any seed has None)."""
    out = dict(dicts[0])
    for key, value in dicts[0].items():
        values = [d.get(key) for d in dicts]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = None if any(v is None for v in values) else sum(values) / len(values)
    return out


def render_report(evidence: dict, extra: dict, cfg: Config) -> str:
    from .evaluation.evaluate import render_diagnostics, render_tables, reported_ks

    ks = reported_ks(cfg.eval)
    lp = {"bigrec": 1.0, "d3": 0.0}.get(cfg.eval.decoding, cfg.eval.length_penalty)
    preset = f", decoding preset {cfg.eval.decoding}" if cfg.eval.decoding else ""
    seeds = list(cfg.run.seeds)
    seed_text = (f"; model rows: mean ± sd over seeds {seeds}, the interval over users of the seed-averaged "
                 f"values" if len(seeds) > 1 else "")
    n = next(iter(evidence["rows"].values()))["metrics"].get("n_rows", 0) if evidence["rows"] else 0
    parts = [f"# Results on the test split ({int(n)} rows, {cfg.eval.num_beams} beams, length penalty {lp}{preset})\n",
             f"Cells: value{' ± sd over seeds' if len(seeds) > 1 else ''} [95 % interval]{seed_text}.",
             render_tables(evidence, ks)]
    diags = {name: x["diagnostics"] for name, x in extra.items() if "diagnostics" in x}
    if diags:
        parts.append(render_diagnostics(diags) + ("(means over the seeds)\n" if len(seeds) > 1 else ""))
    parts.append("## Cost\n\n| method | inference ms / user | training s (cumulative) |\n|---|---:|---:|")
    for name, x in extra.items():
        ms = f"{x['ms_per_user']:.1f}" if x.get("ms_per_user") else "-"
        tr = f"{x['train_seconds']:.0f}" if x.get("train_seconds") is not None else "-"
        parts.append(f"| {name} | {ms} | {tr} |")
    return "\n".join(parts) + "\n"
