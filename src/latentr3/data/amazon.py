"""Amazon review data (McAuley lab) -> the paper's split files.

* Amazon 2018 (``<Category>.json[.gz]`` reviews: ``reviewerID``, ``asin``, ``overall``,
  ``unixReviewTime`` in seconds; ``meta_<Category>.json[.gz]``: ``asin``, ``title``, ``brand``).
  The meta files are sometimes Python dict literals rather than JSON: a line that is not JSON is
  tried with ``ast.literal_eval``.
* Amazon 2023 (``<Category>.jsonl[.gz]``: ``user_id``, ``parent_asin``, ``rating``, ``timestamp`` in
  milliseconds; ``meta_<Category>.jsonl[.gz]``: ``parent_asin``, ``title``, ``store``).  Timestamps
  are kept (and written) in milliseconds.

Files are streamed line by line (gzip recognised by its magic bytes, whatever the name).  Malformed
lines are skipped, counted and listed (with their line numbers) in the statistics, up to
``max_bad_lines`` per file; one more is an error.  A line that parses but lacks a needed field, or has
a timestamp or rating that is not a number, is an error naming the file and line.  The processing
itself is :func:`latentr3.data.sequences.prepare_from_sources`.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from latentr3.data.sequences import ItemSource, ReviewSource, parse_date, prepare_from_sources
from latentr3.data.splits import DataFormatError

__all__ = [
    "DEFAULT_START",
    "DEFAULT_END",
    "JsonLinesFile",
    "open_binary",
    "prepare_amazon2018",
    "prepare_amazon2023",
]

DEFAULT_START = "2017-10-01"
DEFAULT_END = "2018-11-01"
_PROGRESS_EVERY = 20000


@contextmanager
def open_binary(path: str | os.PathLike):
    """``(binary line stream, raw file)``: gzip-decompressed when the file starts with the gzip magic.
    The raw file's ``tell()`` measures progress in bytes of the file on disk."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = open(path, "rb")
    try:
        magic = raw.read(2)
        raw.seek(0)
        if magic == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, raw
        else:
            yield raw, raw
    finally:
        raw.close()


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class JsonLinesFile:
    """One JSON object a line.  :meth:`records` yields ``(line, dict)`` for the good lines; blank
    lines are skipped (and counted); malformed ones (not JSON, not a dict literal either when
    ``literal_fallback``, not an object, not UTF-8) are counted, their line numbers kept, and after
    ``max_bad_lines`` of them the next one raises :class:`DataFormatError`."""

    def __init__(self, path: str | os.PathLike, max_bad_lines: int = 100, literal_fallback: bool = False, desc: str = ""):
        self.path = Path(path)
        self.max_bad_lines = max_bad_lines
        self.literal_fallback = literal_fallback
        self.desc = desc or self.path.name
        self.lines = 0
        self.blank_lines = 0
        self.literal_lines = 0
        self.bad_lines: list[int] = []
        self.bad_examples: list[str] = []
        self._counted = False

    def _parse(self, data: bytes, counting: bool):
        try:
            return json.loads(data.decode("utf-8")), None  # str: json skips its encoding detection
        except (ValueError, RecursionError) as exc:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
            problem = f"not valid JSON ({exc})"
        if self.literal_fallback:
            try:
                value = ast.literal_eval(data.decode("utf-8").strip())
                self.literal_lines += counting
                return value, None
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
                pass
        return None, problem

    def _bad(self, line: int, problem: str) -> None:
        self.bad_lines.append(line)
        if len(self.bad_examples) < 5:
            self.bad_examples.append(f"line {line}: {problem[:200]}")
        if len(self.bad_lines) > self.max_bad_lines:
            raise DataFormatError(
                self.path,
                line,
                f"{problem}; more than --max-bad-lines {self.max_bad_lines} malformed lines "
                f"(lines {', '.join(map(str, self.bad_lines[:20]))}{' ...' if len(self.bad_lines) > 20 else ''})",
            )

    def records(self, progress: bool = False, wanted: set[int] | None = None) -> Iterator[tuple[int, dict]]:
        """Good lines as ``(line, object)``; with ``wanted`` only those line numbers are parsed
        (malformed lines were already counted by a full pass)."""
        from tqdm import tqdm

        full = wanted is None
        counting = full and not self._counted
        remaining = None if full else len(wanted)
        size = self.path.stat().st_size if self.path.is_file() else None
        with open_binary(self.path) as (stream, raw), tqdm(
            total=size, unit="B", unit_scale=True, desc=self.desc, disable=not progress, mininterval=1.0
        ) as bar:
            done = 0
            line = 0
            for line, data in enumerate(stream, start=1):
                if line % _PROGRESS_EVERY == 0:
                    position = raw.tell()
                    bar.update(position - done)
                    done = position
                if not full:
                    if line not in wanted:
                        continue
                    remaining -= 1
                if not data.strip():
                    if counting:
                        self.blank_lines += 1
                    continue
                if line == 1 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM
                    data = data[3:]
                value, problem = self._parse(data, counting)
                if problem is None and not isinstance(value, dict):
                    problem = f"not a JSON object (a {type(value).__name__})"
                if problem is not None:
                    if counting:
                        self._bad(line, problem)
                    continue
                yield line, value
                if remaining == 0:
                    break
            bar.update(raw.tell() - done)
            if counting:
                self.lines = line
                self._counted = True

    def report(self) -> dict:
        return {
            "path": str(self.path),
            "lines": self.lines,
            "blank_lines": self.blank_lines,
            "python_literal_lines": self.literal_lines,
            "malformed_lines": len(self.bad_lines),
            "malformed_line_numbers": self.bad_lines[:1000],
            "malformed_examples": self.bad_examples,
        }


