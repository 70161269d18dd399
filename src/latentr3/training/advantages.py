"""Advantage rules of latent GRPO: pure functions on tensors (the reward, minus the perplexity of the
target, is `model.latent_rollout.perplexity_reward`).

Shapes: rewards are ``(P, G)``, one row per prompt and one column per latent sample, column 0 being the
noise-free sample of its prompt.  Every rule returns advantages of the same shape.  "The batch" is the
whole optimizer batch gathered over all processes, so the result depends neither on the number of
processes nor on the micro-batch size (the trainer gathers before calling these).

Scope (``grpo.advantage_scope``): "batch" applies a rule to the whole optimizer batch; "micro_step"
applies it separately to consecutive chunks of ``grpo.micro_step_prompts`` prompts of the gathered batch
(rows in the global batch order, itself a random permutation of the data), which reproduces the
authors' code: their trainer computes the advantage inside each micro-step over the rewards gathered
from its processes (2 GPUs x 1 prompt x 8 samples = 2 prompts), whatever the optimizer batch.  The
chunks here do not depend on the number of processes.

Standard deviations are population standard deviations (``unbiased=False``): they are defined for a group
of a single sample (a z-score of 0) and give z-scores of unit root-mean-square.
"""
from __future__ import annotations

import torch

ADVANTAGE_RULES = ("batch", "group", "popularity_group", "pooled_zscore")
ADVANTAGE_SCOPES = ("batch", "micro_step")


def batch_relative_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """The paper's rule: ``A = (s - s_bar) / ||S - s_bar||_2``.

    ``s_bar`` is the mean reward of the noise-free samples (column 0) of all prompts in the batch; the L2
    norm runs over every sample of the batch.  A batch whose rewards all equal ``s_bar`` gets zeros.
    """
    r = rewards.double()
    centred = r - r[:, 0].mean()
    norm = centred.pow(2).sum().sqrt()
    return (centred / norm.clamp(min=1e-12)).to(rewards.dtype)


def group_advantage(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Standard GRPO: z-score within each prompt's G samples, ``(s - mean) / (std + eps)``."""
    r = rewards.double()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    return ((r - mean) / (std + eps)).to(rewards.dtype)


def popularity_group_advantage(rewards: torch.Tensor, groups: torch.Tensor, weight: float,
                               eps: float = 1e-4) -> torch.Tensor:
    """``A = w * z_pop + (1 - w) * A_batch``.

    ``groups`` (P,) gives each prompt's popularity group (see `popularity_groups`); ``z_pop`` is the
    z-score of a sample among all samples in the batch whose prompt is in the same popularity group
    (``(s - mean_g) / (std_g + eps)``); ``A_batch`` is `batch_relative_advantage`; ``w`` = `weight`.

    The published "GRPO_Group" numbers on CDs (HR@10 0.1012, a fork of the authors' code) do not come
    from this rule: in that code the group list is built from rewards gathered twice and then truncated,
    so every sample falls in one group and the popularity groups end up unused.  What it computes is
    close to `pooled_zscore` (one group) under ``advantage_scope: micro_step`` (16 gathered samples).
    """
    r = rewards.double()
    z = torch.zeros_like(r)
    for g in groups.unique():
        rows = groups == g
        vals = r[rows]
        z[rows] = (vals - vals.mean()) / (vals.std(unbiased=False) + eps)
    out = weight * z + (1.0 - weight) * batch_relative_advantage(r)
    return out.to(rewards.dtype)


def pooled_zscore_advantage(rewards: torch.Tensor, weight: float, eps: float = 1e-4) -> torch.Tensor:
    """``A = w * (s - mean) / (std + eps) + (1 - w) * A_batch``, mean and std over every sample given.

    `popularity_group_advantage` with a single group: the rule that the fork's "GRPO_Group" code
    effectively computes (see there), under its own name.  ``w`` = `weight` (grpo.popularity_weight).
    """
    return popularity_group_advantage(rewards, torch.zeros(rewards.shape[0], dtype=torch.long), weight, eps)


def compute_advantages(rule: str, rewards: torch.Tensor, groups: torch.Tensor | None = None,
                       popularity_weight: float = 0.8, scope_prompts: int = 0) -> torch.Tensor:
    """Dispatch on the config name (``grpo.advantage``).

    `scope_prompts` > 0 (``advantage_scope: micro_step``): the rule runs separately on each chunk of
    that many consecutive prompts (rows); 0: on all rows at once.
    """
    if scope_prompts:
        P = rewards.shape[0]
        if scope_prompts < 0 or P % scope_prompts:
            raise ValueError(f"{P} prompts do not split into chunks of grpo.micro_step_prompts={scope_prompts}")
        return torch.cat([compute_advantages(rule, rewards[i:i + scope_prompts],
                                             None if groups is None else groups[i:i + scope_prompts],
                                             popularity_weight)
                          for i in range(0, P, scope_prompts)])
    if rule == "batch":
        return batch_relative_advantage(rewards)
    if rule == "group":
        return group_advantage(rewards)
    if rule == "popularity_group":
        if groups is None:
            raise ValueError("the popularity_group advantage needs each prompt's popularity group")
        return popularity_group_advantage(rewards, groups, popularity_weight)
    if rule == "pooled_zscore":
        return pooled_zscore_advantage(rewards, popularity_weight)
    raise ValueError(f"grpo.advantage must be one of {ADVANTAGE_RULES}, got {rule!r}")


# ---------------------------------------------------------------------------------------------- groups
def item_frequencies(history_ids: list[list[int]], target_ids: list[int]) -> dict[int, int]:
    """How often each item id occurs in the training split, histories and targets together."""
    freq: dict[int, int] = {}
    for hist in history_ids:
        for i in hist:
            freq[i] = freq.get(i, 0) + 1
    for i in target_ids:
        freq[i] = freq.get(i, 0) + 1
    return freq


def popularity_scores(history_ids: list[list[int]], freq: dict[int, int]) -> torch.Tensor:
    """A user's popularity: the summed training frequency of the items in their history."""
    return torch.tensor([float(sum(freq.get(i, 0) for i in hist)) for hist in history_ids],
                        dtype=torch.float64)


def popularity_thresholds(train_scores: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The ``num_groups - 1`` inner quantiles of the training users' scores."""
    if num_groups < 1:
        raise ValueError(f"grpo.popularity_groups must be >= 1, got {num_groups}")
    qs = torch.arange(1, num_groups, dtype=torch.float64) / num_groups
    return torch.quantile(train_scores.double(), qs) if num_groups > 1 else qs


def popularity_groups(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Group 0 (least popular histories) .. len(thresholds) (most popular); a score equal to a
    threshold goes to the lower group."""
    return torch.bucketize(scores.double(), thresholds.double(), right=False)
