"""The embedded default data set: MovieLens-100K (as shipped inside the ``recbole`` package) converted
into the paper's split format.

Processing, the same as the paper's Amazon splits:

* iterative ``min_count``-core filter (users and items both have at least ``min_count`` interactions,
  repeated until nothing changes);
* each user's interactions sorted by timestamp (ties keep the file order);
* every interaction after a user's first is one sample whose history is the previous
  ``<= max_history`` items;
* all samples sorted by target timestamp (stable) and cut into train / valid / test at
  ``floor(0.8 n)`` and ``floor(0.9 n)``.

The filtering, sequence building and writing are those of every other source
(:mod:`latentr3.data.sequences`); MovieLens has no time window and no title rules.

Kept items are renumbered ``0..n_items-1`` in the order of their original (numeric) id.  Titles are
``"{movie_title} ({release_year})"``, so that distinct movies keep distinct titles as far as possible.

recbole is only used as a file source: its modules are never imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Sequence

from latentr3.data.sequences import (AMAZON_COLUMNS, CATALOGUE_NAME, SPLIT_NAMES, STATS_NAME, InteractionLog,
                                     select_core, split_bounds, write_dataset)

__all__ = [
    "RECBOLE_INSTALL_HINT",
    "SPLIT_NAMES",
    "CATALOGUE_NAME",
    "STATS_NAME",
    "SPLIT_COLUMNS",
    "find_movielens_files",
    "movielens_title",
    "prepare_movielens",
    "default_data_dir",
    "ensure_movielens",
]

RECBOLE_INSTALL_HINT = "pip install --no-deps recbole==1.2.1"
# the released Amazon columns without the Amazon item keys
SPLIT_COLUMNS = tuple(c for c in AMAZON_COLUMNS if c not in ("item_asins", "item_asin"))
_YEAR = re.compile(r"^\d{4}$")


def find_movielens_files() -> tuple[Path, Path]:
    """Paths of ``ml-100k.inter`` and ``ml-100k.item`` inside the installed recbole package.

    recbole is located with ``importlib.util.find_spec`` only; none of its modules is imported.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        raise ModuleNotFoundError(
            "MovieLens-100K is read from the files shipped with the recbole package, which is not "
            f"installed; install it (without its dependencies) with: {RECBOLE_INSTALL_HINT}",
            name="recbole",
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        directory = Path(root) / "dataset_example" / "ml-100k"
        inter, item = directory / "ml-100k.inter", directory / "ml-100k.item"
        if inter.is_file() and item.is_file():
            return inter, item
    raise FileNotFoundError(
        f"the installed recbole package ({', '.join(roots) or spec.origin}) has no "
        f"dataset_example/ml-100k/ml-100k.inter and ml-100k.item; reinstall it with: {RECBOLE_INSTALL_HINT}"
    )


def movielens_title(movie_title: str, release_year: str) -> str:
    """``"Title (YYYY)"``; the title alone when the year is missing or not a 4-digit year, or when the
    title already ends with that year."""
    movie_title = " ".join(movie_title.split())
    year = release_year.strip()
    if not _YEAR.match(year) or movie_title.endswith(f"({year})"):
        return movie_title
    return f"{movie_title} ({year})"


def _read_atomic_table(path: Path, needed: Sequence[str]) -> tuple[dict[str, int], list[list[str]], int]:
    """A recbole atomic file: tab-separated, header ``name:type``. Returns column index by bare name."""
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().split("\n")
    header = lines[0].rstrip("\r").split("\t")
    index = {name.split(":", 1)[0]: i for i, name in enumerate(header)}
    missing = [name for name in needed if name not in index]
    if missing:
        raise ValueError(f"{path} line 1: missing column(s) {', '.join(missing)}; found {', '.join(header)}")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ValueError(f"{path} line {line_no}: expected {len(header)} fields, found {len(fields)}")
        rows.append(fields)
    return index, rows, len(lines)


def _id_key(token: str):
    """Sort key of an original id token: numeric when it is a number."""
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _split_sizes(n: int, split: Sequence[float]) -> tuple[int, int, int]:
    """Sizes of train / valid / test for ``n`` samples (cuts at ``floor(f0 n)``, ``floor((f0+f1) n)``)."""
    a, b = split_bounds(n, split)
    return a, b - a, n - b


def prepare_movielens(
    out_dir: str | os.PathLike,
    max_history: int = 10,
    min_count: int = 5,
    split: Sequence[float] = (0.8, 0.1, 0.1),
) -> dict:
    """Convert MovieLens-100K into ``train.csv``, ``valid.csv``, ``test.csv``, ``info.txt`` and
    ``stats.json`` under ``out_dir``; returns the statistics written to ``stats.json``."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    inter_path, item_path = find_movielens_files()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- items: original id -> title
    item_cols, item_rows, _ = _read_atomic_table(item_path, ("item_id", "movie_title", "release_year"))
    raw_title: dict[str, str] = {}
    no_year: list[str] = []
    for fields in item_rows:
        item = fields[item_cols["item_id"]]
        year = fields[item_cols["release_year"]]
        raw_title[item] = movielens_title(fields[item_cols["movie_title"]], year)
        if not _YEAR.match(year.strip()):
            no_year.append(item)

    # ---- interactions, in file order; users interned in the order of their (numeric) id
    inter_cols, inter_rows, _ = _read_atomic_table(inter_path, ("user_id", "item_id", "rating", "timestamp"))
    iu, ii, ir, it = (inter_cols[c] for c in ("user_id", "item_id", "rating", "timestamp"))
    unknown = sorted({fields[ii] for fields in inter_rows if fields[ii] not in raw_title}, key=_id_key)
    if unknown:
        raise ValueError(f"{inter_path}: item ids without a row in {item_path}: {unknown[:10]}")
    log = InteractionLog(time_scale=1)
    for user in sorted({fields[iu] for fields in inter_rows}, key=_id_key):
        log.intern_user(user)
    for line_no, fields in enumerate(inter_rows, start=2):
        try:
            rating, stamp = float(fields[ir]), float(fields[it])
        except ValueError:
            raise ValueError(f"{inter_path} line {line_no}: rating or timestamp is not a number") from None
        log.add(fields[iu], log.intern_item(fields[ii]), stamp, rating)
    n_raw = len(log)
    raw_users = len(log.user_keys)
    raw_items = len(log.item_keys)

    # ---- iterative k-core (no time window), shared with the other sources
    core = select_core(log, None, None, min_count=min_count, min_items=0)

    # ---- item renumbering: sorted by original id
    _, item, _, _ = log.arrays()
    kept_index = sorted(set(item[core.mask].tolist()), key=lambda i: _id_key(log.item_keys[i]))
    new_id = {index: position for position, index in enumerate(kept_index)}
    titles = {index: raw_title[log.item_keys[index]] for index in kept_index}

    extra = {
        "source": {"inter": str(inter_path), "item": str(item_path)},
        "params": {"max_history": max_history, "min_count": min_count, "split": list(split)},
        "raw": {"interactions": n_raw, "users": raw_users, "items": raw_items},
        "removed": {"core_filter": core.removed["core_filter"]},
        "items_without_year": sorted(new_id[log.item_index[item_key]] for item_key in no_year
                                     if item_key in log.item_index and log.item_index[item_key] in new_id),
    }
    return write_dataset(
        out, log, core, titles, new_id,
        columns=SPLIT_COLUMNS, max_history=max_history, split=split, extra_stats=extra, progress=False,
    )


def default_data_dir() -> Path:
    """``$LATENTR3_CACHE/data/ml-100k``, or ``~/.cache/latentr3/data/ml-100k``."""
    cache = os.environ.get("LATENTR3_CACHE")
    root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "latentr3"
    return root / "data" / "ml-100k"


def ensure_movielens(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory of the prepared MovieLens-100K split, preparing it (default settings) if any of
    its files is missing."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    needed = [f"{name}.csv" for name in SPLIT_NAMES] + [CATALOGUE_NAME, STATS_NAME]
    if not all((directory / name).is_file() for name in needed):
        prepare_movielens(directory)
    return directory
