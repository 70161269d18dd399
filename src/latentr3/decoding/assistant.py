"""D3's text-free assistant for the constrained beam search, and the decoding presets.

D3 (Bao et al., "Decoding Matters", 2024) decodes an LLM recommender without length normalisation and adds
the scores of a conventional, text-free recommender.  Here the assistant is a SASRec checkpoint: for each
user its next-item probabilities p (once per user, from the history ids) are summed over every trie node's
subtree, ``mass = trie.subtree_sum(p)`` (B, num_nodes).  Taking token t from node n to child c then scores

    w * log(mass[c] / mass[n])       (w = eval.assistant_weight; 0 = plain LLM decoding)

added to the LLM's log-prob of t.  The ratios over a node's children sum to 1 (each item below n is below
exactly one child), they are <= 0 in log space (so the beam search's exact stopping bound still holds),
and along a title's path they telescope: a finished title gets w * log(P_SASRec(title) / P(catalogue)),
the (log) total probability of the items carrying the title.

In the beam search the per-step cost is one gather of (child, parent) log-masses per candidate edge;
the per-batch cost is one SASRec forward and one index_add over the trie's (item, node) incidence.

Presets (EvalConfig.decoding):
    ""       length_penalty / assistant / assistant_weight as configured
    bigrec   length penalty 1, no assistant (BIGRec, the paper's setting)
    d3       length penalty 0 + the assistant (eval.assistant must name a SASRec checkpoint)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EvalConfig
from .trie import ItemTrie

PRESETS = ("", "bigrec", "d3")


def resolve_decoding(cfg: EvalConfig) -> EvalConfig:
    """A copy of `cfg` with the decoding preset applied (length_penalty, assistant fields)."""
    if cfg.decoding not in PRESETS:
        raise ValueError(f"eval.decoding must be one of {PRESETS[1:]} or empty, got {cfg.decoding!r}")
    out = copy.copy(cfg)
    if cfg.decoding == "bigrec":
        out.length_penalty, out.assistant = 1.0, ""
    elif cfg.decoding == "d3":
        if not cfg.assistant:
            raise ValueError("eval.decoding=d3 needs eval.assistant=<SASRec checkpoint directory> "
                             "(train one with `latentr3 baseline sasrec`)")
        out.length_penalty = 0.0
    if not out.length_penalty >= 0:
        raise ValueError(f"eval.length_penalty must be >= 0 (1: mean token log-prob, the paper; 0: sum, D3); "
                         f"a negative one breaks the beam search's stopping bound, got {out.length_penalty}")
    if out.assistant and out.assistant_weight < 0:
        raise ValueError(f"eval.assistant_weight must be >= 0, got {out.assistant_weight}")
    return out


def assistant_active(cfg: EvalConfig) -> bool:
    """True when a resolved config decodes with an assistant (weight 0 = plain decoding)."""
    return bool(cfg.assistant) and cfg.assistant_weight != 0


@dataclass
class AssistantScores:
    """Per-user log subtree masses for one batch of users (rows in the batch's prompt order)."""

    log_mass: torch.Tensor      # (B, num_nodes) float32
    weight: float

    def edge_scores(self, users: torch.Tensor, parents: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
        """weight * log(mass[child] / mass[parent]) for flat (user, parent, child) edge lists."""
        lm = self.log_mass
        # <= 0 exactly (a child's mass is part of its parent's; clamp float rounding), which keeps the
        # beam search's stopping bound exact
        return self.weight * (lm[users, children] - lm[users, parents]).clamp_max_(0.0)

    def title_scores(self, trie: ItemTrie) -> torch.Tensor:
        """(B, num_titles) what a finished title accumulates: weight * log(mass[leaf] / mass[root])."""
        leaves = trie.leaf_node_of_title.to(self.log_mass.device)
        return self.weight * (self.log_mass[:, leaves] - self.log_mass[:, :1])


class TrieAssistant:
    """A SASRec next-item model bound to one trie: `scores(histories)` -> AssistantScores."""

    def __init__(self, recommender, trie: ItemTrie, weight: float = 1.0):
        self.rec, self.trie, self.weight = recommender, trie, float(weight)
        # trie item position -> SASRec output column (-1: an item SASRec does not know: mass 0)
        cols = [recommender.index.get(int(i), -1) for i in trie.item_ids]
        self.cols = torch.tensor(cols, dtype=torch.long, device=recommender.device)
        self.known = self.cols >= 0
        self.cols = self.cols.clamp(min=0)

    @classmethod
    def from_pretrained(cls, path: str | Path, trie: ItemTrie, weight: float = 1.0,
                        device: str | torch.device = "cpu") -> "TrieAssistant":
        from ..baselines.sasrec import SASRecRecommender

        return cls(SASRecRecommender.from_pretrained(path, device), trie, weight)

    def item_probs(self, histories: list[list[int]]) -> torch.Tensor:
        """(B, trie.num_items) SASRec next-item probabilities in the trie's item order."""
        p = self.rec.item_probs(histories)
        return p[:, self.cols] * self.known

    @torch.no_grad()
    def scores(self, histories: list[list[int]], device: torch.device | None = None) -> AssistantScores:
        p = self.item_probs(histories)
        if device is not None:
            p = p.to(device)
        mass = self.trie.subtree_sum(p)
        return AssistantScores(mass.clamp_min(torch.finfo(mass.dtype).tiny).log(), self.weight)


_LOADED: dict = {}


def load_assistant(cfg: EvalConfig, trie: ItemTrie, device: torch.device | str = "cpu") -> TrieAssistant | None:
    """The assistant of a RESOLVED eval config (None when it has none); the SASRec weights are cached."""
    if not assistant_active(cfg):
        return None
    key = (str(Path(cfg.assistant).resolve()), str(device))
    rec = _LOADED.get(key)
    if rec is None:
        from ..baselines.sasrec import SASRecRecommender, is_sasrec_checkpoint

        if not is_sasrec_checkpoint(cfg.assistant):
            raise FileNotFoundError(f"eval.assistant {cfg.assistant} is not a SASRec checkpoint "
                                    f"(no sasrec.json); train one with `latentr3 baseline sasrec`")
        rec = _LOADED[key] = SASRecRecommender.from_pretrained(cfg.assistant, device)
    return TrieAssistant(rec, trie, cfg.assistant_weight)
