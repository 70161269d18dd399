"""Resolving a DataConfig to files, and the tokenized example sets the recipes train on."""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from ..config import ConfigError, DataConfig, data_problems
from .prompts import PromptBuilder
from .splits import Catalogue, DataFormatError, Sample, read_catalogue, read_split

_NOTED: set[str] = set()


def note(message: str) -> None:
    """A one-time remark about the data (printed to stderr once per process, by the main process)."""
    if message in _NOTED or os.environ.get("RANK", "0") != "0":
        return
    _NOTED.add(message)
    print(f"latentr3: note: {message}", file=sys.stderr)


def item_noun(cfg: DataConfig) -> str:
    """The prompt's noun for the items: data.item_noun, or "movies" for the embedded MovieLens default."""
    if cfg.item_noun.strip():
        return cfg.item_noun
    if not cfg.dir:
        return "movies"
    raise ConfigError(
        f"data.item_noun is not set: data.dir={cfg.dir} is not the embedded MovieLens-100K, so the prompt "
        "would call its items \"movies\" (\"Given a list of movies the user has interacted with ...\").  Set "
        "data.item_noun to the plural noun of this catalogue, e.g. data.item_noun='music albums'")


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


def _present(directory: Path, suffix: str) -> str:
    names = sorted(p.name for p in directory.iterdir() if p.name.endswith(suffix))[:20] if directory.is_dir() else []
    return ", ".join(names) if names else "none"


def load_catalogue(cfg: DataConfig) -> Catalogue:
    directory = data_dir(cfg)
    path = directory / cfg.catalogue
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such catalogue file (data.catalogue={cfg.catalogue!r} in data.dir {directory}; "
            f"files there: {_present(directory, '')}).  Set data.catalogue to the item file "
            "(title<TAB>item_id or code<TAB>title<TAB>item_id a line)")
    key = _memo(path, "catalogue", cfg.catalogue_format)
    if key not in _PARSED:
        _PARSED[key] = read_catalogue(path, cfg.catalogue_format)
        _note_shared_titles(cfg, _PARSED[key])
    return _PARSED[key]


def _note_shared_titles(cfg: DataConfig, catalogue: Catalogue) -> None:
    """How many titles several items share, and how many test targets have such a title."""
    by_title: dict[str, int] = {}
    for title in catalogue.titles:
        by_title[title] = by_title.get(title, 0) + 1
    shared = {t: n for t, n in by_title.items() if n > 1}
    if not shared:
        return
    top = max(shared, key=shared.get)
    text = (f"{catalogue.path}: {len(shared)} titles are shared by {sum(shared.values())} of the "
            f"{len(catalogue)} items (the most: {top[:60]!r}, {shared[top]} items); a title match counts "
            "a hit for any item of the title")
    test = split_path(cfg, "test")
    if test.is_file():
        try:
            rows = load_split(cfg, "test", catalogue)
            n = sum(1 for r in rows if r.target_title in shared)
            text += f"; {n} of the {len(rows)} test targets ({100 * n / max(len(rows), 1):.1f} %) have a shared title"
        except (DataFormatError, OSError) as exc:
            text += f"; the test targets were not counted ({exc})"
    note(text)


CHECKPOINT_CATALOGUE = "catalogue.txt"


def save_catalogue_copy(ckpt_dir: str | Path, catalogue: Catalogue) -> None:
    """A checkpoint carries its catalogue, so it can recommend without the data directory."""
    from .splits import write_catalogue

    write_catalogue(Path(ckpt_dir) / CHECKPOINT_CATALOGUE, catalogue.ids, catalogue.titles)


def split_path(cfg: DataConfig, name: str) -> Path:
    """A split by role ("train"/"valid"/"test", mapped through the config) or by file stem."""
    stem = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}.get(name, name)
    return data_dir(cfg) / f"{stem}.csv"


