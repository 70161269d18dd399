"""Asking a trained model for recommendations: `Recommender.from_pretrained(dir).recommend(...)`."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import EvalConfig
from .data.dataset import CHECKPOINT_CATALOGUE
from .data.splits import Catalogue, read_catalogue
from .evaluation.evaluate import build_trie, builder_for_checkpoint, output_vocab_size, recommend_prompts
from .model.build import resolve_dtype
from .model.latent_lm import LatentR3Model


@dataclass
class Recommendation:
    title: str
    item_ids: list[int] = field(default_factory=list)   # every catalogue item carrying the title
    score: float = 0.0                                   # sum(log p) / length ** length_penalty


class UnknownItemError(ValueError):
    """A history entry that is not in the catalogue."""


class Recommender:
    """A checkpoint + its catalogue + the decoding settings, ready to rank catalogue titles."""

    def __init__(self, model: LatentR3Model, tokenizer, meta: dict, catalogue: Catalogue,
                 decoding: EvalConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.catalogue = catalogue
        self.decoding = decoding or EvalConfig()
        self.builder = builder_for_checkpoint(tokenizer, meta, model.num_latent)
        self.trie = build_trie(catalogue, self.builder, output_vocab_size(model)).to(model.device)
        self._titles = set(catalogue.titles)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, catalogue: str | Path | None = None,
                        device: str | None = None, dtype: str = "auto", num_beams: int = 10,
                        length_penalty: float = 1.0) -> "Recommender":
        """Loads a checkpoint; its own catalogue copy is used unless `catalogue` names a file."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, meta = LatentR3Model.from_pretrained(ckpt_dir, resolve_dtype(dtype, device), device)
        cat_path = Path(catalogue) if catalogue else Path(ckpt_dir) / CHECKPOINT_CATALOGUE
        if not cat_path.exists():
            raise FileNotFoundError(f"{cat_path}: no catalogue; pass catalogue=<info.txt of the dataset>")
        decoding = EvalConfig(num_beams=num_beams, length_penalty=length_penalty)
        return cls(model, tok, meta, read_catalogue(cat_path), decoding)

    def _history_titles(self, history: list, allow_free_text: bool) -> list[str]:
        titles = []
        for entry in history:
            if isinstance(entry, int) and not isinstance(entry, bool):
                if entry not in self.catalogue:
                    raise UnknownItemError(f"item id {entry} is not in the catalogue ({self.catalogue.path})")
                titles.append(self.catalogue.title_of(entry))
            elif isinstance(entry, str):
                if entry not in self._titles and not allow_free_text:
                    close = difflib.get_close_matches(entry, self.catalogue.titles, n=3, cutoff=0.6)
                    hint = f"; close matches: {close}" if close else ""
                    raise UnknownItemError(f"history title {entry!r} is not in the catalogue{hint} "
                                           "(allow_free_text=True uses it as given)")
                titles.append(entry)
            else:
                raise TypeError(f"a history entry must be a title (str) or an item id (int), got {entry!r}")
        return titles

    def recommend(self, histories: list[list], k: int = 10,
                  allow_free_text: bool = False) -> list[list[Recommendation]]:
        """Top-k catalogue titles for each history (titles or item ids, oldest first)."""
        prompts = [self.builder.prompt_ids(self._history_titles(h, allow_free_text)) for h in histories]
        cfg = EvalConfig(**{**self.decoding.__dict__, "top_k": k, "num_beams": max(k, self.decoding.num_beams)})
        results = recommend_prompts(self.model, self.trie, prompts, self.tokenizer.pad_token_id, cfg)
        return [[Recommendation(t, self.catalogue.items_with_title(t), s) for t, s in zip(titles, scores)]
                for titles, scores in results]