def _field(path, line: int, record: dict, name: str):
    try:
        return record[name]
    except KeyError:
        raise DataFormatError(path, line, f"missing field {name!r} (the line has: {', '.join(map(str, list(record)[:12]))})") from None


def _key(path, line: int, record: dict, name: str) -> str:
    value = _field(path, line, record, name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise DataFormatError(path, line, f"field {name!r} is not a non-empty string: {_short(value)}")
    return value


def parse_number(path, line: int, name: str, value, integral: bool = False) -> float:
    """A timestamp or rating: a JSON number or a numeric string; an error naming file and line."""
    if isinstance(value, bool):
        result = None
    elif isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            result = None
    else:
        result = None
    if result is None or not math.isfinite(result) or (integral and not result.is_integer()):
        what = "an integer" if integral else "a number"
        raise DataFormatError(path, line, f"field {name!r} is not {what}: {_short(value)}")
    return result


# Times the datetime module can represent (years 1..9999), in seconds; sources in ms scale them.
TIME_MIN_S, TIME_MAX_S = -62135596800, 253402300799


def check_time(path, line: int, name: str, value: float, scale: int):
    """`value` (a finite number of 1/`scale` seconds) inside the years 1..9999, or a DataFormatError."""
    if not TIME_MIN_S * scale <= value <= TIME_MAX_S * scale:
        unit = "seconds" if scale == 1 else "milliseconds"
        raise DataFormatError(path, line, f"field {name!r} is out of range for a time in {unit} since 1970 "
                              f"(years 1 to 9999): {_short(value)}")
    return value


class JsonItems(ItemSource):
    def __init__(self, file: JsonLinesFile, key: str, title: str, brand: str):
        self.file, self.key, self.title, self.brand = file, key, title, brand
        self.path = str(file.path)

    def items(self, progress: bool, wanted: set[int] | None = None):
        path, key, title, brand = self.file.path, self.key, self.title, self.brand
        for line, record in self.file.records(progress, wanted):
            yield line, _key(path, line, record, key), record.get(title), record.get(brand)

    def report(self) -> dict:
        return self.file.report()


class JsonReviews(ReviewSource):
    def __init__(self, file: JsonLinesFile, user: str, item: str, rating: str, time: str, time_scale: int):
        self.file, self.user, self.item, self.rating, self.time = file, user, item, rating, time
        self.time_scale = time_scale
        self.path = str(file.path)

    @property
    def bad_lines(self) -> int:
        return len(self.file.bad_lines)

    def reviews(self, progress: bool):
        path, user, item, rating, time = self.file.path, self.user, self.item, self.rating, self.time
        t_min, t_max = TIME_MIN_S * self.time_scale, TIME_MAX_S * self.time_scale
        for line, record in self.file.records(progress):
            try:
                u, i, r, t = record[user], record[item], record[rating], record[time]
            except KeyError:
                for name in (user, item, rating, time):
                    _field(path, line, record, name)
            if type(u) is not str or not u:
                u = _key(path, line, record, user)
            if type(i) is not str or not i:
                i = _key(path, line, record, item)
            if type(t) is not int:
                t = parse_number(path, line, time, t, integral=True)
            if not t_min <= t <= t_max:  # negative or huge: out of what a datetime can hold
                check_time(path, line, time, t, self.time_scale)
            if type(r) is not float or r - r != 0.0:  # not a float, or NaN / inf
                r = parse_number(path, line, rating, r)
            yield line, u, i, t, r

    def report(self) -> dict:
        return self.file.report()


def _window(start: str | datetime | None, end: str | datetime | None) -> tuple[datetime | None, datetime | None]:
    def one(value):
        if value is None or isinstance(value, datetime):
            return value
        if value.strip().lower() in ("", "none"):  # no bound
            return None
        return parse_date(value)

    return one(start), one(end)


def _prepare_amazon(
    flavour: str,
    reviews: str | os.PathLike,
    meta: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    start: str | datetime | None = DEFAULT_START,
    end: str | datetime | None = DEFAULT_END,
    min_count: int = 5,
    min_items: int = 5000,
    widen_months: int = 3,
    max_history: int = 10,
    seed: int = 42,
    drop_html: bool = True,
    dedupe_titles: bool = True,
    max_bad_lines: int = 100,
    progress: bool = True,
) -> dict:
    start_dt, end_dt = _window(start, end)
    if flavour == "amazon2018":
        meta_file = JsonLinesFile(meta, max_bad_lines, literal_fallback=True, desc="metadata")
        review_file = JsonLinesFile(reviews, max_bad_lines, literal_fallback=True, desc="reviews")
        items = JsonItems(meta_file, "asin", "title", "brand")
        log = JsonReviews(review_file, "reviewerID", "asin", "overall", "unixReviewTime", time_scale=1)
    else:
        meta_file = JsonLinesFile(meta, max_bad_lines, literal_fallback=False, desc="metadata")
        review_file = JsonLinesFile(reviews, max_bad_lines, literal_fallback=False, desc="reviews")
        items = JsonItems(meta_file, "parent_asin", "title", "store")
        log = JsonReviews(review_file, "user_id", "parent_asin", "rating", "timestamp", time_scale=1000)
    params = {
        "reviews": str(reviews),
        "meta": str(meta),
        "start": start_dt.isoformat() if start_dt else None,
        "end": end_dt.isoformat() if end_dt else None,
        "min_count": min_count,
        "min_items": min_items,
        "widen_months": widen_months,
        "max_history": max_history,
        "seed": seed,
        "drop_html": drop_html,
        "dedupe_titles": dedupe_titles,
        "max_bad_lines": max_bad_lines,
        "time_unit": "s" if flavour == "amazon2018" else "ms",
    }
    return prepare_from_sources(
        out_dir, items, log, source=flavour, start=start_dt, end=end_dt, min_count=min_count,
        min_items=min_items, widen_months=widen_months, max_history=max_history, seed=seed,
        drop_html=drop_html, dedupe_titles=dedupe_titles, progress=progress, params=params,
    )


def prepare_amazon2018(reviews, meta, out_dir, **kwargs) -> dict:
    """Amazon Review Data 2018 (one category) -> split files under ``out_dir``; returns the stats.

    Keyword arguments: ``start``/``end`` (ISO dates, UTC; defaults 2017-10-01 / 2018-11-01),
    ``min_count`` (5), ``min_items`` (5000), ``widen_months`` (3), ``max_history`` (10), ``seed`` (42),
    ``drop_html`` / ``dedupe_titles`` (the two fixes, on), ``max_bad_lines`` (100), ``progress``.
    """
    return _prepare_amazon("amazon2018", reviews, meta, out_dir, **kwargs)


def prepare_amazon2023(reviews, meta, out_dir, **kwargs) -> dict:
    """Amazon Reviews 2023 (one category; ``parent_asin`` as the item) -> split files; as
    :func:`prepare_amazon2018`."""
    return _prepare_amazon("amazon2023", reviews, meta, out_dir, **kwargs)