def _missing_split(cfg: DataConfig, name: str, path: Path) -> FileNotFoundError:
    present = _present(path.parent, ".csv")
    if name in ("train", "valid", "test"):
        key = f"data.{name}_split"
        stem = getattr(cfg, key.split(".")[1])
        what = f"the {name} split ({key}={stem!r})"
    else:
        what = f"the split {name!r} (a file stem in data.dir; eval.split / eval.popularity_source take one)"
    hint = ""
    if name == "train":
        hint = ("  A release without a train split (e.g. the CDs data: valid.csv and test.csv) can train on "
                "another file and hold out its last rows for validation: data.train_split=valid "
                "data.valid_holdout=0.1")
    elif name == "valid":
        hint = ("  Without a validation file, hold out the last rows of the train split: data.valid_holdout=0.1 "
                "(or point data.valid_split at another file)")
    return FileNotFoundError(f"{path}: no such file, needed for {what}; CSV files in {path.parent}: {present}.{hint}")


def load_split(cfg: DataConfig, name: str, catalogue: Catalogue | None = None) -> list[Sample]:
    path = split_path(cfg, name)
    if not path.is_file():
        raise _missing_split(cfg, name, path)
    key = _memo(path, "split", id(catalogue))
    if key not in _PARSED:
        _PARSED[key] = (catalogue, read_split(path, catalogue))  # holding the catalogue keeps its id unique
    return list(_PARSED[key][1])


def train_and_valid(cfg: DataConfig, catalogue: Catalogue) -> tuple[list[Sample], list[Sample]]:
    """The rows to train on and the rows to validate on (see DataConfig.valid_holdout)."""
    problems = data_problems(cfg)
    if not 0 <= cfg.valid_holdout < 1:
        problems.append(f"data.valid_holdout must be in [0, 1), got {cfg.valid_holdout}")
    if problems:
        raise ConfigError("; ".join(problems))
    train = load_split(cfg, "train", catalogue)
    if cfg.valid_holdout <= 0:
        if cfg.train_split == cfg.valid_split:
            note(f"validating on the training rows ({split_path(cfg, 'train')}; data.allow_valid_on_train=true)")
        return train, load_split(cfg, "valid", catalogue)
    if len(train) < 2:
        raise ConfigError(f"data.valid_holdout={cfg.valid_holdout} needs at least 2 rows in the train split "
                          f"{split_path(cfg, 'train')}, which has {len(train)}")
    cut = len(train) - max(1, round(len(train) * cfg.valid_holdout))
    cut = max(cut, 1)
    _check_time_order(split_path(cfg, "train"), train, cut, cfg.valid_holdout)
    return train[:cut], train[cut:]


def _time_of(value: str) -> float | None:
    text = value.strip()
    try:
        t = float(text)
        return t if math.isfinite(t) else None
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _check_time_order(path: Path, rows: list[Sample], cut: int, fraction: float) -> None:
    """valid_holdout takes the file's last rows as its latest: check that on a `timestamp` column, or say
    that there is none to check."""
    held = f"data.valid_holdout={fraction}: the last {len(rows) - cut} of {len(rows)} rows of {path}"
    if not rows or "timestamp" not in rows[0].extra:
        note(f"{held} (lines {rows[cut].line}-{rows[-1].line}) are the validation rows; the file has no "
             "timestamp column, so they are the file's last rows, assumed to be its latest")
        return
    previous: float | None = None
    previous_line, previous_raw = 0, ""
    for row in rows:
        t = _time_of(row.extra["timestamp"])
        if t is None:
            raise DataFormatError(path, row.line, f"timestamp is neither a number nor an ISO date-time: "
                                  f"{row.extra['timestamp'][:60]!r} (data.valid_holdout checks the time order)")
        if previous is not None and t < previous:
            raise DataFormatError(
                path, row.line,
                f"not sorted by target time: timestamp {row.extra['timestamp'].strip()} is earlier than the "
                f"{previous_raw} of line {previous_line}.  data.valid_holdout holds out the file's last rows as "
                "its latest; sort the rows by timestamp (stable), or validate on a separate file "
                "(data.valid_holdout=0, data.valid_split=<stem>)")
        previous, previous_line, previous_raw = t, row.line, row.extra["timestamp"].strip()
    note(f"{held} (lines {rows[cut].line}-{rows[-1].line}, timestamps from {rows[cut].extra['timestamp'].strip()}) "
         "are the validation rows")


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


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded targets (see LatentR3Model for the layout)."""
    prompt_ids, prompt_mask = left_pad([e.prompt for e in examples], pad_id)
    target_ids, target_mask = right_pad([e.target for e in examples], pad_id)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "target_ids": target_ids,
            "target_mask": target_mask, "index": torch.tensor([e.index for e in examples])}
