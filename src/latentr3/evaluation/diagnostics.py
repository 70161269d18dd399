"""Why the latent helps or not: what the latent thought looks like and whether the model uses it.

For a set of users (with their beam-search NDCG@K already known), `latent_diagnostics` reports

* ``latent_norm``: mean ‖r‖ of the (first) latent thought, beside ``noise_norm`` = σ·√d, the expected norm
  of GRPO's noise ε ~ N(0, σ² I_d).  The paper's σ = 1.5 was set for d = 1536; on SmolLM2 (d = 576) or
  the tiny model (d = 128) the same σ is another signal-to-noise ratio, so ``noise_to_latent`` =
  σ√d / ‖r‖ is the number to compare across backbones;
* ``attention_entropy``: mean entropy (nats) of LatentRATT's attention over the prompt positions, and
  ``attention_entropy_ratio`` = that / log(number of attended positions) (1 = uniform, 0 = one token);
* ``logprob_gain``: mean over users of (target log-prob with the latent - with the latent slot(s) fed
  zero vectors), summed over the target tokens: 0 means the model ignores the latent;
* ``reward_ndcg_spearman``: across the users, the rank correlation between GRPO's reward (-perplexity of
  the target under the noise-free latent) and the user's NDCG@K from the beam search: whether the
  reward GRPO climbs tracks the metric it is judged by (None when either side is constant).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["latent_diagnostics", "spearman"]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks, ties given their average rank (what Spearman's rho needs)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0 - 1.0)[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation with average ranks for ties; None when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two vectors of one length, got {a.shape} and {b.shape}")
    if a.size < 2:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else None


@torch.no_grad()
def latent_diagnostics(model, builder, histories: list[list[str]], targets: list[str],
                       ndcg: Sequence[float], noise_std: float, batch_size: int = 16) -> dict:
    """The module's figures over these users (history titles, target title, beam-search NDCG@K)."""
    from ..data.dataset import Example, collate
    from ..model.latent_rollout import perplexity_reward  # GRPO's reward, the quantity being diagnosed

    if not (len(histories) == len(targets) == len(ndcg)):
        raise ValueError("histories, targets and ndcg must have one entry per user")
    d = model.latent_ratt.hidden_size
    out = {"users": len(targets), "num_latent": model.num_latent, "hidden": d, "noise_std": noise_std,
           "noise_norm": noise_std * math.sqrt(d)}
    if model.num_latent == 0 or not targets:
        return out
    was_training = model.training
    model.eval()
    pad = builder.tokenizer.pad_token_id
    pairs = builder.examples(list(zip(histories, targets)))
    norms, entropies, ratios, gains, rewards = [], [], [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate([Example(p, t, i) for i, (p, t) in enumerate(pairs[start: start + batch_size])], pad)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        mask = batch["target_mask"]
        prefix = model.prefill(batch["prompt_ids"], batch["prompt_mask"])
        weights = model.latent_attention(prefix)                                   # (B, L)
        r = model.compute_latent(prefix)
        norms += r.norm(dim=-1).tolist()
        ent = -(weights * weights.clamp(min=1e-30).log()).sum(-1)
        n_keys = prefix.attention_mask.sum(-1).clamp(min=2).to(ent.dtype)
        entropies += ent.tolist()
        ratios += (ent / n_keys.log()).tolist()
        with_latent = model.target_logprobs(model.think(prefix), batch["target_ids"])
        zeroed = model.prefill(batch["prompt_ids"], batch["prompt_mask"])
        for _ in range(model.num_latent):
            zeroed, _ = model.append(zeroed, torch.zeros_like(r)[:, None, :], logits_to_keep=1)
        without = model.target_logprobs(zeroed, batch["target_ids"])
        m = mask.to(with_latent.dtype)
        gains += ((with_latent - without) * m).sum(-1).tolist()
        rewards += perplexity_reward(with_latent, mask).tolist()
    if was_training:
        model.train()
    mean = lambda v: float(np.mean(v))  # noqa: E731
    out.update({"latent_norm": mean(norms), "noise_to_latent": out["noise_norm"] / max(mean(norms), 1e-12),
                "attention_entropy": mean(entropies), "attention_entropy_ratio": mean(ratios),
                "logprob_gain": mean(gains), "reward_mean": mean(rewards),
                "reward_ndcg_spearman": spearman(rewards, ndcg)})
    return out


# The figures GRPO writes to metrics.jsonl at each validation (as valid_<name>).
DIAGNOSTICS_LOGGED = ("latent_norm", "noise_norm", "noise_to_latent", "attention_entropy_ratio", "logprob_gain",
                      "reward_ndcg_spearman")


def diagnose_records(model, builder, records: list[dict], catalogue, cfg, noise_std: float, sample: int) -> dict:
    """`latent_diagnostics` over the first `sample` evaluated records (-1 = all; 0 = only the noise norm),
    with each user's legacy NDCG@K (K = 10 when reported) from its beam-search list."""
    from collections import Counter

    from .metrics import per_user_metrics
    from .report import main_k

    chosen = records if sample < 0 else records[:sample]
    ks = [k for k in cfg.ks if k <= cfg.top_k]
    ndcg = per_user_metrics([r["predicted"] for r in chosen], [r["target"] for r in chosen],
                            Counter(catalogue.titles), [main_k(ks)])[f"legacy/NDCG@{main_k(ks)}"]
    return latent_diagnostics(model, builder, [r["history"] for r in chosen], [r["target"] for r in chosen],
                              ndcg, noise_std, cfg.batch_size)
