"""Asking a trained model for recommendations: `Recommender.from_pretrained(dir).recommend(...)`."""
from __future__ import annotations

import difflib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import EvalConfig
from .data.dataset import CHECKPOINT_CATALOGUE
from .data.splits import Catalogue, read_catalogue
from .decoding.assistant import resolve_decoding
from .decoding.beam_search import BeamBatch
from .decoding.engine import DecodeRequest, DecodingEngine
from .evaluation.evaluate import build_trie, builder_for_checkpoint, output_vocab_size
from .model.build import resolve_dtype
from .model.latent_lm import LatentR3Model


@dataclass
class Recommendation:
    title: str
    item_ids: list[int] = field(default_factory=list)   # every catalogue item carrying the title
    score: float = 0.0                                   # sum(log p) / length ** length_penalty


class UnknownItemError(ValueError):
    """A history entry that is not in the catalogue: `index` in the history, `close_matches` (titles)."""

    def __init__(self, message: str, index: int = -1, entry=None, close_matches: list[str] | None = None):
        super().__init__(message)
        self.index, self.entry, self.close_matches = index, entry, list(close_matches or [])


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
        self.shared_prefix = self.builder.template_prefix()
        self._engines: dict[int, DecodingEngine] = {}   # recommend()'s synchronous engines, by beam count
        self._lock = threading.Lock()

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

    def history_titles(self, history: list, allow_free_text: bool = False) -> list[str]:
        """Catalogue titles of a history of titles / item ids (UnknownItemError, TypeError)."""
        titles = []
        for i, entry in enumerate(history):
            if isinstance(entry, int) and not isinstance(entry, bool):
                if entry not in self.catalogue:
                    raise UnknownItemError(f"item id {entry} is not in the catalogue ({self.catalogue.path})",
                                           i, entry)
                titles.append(self.catalogue.title_of(entry))
            elif isinstance(entry, str):
                if entry not in self._titles and not allow_free_text:
                    close = difflib.get_close_matches(entry, self.catalogue.titles, n=3, cutoff=0.6)
                    hint = f"; close matches: {close}" if close else ""
                    raise UnknownItemError(f"history title {entry!r} is not in the catalogue{hint} "
                                           "(allow_free_text=True uses it as given)", i, entry, close)
                titles.append(entry)
            else:
                raise TypeError(f"a history entry must be a title (str) or an item id (int), got {entry!r}")
        return titles

    def prompt_ids(self, history_titles: list[str]) -> list[int]:
        return self.builder.prompt_ids(history_titles)

    def excluded_titles(self, history_titles: list[str]) -> tuple[int, ...]:
        """titles_unique indices of the catalogue titles in a history (free text is not in the trie)."""
        index = self.trie.title_to_index
        return tuple(sorted({index[t] for t in history_titles if t in index}))

    @torch.no_grad()
    def explain(self, history_titles: list[str]) -> list[tuple[str, float]]:
        """Per history title in the prompt (oldest dropped by truncation are left out): the share of
        LatentRATT's attention that the (first) latent thought puts on that title's tokens.

        The rest of the attention is on the template's tokens.  Runs one prefill of the prompt.
        """
        from .data.prompts import quote_titles

        if not self.model.num_latent:
            raise ValueError("explain: this checkpoint has no latent thought (num_latent = 0)")
        b, tok = self.builder, self.tokenizer
        titles = b.kept_titles(history_titles)      # the titles prompt_ids keeps (oldest dropped to fit)
        text = b.prompt_text(titles)
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]], device=self.model.device)
        prefix = self.model.prefill(ids, torch.ones_like(ids))
        w = self.model.latent_attention(prefix)[0].tolist()
        start = text.index(quote_titles(titles)) if titles else 0
        out = []
        for t in titles:                            # '"t1", "t2"': each title sits inside its quotes
            lo, hi = start + 1, start + 1 + len(t)
            share = sum(wi for wi, (a, z) in zip(w, enc["offset_mapping"]) if a < hi and z > lo)
            out.append((t, share))
            start = hi + 3
        return out

    def new_engine(self, num_beams: int | None = None, max_users: int | None = None, admit_at: int | None = None,
                   max_queue: int | None = None, on_step=None) -> DecodingEngine:
        """A decoding engine over this model (the one decoder `recommend` and the server use).

        num_beams: beams per user (default decoding.num_beams), also the largest k it answers;
        max_users: users decoded at once (default decoding.batch_size); admit_at: free places that
        trigger an admission (default from decoding.refill).
        """
        cfg = resolve_decoding(self.decoding)
        K = num_beams or cfg.num_beams
        users = max_users or cfg.batch_size
        batch = BeamBatch(self.model, self.trie, self.tokenizer.pad_token_id, K, K, cfg.length_penalty,
                          shared_prefix=self.shared_prefix, cuda_graphs=cfg.cuda_graphs)
        admit = admit_at if admit_at is not None else max(1, int(users * cfg.refill))
        return DecodingEngine(batch, users, admit_at=admit, max_queue=max_queue, on_step=on_step)

    def recommend(self, histories: list[list], k: int = 10, allow_free_text: bool = False,
                  exclude_history: bool = False) -> list[list[Recommendation]]:
        """Top-k catalogue titles for each history (titles or item ids, oldest first).

        exclude_history: titles in a history are never recommended to it (the trie nodes with nothing
        but those titles below them are masked for that user only), so the list still has k titles when
        the catalogue allows.  Calls from several threads take turns (one lock); for concurrent callers
        that should share a batch, start an engine (`new_engine(...).start()`), as the server does.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        titles = [self.history_titles(h, allow_free_text) for h in histories]
        K = max(k, self.decoding.num_beams)
        reqs = [DecodeRequest(self.prompt_ids(t), k, self.excluded_titles(t) if exclude_history else ())
                for t in titles]
        with self._lock:
            engine = self._engines.get(K)
            if engine is None:
                engine = self._engines[K] = self.new_engine(K)
            # shorter prompts first: users decoded together then have similar prompt lengths (less padding)
            engine.submit_many(sorted(reqs, key=lambda r: len(r.prompt)))
            engine.run_until_idle()
        return [[Recommendation(t, self.catalogue.items_with_title(t), s)
                 for t, s in zip(r.future.result().titles, r.future.result().scores)] for r in reqs]
