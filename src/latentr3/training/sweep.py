"""`latentr3 sweep`: a grid over config values, each point a full stage run, picked by validation.

Launch: `latentr3 sweep --config configs/cds_qwen2.5-1.5b_grpo.yaml --grid grpo.lr=1e-5,1e-4,5e-4
[--grid grpo.noise_std=1.0,1.5] [key=value ...]`.  Every point writes to its own directory under
`<stage>.output_dir/sweep/`; finished points are skipped on a re-run.  The selection criterion is the
stage's validation score (GRPO: validation NDCG@10 by beam search; SFT: validation loss), never test.
"""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import yaml

from ..atomic import atomic_write_json, atomic_write_text
from ..config import Config, ConfigError, _set_dotted, config_to_dict, _build


def parse_grid(items: list[str]) -> dict[str, list]:
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2,...")
        key, raw = item.split("=", 1)
        grid[key.strip()] = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not grid[key.strip()]:
            raise ConfigError(f"--grid {item!r} has no values")
    return grid


def _with(cfg: Config, values: dict) -> Config:
    tree = config_to_dict(cfg)
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return _build(Config, tree)


def _latent_scale(metrics: Path) -> dict:
    """‖r‖ and σ·√d / ‖r‖ logged at a GRPO run's best validation (the first one reaching its best NDCG@10)."""
    evals = [json.loads(line) for line in metrics.read_text().splitlines() if '"valid_ndcg10"' in line] \
        if metrics.is_file() else []
    if not evals:
        return {}
    best = max(evals, key=lambda e: e["valid_ndcg10"])
    return {"latent_norm": best.get("valid_latent_norm"), "noise_to_latent": best.get("valid_noise_to_latent")}


def run_sweep(cfg: Config, grid: dict[str, list], stage: str = "grpo") -> dict:
    """Runs every grid point of `stage` (grpo | sft) and returns the table, best point first."""
    from ..training.grpo import train_grpo
    from ..training.sft import train_sft

    train, section = {"grpo": (train_grpo, cfg.grpo), "sft": (train_sft, cfg.sft)}[stage]
    root = Path(section.output_dir) / "sweep"
    rows = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
        point = _with(cfg, {**values, f"{stage}.output_dir": str(root / name)})
        train(copy.deepcopy(point))
        done = json.loads((root / name / "done.json").read_text())
        score = done.get("best_valid_ndcg10") if stage == "grpo" else done.get("best_valid_loss")
        row = {"point": name, **values, "valid_score": score, "checkpoint": str(root / name / "best")}
        if stage == "grpo":
            row.update(_latent_scale(root / name / "metrics.jsonl"))
        rows.append(row)
    higher_better = stage == "grpo"
    rows.sort(key=lambda r: (r["valid_score"] is None,
                             -(r["valid_score"] or 0) if higher_better else (r["valid_score"] or 0)))
    metric = "validation NDCG@10" if higher_better else "validation loss"
    # GRPO: the noise's size against the latent's (σ·√d / ‖r‖ at the selected validation), the scale on
    # which a noise_std carries over between backbones of different widths
    scale = stage == "grpo"
    lines = [f"| point | {metric} |" + (" ‖r‖ | σ√d / ‖r‖ |" if scale else "") + " checkpoint |",
             "|---|---:|" + ("---:|---:|" if scale else "") + "---|"]
    for i, r in enumerate(rows):
        mark = " (selected)" if i == 0 else ""
        score = "-" if r["valid_score"] is None else f"{r['valid_score']:.4f}"
        extra = "".join(" - |" if r.get(k) is None else f" {r[k]:.2f} |" for k in ("latent_norm", "noise_to_latent")) \
            if scale else ""
        lines.append(f"| {r['point']}{mark} | {score} |{extra} {r['checkpoint']} |")
    table = "\n".join(lines)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "sweep.json", rows)
    atomic_write_text(root / "sweep.md", table + "\n")
    print(table)
    return {"rows": rows, "selected": rows[0] if rows else None}
