"""Resolving a DataConfig to files, and the tokenized example sets the recipes train on."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DataConfig
from .prompts import PromptBuilder
from .splits import Catalogue, Sample, read_catalogue, read_split


def data_dir(cfg: DataConfig) -> Path:
    """The configured directory, or the embedded MovieLens-100K default (prepared once)."""
    if cfg.dir:
        d = Path(cfg.dir)
        if not d.is_dir():
            raise FileNotFoundError(f"data.dir {d} is not a directory")
        return d
    from .movielens import ensure_movielens

    return ensure_movielens()


# Parsed files, memoised per process: `latentr3 run` reads the same split ~20 times (every stage of
# every seed); parsing MovieLens' 78k training rows costs ~1-3 s each time.  The key holds the file's
# size and mtime, so an edited file is read again; callers get a fresh list (the rows are not mutated).
_PARSED: dict[tuple, object] = {}


def _memo(path: Path, *key) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, *key)


def load_catalogue(cfg: DataConfig) -> Catalogue:
    path = data_dir(cfg) / cfg.catalogue
    if not path.is_file():
        return read_catalogue(path, cfg.catalogue_format)  # its own error names the file
    key = _memo(path, "catalogue", cfg.catalogue_format)
    if key not in _PARSED:
        _PARSED[key] = read_catalogue(path, cfg.catalogue_format)
    return _PARSED[key]


CHECKPOINT_CATALOGUE = "catalogue.txt"


def save_catalogue_copy(ckpt_dir: str | Path, catalogue: Catalogue) -> None:
    """A checkpoint carries its catalogue, so it can recommend without the data directory."""
    from .splits import write_catalogue

    write_catalogue(Path(ckpt_dir) / CHECKPOINT_CATALOGUE, catalogue.ids, catalogue.titles)


def split_path(cfg: DataConfig, name: str) -> Path:
    """A split by role ("train"/"valid"/"test", mapped through the config) or by file stem."""
    stem = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}.get(name, name)
    return data_dir(cfg) / f"{stem}.csv"


def load_split(cfg: DataConfig, name: str, catalogue: Catalogue | None = None) -> list[Sample]:
    path = split_path(cfg, name)
    if not path.is_file():
        return read_split(path, catalogue)  # its own error names the file
    key = _memo(path, "split", id(catalogue))
    if key not in _PARSED:
        _PARSED[key] = (catalogue, read_split(path, catalogue))  # holding the catalogue keeps its id unique
    return list(_PARSED[key][1])


def train_and_valid(cfg: DataConfig, catalogue: Catalogue) -> tuple[list[Sample], list[Sample]]:
    """The rows to train on and the rows to validate on (see DataConfig.valid_holdout)."""
    train = load_split(cfg, "train", catalogue)
    if cfg.valid_holdout <= 0:
        return train, load_split(cfg, "valid", catalogue)
    if not 0 < cfg.valid_holdout < 1:
        raise ValueError(f"data.valid_holdout must be in [0, 1), got {cfg.valid_holdout}")
    cut = len(train) - max(1, round(len(train) * cfg.valid_holdout))
    return train[:cut], train[cut:]


def subsample(rows: list, n: int, seed: int) -> list:
    """A seeded subset of n rows in their original order (n < 0 or n >= len: all rows)."""
    if n < 0 or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


@dataclass
class Example:
    prompt: list[int]
    target: list[int]
    index: int          # row index in the split, so results bind to rows by index


def tokenize_samples(samples: list[Sample], builder: PromptBuilder) -> list[Example]:
    pairs = builder.examples([(s.history_titles, s.target_title) for s in samples])
    return [Example(p, t, i) for i, (p, t) in enumerate(pairs)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded targets (see LatentR3Model for the layout)."""
    from ..model.latent_lm import left_pad, right_pad

    prompt_ids, prompt_mask = left_pad([e.prompt for e in examples], pad_id)
    target_ids, target_mask = right_pad([e.target for e in examples], pad_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "target_ids": target_ids,
            "target_mask": target_mask, "index": torch.tensor([e.index for e in examples])}
