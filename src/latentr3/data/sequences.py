"""The source-independent half of ``latentr3 prepare``: interactions held in compact arrays, the time
window (widened while too few items survive), the iterative k-core filter, title rules, item
numbering, per-user sequences, the chronological split and the output files.

Every source (Amazon 2018, Amazon 2023, a generic interaction log, MovieLens-100K) streams its raw
files into an :class:`InteractionLog` (users and items interned to ints; one row per review in file
order) and then calls :func:`select_core` and :func:`write_dataset`.  Memory is bounded by the rows
kept while streaming (four numbers each) and the interned ids, not by the size of the raw files.

Processing rules (those of the paper's released Amazon script, with its bugs fixable):

* a review is inside the window when ``start <= time < end`` (instants in UTC);
* iterative ``min_count``-core on users and items inside the window, until nothing changes; while
  fewer than ``min_items`` items survive, the start moves ``widen_months`` earlier and everything is
  redone (it stops when the window already holds every stored review);
* each user's interactions are sorted by time (ties keep the file order); every interaction after the
  first is a sample whose history is the previous ``<= max_history`` items;
* samples are sorted by target time (stable: ties keep user order, then position) and cut at
  ``floor(0.8 n)`` and ``floor(0.9 n)`` into train / valid / test.
"""

from __future__ import annotations

import html
import json
import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from latentr3.atomic import fault_injection_pause
from latentr3.data.splits import _atomic_write_text, write_catalogue, write_split

__all__ = [
    "PrepareError",
    "InteractionLog",
    "TitleRules",
    "CoreResult",
    "select_core",
    "split_bounds",
    "make_titles_distinct",
    "shuffled_ids",
    "write_dataset",
    "parse_date",
    "shift_months",
    "SPLIT_NAMES",
    "CATALOGUE_NAME",
    "STATS_NAME",
    "AMAZON_COLUMNS",
]

SPLIT_NAMES = ("train", "valid", "test")
CATALOGUE_NAME = "info.txt"
STATS_NAME = "stats.json"
# the columns of the released Amazon split files, in their order
AMAZON_COLUMNS = (
    "user_id",
    "item_asins",
    "item_asin",
    "history_item_id",
    "item_id",
    "history_item_title",
    "item_title",
    "history_rating",
    "rating",
    "history_timestamp",
    "timestamp",
)


class PrepareError(ValueError):
    """Preparing a data set failed for a reason that is not one line of one file (for instance: no
    interaction survives the filters)."""


# --------------------------------------------------------------------------------------------------
# dates


