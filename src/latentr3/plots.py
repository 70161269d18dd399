"""PNG plots of a pipeline run: training curves and a bar chart of the comparison table."""
from __future__ import annotations

import json
from pathlib import Path


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(root: Path, evidence: dict, metric: str = "NDCG@10", curves_root: Path | None = None) -> list[Path]:
    """training_curves.png (from `curves_root`, default `root`) and results.png: `metric` per row of the
    evidence (evaluation/report.py), both protocols, with the rows' 95 % bootstrap intervals drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # training curves
    panels = [("sft", "loss", "SFT training loss"), ("sft", "valid_loss", "SFT validation loss"),
              ("grpo", "reward_mean", "GRPO mean reward (-perplexity)"),
              ("grpo", "valid_ndcg10", "GRPO validation NDCG@10")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, key, title) in zip(axes, panels):
        recs = [r for r in _records((curves_root or root) / stage / "metrics.jsonl") if key in r]
        if recs:
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], marker="." if len(recs) < 30 else None)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(root / "training_curves.png", dpi=110)
    plt.close(fig)
    written.append(root / "training_curves.png")

    # bar chart of the table, with the intervals
    rows = evidence["rows"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(names)))
    for j, protocol in enumerate(("legacy", "item")):
        key = f"{protocol}/{metric}"
        vals = [rows[n]["metrics"].get(key, 0.0) for n in names]
        cis = [rows[n]["ci"].get(key, (v, v)) for n, v in zip(names, vals)]
        err = [[max(v - lo, 0.0) for v, (lo, _) in zip(vals, cis)], [max(hi - v, 0.0) for v, (_, hi) in zip(vals, cis)]]
        ax.barh([i + 0.4 * j for i in range(len(names))], vals, height=0.4, xerr=err, capsize=3,
                label=f"{protocol} {metric}")
    ax.set_yticks([i + 0.2 for i in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} on the test split (bars: 95 % bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(root / "results.png", dpi=110)
    plt.close(fig)
    written.append(root / "results.png")
    return written
