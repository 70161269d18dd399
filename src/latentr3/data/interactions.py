"""Any interaction log with an item table -> the paper's split files (``latentr3 prepare interactions``).

The log and the item table are CSV files (comma-separated; tab-separated for ``.tsv``; gzip read
directly) or Parquet files (``.parquet`` / ``.pq``; needs pyarrow).  Columns are named on the
command line.  Times are numbers (seconds, or milliseconds with ``time_unit="ms"``) or ISO 8601
date-times (UTC when they carry no offset).  The processing is that of the Amazon sources
(:func:`latentr3.data.sequences.prepare_from_sources`); by default without a time window.

Malformed CSV rows (a wrong number of fields) are skipped, counted and listed, up to
``max_bad_lines``; an empty key, a time that is neither a number nor an ISO date-time, a rating that is
not a number are errors naming file and line (Parquet: row, 1-based).
"""

from __future__ import annotations

import csv
import io
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from latentr3.data.amazon import _window, check_time, open_binary, parse_number
from latentr3.data.sequences import ItemSource, ReviewSource, prepare_from_sources
from latentr3.data.splits import DataFormatError

__all__ = ["TableFile", "prepare_interactions", "PARQUET_HINT"]

PARQUET_HINT = "reading Parquet files needs pyarrow (pip install pyarrow)"


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


class TableFile:
    """A CSV or Parquet table read row by row; :meth:`rows` yields ``(line, [values of columns])``."""

    def __init__(self, path: str | os.PathLike, columns: list[str], max_bad_lines: int = 100, desc: str = ""):
        self.path = Path(path)
        self.columns = columns
        self.max_bad_lines = max_bad_lines
        self.desc = desc or self.path.name
        self.lines = 0
        self.bad_lines: list[int] = []
        self.bad_examples: list[str] = []
        self._counted = False
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        if _is_parquet(self.path):
            try:
                import pyarrow.parquet  # noqa: F401
            except ImportError:
                raise ImportError(f"{self.path}: {PARQUET_HINT}") from None

    def rows(self, progress: bool = False, wanted: set[int] | None = None):
        if _is_parquet(self.path):
            yield from self._parquet_rows(progress, wanted)
        else:
            yield from self._csv_rows(progress, wanted)

    def _header_error(self, found: list[str]):
        missing = [c for c in self.columns if c not in found]
        raise DataFormatError(
            self.path, 1, f"missing column(s) {', '.join(missing)}; the file has columns: {', '.join(found)}"
        )

    def _parquet_rows(self, progress: bool, wanted: set[int] | None):
        import pyarrow.parquet as pq
        from tqdm import tqdm

        handle = pq.ParquetFile(self.path)
        names = handle.schema_arrow.names
        if any(c not in names for c in self.columns):
            self._header_error(names)
        row = 0
        with tqdm(total=handle.metadata.num_rows, unit=" rows", desc=self.desc, disable=not progress, mininterval=1.0) as bar:
            for batch in handle.iter_batches(columns=list(dict.fromkeys(self.columns)), batch_size=65536):
                columns = [batch.column(c).to_pylist() for c in self.columns]
                for values in zip(*columns):
                    row += 1
                    if wanted is None or row in wanted:
                        yield row, list(values)
                bar.update(batch.num_rows)
        self.lines = row
        self._counted = True

    def _csv_rows(self, progress: bool, wanted: set[int] | None):
        from tqdm import tqdm

        delimiter = "\t" if self.path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
        counting = wanted is None and not self._counted
        size = self.path.stat().st_size
        with open_binary(self.path) as (stream, raw), tqdm(
            total=size, unit="B", unit_scale=True, desc=self.desc, disable=not progress, mininterval=1.0
        ) as bar:
            text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
            reader = csv.reader(text, delimiter=delimiter)
            try:
                header = [name.strip() for name in next(reader)]
            except StopIteration:
                raise DataFormatError(self.path, 1, "the file is empty (no header line)") from None
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DataFormatError(self.path, 1, f"unreadable header: {exc}") from None
            if any(c not in header for c in self.columns):
                self._header_error(header)
            doubled = sorted({c for c in self.columns if header.count(c) > 1})
            if doubled:
                raise DataFormatError(self.path, 1, f"column(s) {', '.join(doubled)} appear more than once in the "
                                      "header; which one holds the values is ambiguous")
            index = [header.index(c) for c in self.columns]
            width = len(header)
            done = 0
            k = 0
            while True:
                line = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except (csv.Error, UnicodeDecodeError) as exc:
                    if counting:
                        self._bad(line, f"malformed CSV: {exc}")
                    if isinstance(exc, UnicodeDecodeError):
                        raise DataFormatError(self.path, line, f"not valid UTF-8: {exc}") from None
                    continue
                k += 1
                if k % 20000 == 0:
                    bar.update(raw.tell() - done)
                    done = raw.tell()
                if wanted is not None and line not in wanted:
                    continue
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != width:
                    if counting:
                        self._bad(line, f"expected {width} fields (as in the header), found {len(row)}")
                    continue
                yield line, [row[i] for i in index]
            bar.update(raw.tell() - done)
            if counting:
                self.lines = reader.line_num
                self._counted = True

    def _bad(self, line: int, problem: str) -> None:
        self.bad_lines.append(line)
        if len(self.bad_examples) < 5:
            self.bad_examples.append(f"line {line}: {problem[:200]}")
        if len(self.bad_lines) > self.max_bad_lines:
            raise DataFormatError(
                self.path, line,
                f"{problem}; more than --max-bad-lines {self.max_bad_lines} malformed lines "
                f"(lines {', '.join(map(str, self.bad_lines[:20]))}{' ...' if len(self.bad_lines) > 20 else ''})",
            )

    def report(self) -> dict:
        return {
            "path": str(self.path),
            "lines": self.lines,
            "malformed_lines": len(self.bad_lines),
            "malformed_line_numbers": self.bad_lines[:1000],
            "malformed_examples": self.bad_examples,
        }


