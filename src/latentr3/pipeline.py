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
    results.md, results.json, *.png
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .config import Config, save_config
from .data.dataset import data_dir, load_catalogue, load_split, subsample
from .evaluation.metrics import format_markdown_table


def _stage_cfg(cfg: Config, **sections) -> Config:
    new = copy.deepcopy(cfg)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(new, section), key, value)
    return new


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _eval_stage(cfg: Config, ckpt: Path, out: Path) -> dict:
    from .evaluation.evaluate import run_eval

    if (out / "summary.json").exists():
        return _read_json(out / "summary.json")
    return run_eval(_stage_cfg(cfg, eval__model=str(ckpt), eval__output_dir=str(out), eval__split="test"))


def run_pipeline(cfg: Config) -> dict:
    from accelerate import PartialState

    from .evaluation.evaluate import popularity_metrics
    from .training.sft import train_sft

    state = PartialState()
    root = Path(cfg.run.output_dir)
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, root / "config.yaml")

    # --- data
    catalogue = load_catalogue(cfg.data)
    splits = {name: load_split(cfg.data, name, catalogue) for name in ("train", "valid", "test")}
    if state.is_main_process:
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / "summary.json").write_text(json.dumps(
            {"dir": str(data_dir(cfg.data)), "items": len(catalogue),
             "distinct_titles": len(set(catalogue.titles)),
             **{f"{k}_rows": len(v) for k, v in splits.items()}}, indent=2))

    # --- training stages
    timings: dict[str, float] = {}
    models: dict[str, Path] = {}
    if cfg.run.no_latent_baseline:
        models["SFT w/o latent (BIGRec-style)"] = train_sft(_stage_cfg(
            cfg, sft__output_dir=str(root / "sft_no_latent"), model__num_latent=0))
        timings["SFT w/o latent (BIGRec-style)"] = _read_json(root / "sft_no_latent" / "done.json").get(
            "train_seconds", 0.0)
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
    e = cfg.eval
    test_rows = subsample(splits["test"], e.sample, e.seed)  # the rows run_eval scores
    rows: dict[str, dict] = {
        "popularity, all-time (train targets)": popularity_metrics(splits["train"], test_rows, catalogue, e),
        "popularity, recent (valid targets)": popularity_metrics(splits["valid"], test_rows, catalogue, e),
    }
    extra: dict[str, dict] = {}

    def add_row(name: str, summary: dict, train_seconds: float | None) -> None:
        rows[name] = summary["metrics"]
        ups = summary.get("users_per_second")
        extra[name] = {"ms_per_user": 1000.0 / ups if ups else None, "train_seconds": train_seconds}
    for i, (name, ckpt) in enumerate(models.items()):
        summary = _eval_stage(cfg, ckpt, root / "eval" / f"{i}_{Path(ckpt).parent.name}")
        add_row(name, summary, timings.get(name))
    for name, (ckpt, base) in d3_models.items():
        summary = _eval_stage(_stage_cfg(cfg, eval__decoding="d3", eval__assistant=assistant), ckpt,
                              root / "eval" / f"d3_{Path(ckpt).parent.name}")
        add_row(name, summary, timings.get(base))
    if sasrec_dir is not None:
        name = "SASRec (item ids)"
        summary = _eval_stage(cfg, sasrec_dir, root / "eval" / "sasrec")
        add_row(name, summary, timings.get(name))

    # --- report
    result = {"data": _read_json(root / "data" / "summary.json"), "rows": rows, "extra": extra,
              "num_beams": e.num_beams, "length_penalty": e.length_penalty}
    text = render_report(rows, extra, cfg)
    if state.is_main_process:
        (root / "results.json").write_text(json.dumps(result, indent=2))
        (root / "results.md").write_text(text)
        if cfg.run.plots:
            from .plots import plot_run

            plot_run(root, rows)
        print("\n" + text)
    return result


def render_report(rows: dict, extra: dict, cfg: Config) -> str:
    from .evaluation.evaluate import reported_ks

    ks = reported_ks(cfg.eval)
    lp = {"bigrec": 1.0, "d3": 0.0}.get(cfg.eval.decoding, cfg.eval.length_penalty)
    preset = f", decoding preset {cfg.eval.decoding}" if cfg.eval.decoding else ""
    parts = [f"# Results on the test split ({cfg.eval.num_beams} beams, length penalty {lp}{preset})\n"]
    for protocol, what in (("legacy", "title match, the paper's protocol"),
                           ("item", "item level: a title shared by m items counts 1/m")):
        parts.append(f"## {protocol} ({what})\n\n{format_markdown_table(rows, ks, protocol=protocol)}\n")
    parts.append("## Cost\n\n| method | inference ms / user | training s (cumulative) |\n|---|---:|---:|")
    for name, x in extra.items():
        ms = f"{x['ms_per_user']:.1f}" if x.get("ms_per_user") else "-"
        tr = f"{x['train_seconds']:.0f}" if x.get("train_seconds") is not None else "-"
        parts.append(f"| {name} | {ms} | {tr} |")
    return "\n".join(parts) + "\n"