def parse_date(text: str) -> datetime:
    """``YYYY-MM-DD`` (or any ISO 8601 date/time) as an aware datetime; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO date (YYYY-MM-DD): {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


def shift_months(value: datetime, months: int) -> datetime:
    """``value`` moved by ``months`` calendar months (the day clamped to the month's length)."""
    index = value.year * 12 + (value.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    days = [31, 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return value.replace(year=year, month=month, day=min(value.day, days[month - 1]))


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# titles


_HTML_TAGS = (
    "a abbr b big blockquote body br center code dd div dl dt em embed font form h1 h2 h3 h4 h5 h6 head hr "
    "html i iframe img input label li link meta noscript object ol option p pre s script section select small "
    "source span strike strong style sub sup table tbody td textarea th thead tr tt u ul video"
).split()
# "<tag" followed by whitespace, "/", ">" or the end of the title, or a closing "</tag", or a comment
_HTML_MARKUP = re.compile(
    r"</?(?:" + "|".join(sorted(_HTML_TAGS, key=len, reverse=True)) + r")(?=[\s/>]|$)|<!--",
    re.IGNORECASE,
)
_CONTROL_WHITESPACE = re.compile(r"[\t\r\n\v\f\x1c-\x1f\x85\u2028\u2029]")
_VISIT_PAGE = re.compile(r"^Visit Amazon's (.+?) Page$")


def has_html_markup(text: str) -> bool:
    """True when ``text`` holds an HTML tag (``<span class=...``, ``</div>``, ``<br/>``...) or comment."""
    return _HTML_MARKUP.search(text) is not None


@dataclass(frozen=True)
class TitleRules:
    """The title rules of the reference script, with its HTML bug fixable.

    ``drop_html`` on: titles with any HTML markup (before or after unescaping) are dropped.  Off: only
    titles whose raw text contains ``<span id`` are dropped, as in the reference.
    """

    drop_html: bool = True
    max_words: int = 20
    min_chars: int = 2

    def clean(self, raw) -> tuple[str | None, str]:
        """``(title, "")`` for a kept title, ``(None, reason)`` for a dropped one."""
        if raw is None:
            return None, "no_title"
        if not isinstance(raw, str):
            return None, "title_not_a_string"
        if "<span id" in raw:
            return None, "title_html_markup" if self.drop_html else "title_span_id"
        title = html.unescape(raw)
        if self.drop_html and (has_html_markup(raw) or has_html_markup(title)):
            return None, "title_html_markup"
        # tabs and line breaks cannot be stored in the catalogue / CSV: each becomes one space
        title = _CONTROL_WHITESPACE.sub(" ", title)
        if len(title) < self.min_chars:
            return None, "no_title" if not title else "title_too_short"
        if not title.strip():
            return None, "title_blank"
        if len(title.split()) > self.max_words:
            return None, "title_too_long"
        return title, ""


def clean_brand(raw) -> str:
    """A brand / artist / store name usable as a title suffix ('' when there is none)."""
    if isinstance(raw, list):  # a few metadata files store a list
        raw = next((x for x in raw if isinstance(x, str) and x.strip()), "")
    if not isinstance(raw, str):
        return ""
    text = " ".join(_CONTROL_WHITESPACE.sub(" ", html.unescape(raw)).split())
    match = _VISIT_PAGE.match(text)
    if match:
        text = match.group(1).strip()
    if not text or has_html_markup(text) or text.lower() in {"unknown", "n/a", "na", "none", "various", "."}:
        return ""
    return text


def make_titles_distinct(titles: Sequence[str], brands: Sequence[str]) -> tuple[list[str], int, list[list[str]]]:
    """Give every item a distinct title.

    Items whose title is shared get `` (brand)`` appended when they have a brand (their metadata's
    brand / artist / store); titles still shared after that (no brand, or the same brand) get
    `` [2]``, `` [3]``... on their second, third... item (in item order).  A new title never equals
    another item's title.  Returns ``(titles, number of items whose title changed, examples)``.
    """
    count = Counter(titles)
    originals = set(titles)
    result = list(titles)
    for index, title in enumerate(titles):
        if count[title] > 1 and brands[index]:
            candidate = f"{title} ({brands[index]})"
            if candidate not in originals:  # never take another item's own title
                result[index] = candidate
    # what is still shared: the first item (in order) keeps the title, the others get counters
    every = set(result)
    used: set[str] = set()
    for index, title in enumerate(result):
        if title not in used:
            used.add(title)
            continue
        n = 2
        while f"{title} [{n}]" in used or f"{title} [{n}]" in every:
            n += 1
        result[index] = f"{title} [{n}]"
        used.add(result[index])
    assert len(set(result)) == len(result)
    changed = [index for index in range(len(titles)) if result[index] != titles[index]]
    examples = [[titles[i], result[i]] for i in changed[:10]]
    return result, len(changed), examples


def shuffled_ids(keys: Sequence[str], seed: int) -> list[int]:
    """New ids for ``keys``: a permutation of ``0..n-1`` from ``random.Random(seed)`` shuffling the
    keys in sorted order (so the result does not depend on the order the keys were found in)."""
    import random

    order = sorted(range(len(keys)), key=keys.__getitem__)
    random.Random(seed).shuffle(order)
    new_id = [0] * len(keys)
    for position, index in enumerate(order):
        new_id[index] = position
    return new_id


# --------------------------------------------------------------------------------------------------
# interactions


class InteractionLog:
    """Interactions in file order, as compact arrays: interned user and item indices, time, rating.

    ``user_keys[u]`` / ``item_keys[i]`` are the original ids; indices are given in order of first
    appearance.  ``time`` is in the source's unit (``time_scale`` units a second); ``rating`` is NaN
    when the source has none.
    """

    def __init__(self, time_scale: int = 1):
        self.time_scale = time_scale
        self.user_keys: list[str] = []
        self.user_index: dict[str, int] = {}
        self.item_keys: list[str] = []
        self.item_index: dict[str, int] = {}
        self._user = array("i")
        self._item = array("i")
        self._time = array("d")
        self._rating = array("d")

    @staticmethod
    def _intern(keys: list[str], index: dict[str, int], key: str) -> int:
        i = index.get(key)
        if i is None:
            i = index[key] = len(keys)
            keys.append(key)
        return i

    def intern_item(self, key: str) -> int:
        return self._intern(self.item_keys, self.item_index, key)

    def intern_user(self, key: str) -> int:
        return self._intern(self.user_keys, self.user_index, key)

    def add(self, user: str, item: int, time: float, rating: float) -> None:
        index = self.intern_user(user)
        self._user.append(index)
        self._item.append(item)
        self._time.append(time)
        self._rating.append(rating)

    def __len__(self) -> int:
        return len(self._user)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(user, item, time, rating)`` as numpy views of the stored rows."""
        return (
            np.frombuffer(self._user, dtype=np.int32) if len(self._user) else np.zeros(0, np.int32),
            np.frombuffer(self._item, dtype=np.int32) if len(self._item) else np.zeros(0, np.int32),
            np.frombuffer(self._time, dtype=np.float64) if len(self._time) else np.zeros(0, np.float64),
            np.frombuffer(self._rating, dtype=np.float64) if len(self._rating) else np.zeros(0, np.float64),
        )

    def to_native(self, value: datetime) -> float:
        return value.timestamp() * self.time_scale

    def from_native(self, value: float) -> datetime:
        return datetime.fromtimestamp(value / self.time_scale, tz=timezone.utc)


def core_filter(user: np.ndarray, item: np.ndarray, mask: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
    """Iterative ``min_count``-core of the rows in ``mask``: returns the kept mask and the rounds run."""
    mask = mask.copy()
    n_users = int(user.max()) + 1 if len(user) else 0
    n_items = int(item.max()) + 1 if len(item) else 0
    rounds = 0
    while True:
        rounds += 1
        user_count = np.bincount(user[mask], minlength=n_users)
        item_count = np.bincount(item[mask], minlength=n_items)
        still = mask & (user_count[user] >= min_count) & (item_count[item] >= min_count)
        if int(still.sum()) == int(mask.sum()):
            return mask, rounds
        mask = still


@dataclass
class CoreResult:
    mask: np.ndarray  # kept rows of the log
    start: datetime | None  # the window actually used (None: unbounded)
    end: datetime | None
    rounds: int
    attempts: list[dict] = field(default_factory=list)  # one per window tried
    in_window: int = 0  # rows inside the final window
    window_items: int = 0  # distinct items / users of the rows inside the final window
    window_users: int = 0
    min_items_reached: bool = True
    removed: dict[str, int] = field(default_factory=dict)  # rows removed, by reason


def select_core(
    log: InteractionLog,
    start: datetime | None,
    end: datetime | None,
    min_count: int = 5,
    min_items: int = 0,
    widen_months: int = 3,
    warn: Callable[[str], None] | None = None,
) -> CoreResult:
    """The rows inside ``[start, end)`` that survive the iterative k-core, the start moved
    ``widen_months`` earlier while fewer than ``min_items`` items survive."""
    user, item, time, _ = log.arrays()
    if len(user) == 0:
        raise PrepareError("no interaction is left to filter (every review was removed before the time window; see the stats)")
    before_end = np.ones(len(time), bool) if end is None else time < log.to_native(end)
    earliest = float(time[before_end].min()) if before_end.any() else math.inf
    attempts = []
    while True:
        window = before_end if start is None else before_end & (time >= log.to_native(start))
        mask, rounds = core_filter(user, item, window, min_count)
        n_items = int(np.unique(item[mask]).size) if mask.any() else 0
        attempts.append(
            {
                "start": _iso(start) if start else None,
                "end": _iso(end) if end else None,
                "interactions_in_window": int(window.sum()),
                "interactions": int(mask.sum()),
                "items": n_items,
                "core_rounds": rounds,
            }
        )
        if n_items >= min_items or start is None:
            break
        if log.to_native(start) <= earliest:  # the window already holds every stored row
            break
        start = shift_months(start, -widen_months)
    reached = n_items >= min_items
    if not reached and warn is not None:
        warn(
            f"only {n_items} items survive the {min_count}-core even with the widest window "
            f"(start {attempts[-1]['start']}); --min-items asked for {min_items}"
        )
    kept = int(mask.sum())
    if kept == 0:
        raise PrepareError(
            f"no interaction survives the {min_count}-core filter inside the window "
            f"{attempts[-1]['start'] or '-inf'} .. {attempts[-1]['end'] or '+inf'} "
            f"({attempts[-1]['interactions_in_window']} interactions in the window)"
        )
    in_window = int(window.sum())
    removed = {
        "after_window_end": int(len(time) - before_end.sum()),
        "before_window_start": int(before_end.sum() - in_window),
        "core_filter": in_window - kept,
    }
    return CoreResult(
        mask, start, end, rounds, attempts, in_window,
        int(np.unique(item[window]).size), int(np.unique(user[window]).size), reached, removed,
    )


def split_bounds(n: int, split: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[int, int]:
    """``(floor(f0 n), floor((f0 + f1) n))``: train is ``[:a]``, valid ``[a:b]``, test ``[b:]``
    (exact decimal arithmetic, so ``0.8 * n`` has no float error)."""
    if len(split) != 3 or any(f < 0 for f in split):
        raise ValueError(f"split must be three non-negative fractions, got {split!r}")
    fractions = [Fraction(str(f)) for f in split]
    if abs(sum(fractions) - 1) > Fraction(1, 10**9):
        raise ValueError(f"split fractions must sum to 1, got {split!r}")
    return math.floor(fractions[0] * n), math.floor((fractions[0] + fractions[1]) * n)


def _number_repr(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _rating_repr(value: float) -> str:
    return "None" if math.isnan(value) else repr(float(value))


def write_dataset(
    out_dir: str | Path,
    log: InteractionLog,
    core: CoreResult,
    titles: dict[int, str],
    new_id: dict[int, int],
    *,
    columns: Sequence[str] = AMAZON_COLUMNS,
    max_history: int = 10,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    user_order: np.ndarray | None = None,
    extra_stats: dict | None = None,
    progress: bool = False,
) -> dict:
    """Build the samples of the kept rows and write ``train.csv``, ``valid.csv``, ``test.csv``,
    ``info.txt`` and ``stats.json`` (last: its presence marks a complete run).

    ``titles`` / ``new_id`` map the log's item index of every kept item to its (final) title and new
    id.  Users are visited in index order (``user_order`` gives a rank per user index to change it).
    Returns the statistics written to ``stats.json`` (``extra_stats`` merged in first).
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    user, item, time, rating = log.arrays()
    rows = np.flatnonzero(core.mask)
    rank = user[rows] if user_order is None else user_order[user[rows]]
    # each user's rows by (time, file order), users in rank order
    order = rows[np.lexsort((rows, time[rows], rank))]
    seq_user = user[order]
    first = np.ones(len(order), bool)
    first[1:] = seq_user[1:] != seq_user[:-1]
    user_start = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    targets = np.flatnonzero(~first)  # positions in `order` of the samples' targets
    targets = targets[np.argsort(time[order[targets]], kind="stable")]
    n = len(targets)
    if n == 0:
        raise PrepareError("the kept interactions give no sample (every kept user has a single interaction)")
    a, b = split_bounds(n, split)
    parts = {"train": targets[:a], "valid": targets[a:b], "test": targets[b:]}
    for name, part in parts.items():
        if len(part) == 0:
            raise PrepareError(f"the {name} split is empty ({n} samples in all, split {list(split)})")

    kept_items = sorted(titles, key=new_id.__getitem__)
    # per kept item / per sequence position, the rendered cells
    id_str = {i: str(new_id[i]) for i in kept_items}
    title_repr = {i: repr(titles[i]) for i in kept_items}
    key_repr = {i: repr(log.item_keys[i]) for i in kept_items}
    seq_item = item[order].tolist()
    s_ids = [id_str[i] for i in seq_item]
    s_titles = [title_repr[i] for i in seq_item]
    s_keys = [key_repr[i] for i in seq_item]
    s_rating = [_rating_repr(r) for r in rating[order].tolist()]
    s_time = [_number_repr(t) for t in time[order].tolist()]
    starts = user_start.tolist()

    def render(position: int) -> dict:
        s = max(starts[position], position - max_history)
        i = seq_item[position]
        cell = {
            "user_id": log.user_keys[seq_user_list[position]],
            "item_asins": "[" + ", ".join(s_keys[s:position]) + "]",
            "item_asin": log.item_keys[i],
            "history_item_id": "[" + ", ".join(s_ids[s:position]) + "]",
            "item_id": s_ids[position],
            "history_item_title": "[" + ", ".join(s_titles[s:position]) + "]",
            "item_title": titles[i],
            "history_rating": "[" + ", ".join(s_rating[s:position]) + "]",
            "rating": s_rating[position],
            "history_timestamp": "[" + ", ".join(s_time[s:position]) + "]",
            "timestamp": s_time[position],
        }
        return {name: cell[name] for name in columns}

    seq_user_list = seq_user.tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats_path = out / STATS_NAME
    if stats_path.exists():
        stats_path.unlink()
    from tqdm import tqdm

    with tqdm(total=n, desc="writing samples", unit=" samples", disable=not progress, mininterval=1.0) as bar:
        for name, part in parts.items():
            positions = part.tolist()
            write_split(out / f"{name}.csv", _Rows(positions, render, bar))
            fault_injection_pause()  # the kill tests: a dataset half written (stats.json absent)
    final_titles = [titles[i] for i in kept_items]
    write_catalogue(out / CATALOGUE_NAME, [new_id[i] for i in kept_items], final_titles)
    fault_injection_pause()

    title_count = Counter(final_titles)
    shared = {title: c for title, c in title_count.items() if c > 1}
    kept_users = np.unique(user[rows])
    stats = dict(extra_stats or {})
    stats.update(
        {
            "users": int(kept_users.size),
            "items": len(kept_items),
            "interactions": int(len(rows)),
            "samples": {name: int(len(part)) for name, part in parts.items()},
            "samples_total": n,
            "window": {
                "start": _iso(core.start) if core.start else None,
                "end": _iso(core.end) if core.end else None,
                "attempts": core.attempts,
                "min_items_reached": core.min_items_reached,
            },
            "core_filter_rounds": core.rounds,
            "target_time_range": {
                name: [_iso(log.from_native(time[order[part[0]]])), _iso(log.from_native(time[order[part[-1]]]))]
                for name, part in parts.items()
            },
            "distinct_titles": len(title_count),
            "duplicate_titles": len(shared),
            "items_with_duplicate_title": sum(shared.values()),
            "duplicate_title_share": round(sum(shared.values()) / len(kept_items), 6),
            "duplicate_title_examples": sorted(shared)[:10],
        }
    )
    _atomic_write_text(stats_path, lambda handle: handle.write(json.dumps(stats, indent=2, ensure_ascii=False) + "\n"))
    return stats


class _Rows:
    """A lazily rendered sequence of split rows (``write_split`` turns it into a list once)."""

    def __init__(self, positions: list[int], render: Callable[[int], dict], bar):
        self.positions, self.render, self.bar = positions, render, bar

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterable[dict]:
        render, bar = self.render, self.bar
        for k, position in enumerate(self.positions, start=1):
            yield render(position)
            if k % 10000 == 0:
                bar.update(10000)
        bar.update(len(self.positions) % 10000)


def title_stats(titles: Iterable[str]) -> dict:
    titles = list(titles)
    count = Counter(titles)
    shared = sum(c for c in count.values() if c > 1)
    return {
        "distinct_titles": len(count),
        "duplicate_titles": sum(1 for c in count.values() if c > 1),
        "items_with_duplicate_title": shared,
        "duplicate_title_share": round(shared / len(titles), 6) if titles else 0.0,
    }


# --------------------------------------------------------------------------------------------------
# the whole pipeline over record sources


class ItemSource:
    """Protocol of an item table: ``path`` and ``items(progress, wanted=None)`` yielding
    ``(line, key, raw_title, raw_brand)``; with ``wanted`` (a set of line numbers) only those lines
    need to be produced.  ``report()`` gives the file statistics (lines, malformed lines...)."""

    path: str

    def items(self, progress: bool, wanted: set[int] | None = None):  # pragma: no cover - protocol
        raise NotImplementedError

    def report(self) -> dict:  # pragma: no cover - protocol
        return {}


class ReviewSource:
    """Protocol of an interaction log: ``reviews(progress)`` yielding ``(line, user, item_key, time,
    rating)`` (time in the source's unit; rating NaN when none); ``bad_lines`` counts the malformed
    lines it skipped; ``report()`` gives the file statistics."""

    path: str
    time_scale: int = 1
    bad_lines: int = 0

    def reviews(self, progress: bool):  # pragma: no cover - protocol
        raise NotImplementedError

    def report(self) -> dict:  # pragma: no cover - protocol
        return {}


def _warn(message: str) -> None:
    import sys

    print(f"latentr3 prepare: warning: {message}", file=sys.stderr)


def prepare_from_sources(
    out_dir: str | Path,
    items_source: ItemSource,
    reviews_source: ReviewSource,
    *,
    source: str,
    start: datetime | None,
    end: datetime | None,
    min_count: int = 5,
    min_items: int = 5000,
    widen_months: int = 3,
    max_history: int = 10,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
    drop_html: bool = True,
    dedupe_titles: bool = True,
    progress: bool = True,
    params: dict | None = None,
    warn: Callable[[str], None] | None = _warn,
) -> dict:
    """Items table + interaction log -> split files, catalogue and ``stats.json`` under ``out_dir``.

    1. the item table (first pass): every item key interned, its title judged by :class:`TitleRules`
       (duplicate keys: the first line wins); only the verdict and the line number are kept;
    2. the log: rows of items without metadata or with a dropped title, and rows at or after ``end``,
       are counted by reason; the others are kept as four numbers each;
    3. :func:`select_core` (window, k-core, widening);
    4. the item table again, parsing only the lines of kept items (titles, brands);
    5. ids from a ``seed``-ed shuffle, titles made distinct (``dedupe_titles``), :func:`write_dataset`.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"the window start {_iso(start)} is not before its end {_iso(end)}")
    rules = TitleRules(drop_html=drop_html)
    log = InteractionLog(time_scale=reviews_source.time_scale)

    # 1. items
    reasons = [""]
    code_of = {"": 0}
    status = bytearray()
    item_line = array("q")
    duplicate_lines = 0
    for line, key, raw_title, _ in items_source.items(progress):
        if key in log.item_index:
            duplicate_lines += 1
            continue
        log.intern_item(key)
        _, reason = rules.clean(raw_title)
        code = code_of.get(reason)
        if code is None:
            code = code_of[reason] = len(reasons)
            reasons.append(reason)
        status.append(code)
        item_line.append(line)
    n_meta_items = len(log.item_keys)
    if n_meta_items == 0:
        raise PrepareError(f"{items_source.path}: the item table has no item")
    item_status = np.frombuffer(bytes(status), dtype=np.uint8)
    items_removed = Counter({f"{reasons[c]}": int(n) for c, n in enumerate(np.bincount(item_status)) if c and n})
    valid_items = int((item_status == 0).sum())
    if valid_items == 0:
        raise PrepareError(
            f"{items_source.path}: no item has a usable title ({dict(items_removed)}); nothing to prepare"
        )

    # 2. interactions
    reviews_removed: Counter = Counter()
    end_native = log.to_native(end) if end is not None else math.inf
    item_index = log.item_index
    add = log.add
    for line, user, key, time_value, rating in reviews_source.reviews(progress):
        index = item_index.get(key)
        if index is None:
            reviews_removed["item_not_in_metadata"] += 1
            continue
        code = status[index]
        if code:
            reviews_removed["item_" + reasons[code]] += 1
            continue
        if time_value >= end_native:
            reviews_removed["after_window_end"] += 1
            continue
        add(user, index, time_value, rating)
    if reviews_source.bad_lines:
        reviews_removed["malformed_line"] += reviews_source.bad_lines
    if len(log) == 0:
        raise PrepareError(
            f"{reviews_source.path}: no review is left after matching the item table and the window end "
            f"(removed: {dict(reviews_removed)})"
        )

    reviews_read = len(log) + sum(reviews_removed.values())

    # 3. window + core
    core = select_core(log, start, end, min_count, min_items, widen_months, warn)
    for reason, n in core.removed.items():
        if n:
            reviews_removed[reason] += n
    user, item, time, _ = log.arrays()
    kept_items = np.unique(item[core.mask]).tolist()
    items_removed["no_review_in_window"] += valid_items - core.window_items
    items_removed["core_filter"] += core.window_items - len(kept_items)

    # 4. titles of the kept items
    wanted = {item_line[i]: i for i in kept_items}
    title_of: dict[int, str] = {}
    brand_of: dict[int, str] = {}
    for line, key, raw_title, raw_brand in items_source.items(progress, wanted=set(wanted)):
        index = wanted.get(line)
        if index is None or index in title_of or log.item_keys[index] != key:
            continue
        title, reason = rules.clean(raw_title)
        if title is None:  # cannot happen unless the file changed between the passes
            raise PrepareError(f"{items_source.path} line {line}: the title changed between two reads ({reason})")
        title_of[index] = title
        brand_of[index] = clean_brand(raw_brand)
    missing = [i for i in kept_items if i not in title_of]
    if missing:
        raise PrepareError(f"{items_source.path}: the file changed while it was read (item {log.item_keys[missing[0]]!r})")

    # 5. ids, titles, files
    new_ids = shuffled_ids([log.item_keys[i] for i in kept_items], seed)
    new_id = dict(zip(kept_items, new_ids))
    by_id = sorted(kept_items, key=new_id.__getitem__)
    before = title_stats(title_of[i] for i in by_id)
    changed, examples = 0, []
    if dedupe_titles:
        distinct, changed, examples = make_titles_distinct([title_of[i] for i in by_id], [brand_of[i] for i in by_id])
        title_of = dict(zip(by_id, distinct))
    window_users = core.window_users
    extra = {
        "source": source,
        "files": {"items": items_source.report(), "reviews": reviews_source.report()},
        "params": dict(params or {}),
        "reviews": {
            "read": int(reviews_read),
            "kept": int(core.mask.sum()),
            "removed": dict(sorted(reviews_removed.items())),
        },
        "item_table": {
            "items": n_meta_items,
            "duplicate_key_lines": duplicate_lines,
            "with_usable_title": valid_items,
            "kept": len(kept_items),
            "removed": dict(sorted((r, n) for r, n in items_removed.items() if n or r in ("no_review_in_window", "core_filter"))),
        },
        "users_in_window": window_users,
        "titles": {
            "before_dedupe": before,
            "dedupe": dedupe_titles,
            "changed_by_dedupe": changed,
            "dedupe_examples": examples,
        },
    }
    # users in the order of their first kept interaction in the file
    kept_rows = np.flatnonzero(core.mask)
    first_users, first_rows = np.unique(user[kept_rows], return_index=True)
    user_order = np.full(len(log.user_keys), len(kept_rows), dtype=np.int64)
    user_order[first_users] = first_rows
    return write_dataset(
        out_dir, log, core, title_of, new_id,
        columns=AMAZON_COLUMNS, max_history=max_history, split=split, user_order=user_order,
        extra_stats=extra, progress=progress,
    )