def _text_key(path, line: int, name: str, value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = "" if value is None else str(value).strip()
    if not text:
        raise DataFormatError(path, line, f"column {name!r} is empty")
    return text


class TableItems(ItemSource):
    def __init__(self, table: TableFile, brand: bool):
        self.table, self.brand = table, brand
        self.path = str(table.path)

    def items(self, progress: bool, wanted: set[int] | None = None):
        path, name = self.table.path, self.table.columns[0]
        for line, values in self.table.rows(progress, wanted):
            title = values[1]
            if title is not None and not isinstance(title, str):
                title = str(title)
            yield line, _text_key(path, line, name, values[0]), (title or None), (values[2] if self.brand else None)

    def report(self) -> dict:
        return self.table.report()


class TableReviews(ReviewSource):
    def __init__(self, table: TableFile, rating: bool, time_scale: int):
        self.table, self.rating = table, rating
        self.time_scale = time_scale
        self.path = str(table.path)

    @property
    def bad_lines(self) -> int:
        return len(self.table.bad_lines)

    def _time(self, line: int, value) -> float:
        name = self.table.columns[2]
        if isinstance(value, datetime):
            moment = value
        else:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            text = "" if value is None else str(value).strip()
            if number is None:
                try:
                    number = float(text)
                except (ValueError, OverflowError):
                    pass
            if number is not None:
                if not math.isfinite(number):
                    raise DataFormatError(self.table.path, line, f"column {name!r} is not a finite number: {text[:60]!r}")
                return check_time(self.table.path, line, name, number, self.time_scale)
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
            except ValueError:
                raise DataFormatError(
                    self.table.path, line, f"column {name!r} is neither a number nor an ISO date-time: {text[:60]!r}"
                ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        try:
            return check_time(self.table.path, line, name, moment.timestamp() * self.time_scale, self.time_scale)
        except (OverflowError, ValueError, OSError) as exc:
            if isinstance(exc, DataFormatError):
                raise
            raise DataFormatError(self.table.path, line, f"column {name!r}: the date-time is out of range: "
                                  f"{str(value)[:60]!r}") from None

    def reviews(self, progress: bool):
        path, columns = self.table.path, self.table.columns
        for line, values in self.table.rows(progress):
            user = _text_key(path, line, columns[0], values[0])
            item = _text_key(path, line, columns[1], values[1])
            time = self._time(line, values[2])
            rating = parse_number(path, line, columns[3], values[3]) if self.rating else math.nan
            yield line, user, item, time, rating

    def report(self) -> dict:
        return self.table.report()


def prepare_interactions(
    file: str | os.PathLike,
    items: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    title_col: str,
    item_key_col: str | None = None,
    rating_col: str | None = None,
    brand_col: str | None = None,
    time_unit: str = "s",
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    min_count: int = 5,
    min_items: int = 0,
    widen_months: int = 3,
    max_history: int = 10,
    seed: int = 42,
    drop_html: bool = True,
    dedupe_titles: bool = True,
    max_bad_lines: int = 100,
    progress: bool = True,
) -> dict:
    """An interaction log plus an item table -> split files under ``out_dir``; returns the stats.

    ``item_key_col`` is the item table's key column (default: ``item_col``).  Without a
    ``rating_col`` the rating columns hold ``None``.  The ``item_asins`` / ``item_asin`` columns of
    the split files hold the log's item keys.
    """
    if time_unit not in ("s", "ms"):
        raise ValueError(f"time_unit must be 's' or 'ms', got {time_unit!r}")
    key_col = item_key_col or item_col
    item_columns = [key_col, title_col] + ([brand_col] if brand_col else [])
    log_columns = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    item_table = TableFile(items, item_columns, max_bad_lines, desc="items")
    log_table = TableFile(file, log_columns, max_bad_lines, desc="interactions")
    start_dt, end_dt = _window(start, end)
    params = {
        "file": str(file), "items": str(items), "user_col": user_col, "item_col": item_col,
        "time_col": time_col, "title_col": title_col, "item_key_col": key_col, "rating_col": rating_col,
        "brand_col": brand_col, "time_unit": time_unit,
        "start": start_dt.isoformat() if start_dt else None, "end": end_dt.isoformat() if end_dt else None,
        "min_count": min_count, "min_items": min_items, "widen_months": widen_months,
        "max_history": max_history, "seed": seed, "drop_html": drop_html, "dedupe_titles": dedupe_titles,
        "max_bad_lines": max_bad_lines,
    }
    return prepare_from_sources(
        out_dir,
        TableItems(item_table, brand=bool(brand_col)),
        TableReviews(log_table, rating=bool(rating_col), time_scale=1000 if time_unit == "ms" else 1),
        source="interactions", start=start_dt, end=end_dt, min_count=min_count, min_items=min_items,
        widen_months=widen_months, max_history=max_history, seed=seed, drop_html=drop_html,
        dedupe_titles=dedupe_titles, progress=progress, params=params,
    )
