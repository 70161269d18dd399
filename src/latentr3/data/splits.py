"""Reading (and writing) the split files and item catalogue of the paper's released format.

Split files are CSV files with (at least) the columns ``history_item_title`` (a Python list literal of
str), ``item_title``, ``history_item_id`` (a Python list literal of int) and ``item_id``.  Columns are
found by name; every other column is kept, as its raw string, in :attr:`Sample.extra`.

The catalogue is a text file with one item a line, either ``title<TAB>item_id`` or
``code<TAB>title<TAB>item_id``.

Every problem with an input file is reported as a :class:`DataFormatError` whose message names the
file, the 1-based line number (the header is line 1) and the problem.
"""

from __future__ import annotations

import ast
import csv
import io
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "DataFormatError",
    "Catalogue",
    "Sample",
    "read_catalogue",
    "read_split",
    "write_split",
    "write_catalogue",
    "REQUIRED_COLUMNS",
    "CATALOGUE_FORMATS",
]

REQUIRED_COLUMNS = ("history_item_title", "item_title", "history_item_id", "item_id")
CATALOGUE_FORMATS = ("auto", "title_id", "code_title_id")
_FIELDS_OF_FORMAT = {"title_id": 2, "code_title_id": 3}
_FORMAT_OF_FIELDS = {2: "title_id", 3: "code_title_id"}
_LAYOUT_OF_FORMAT = {"title_id": "title<TAB>item_id", "code_title_id": "code<TAB>title<TAB>item_id"}


class DataFormatError(ValueError):
    """A data file is malformed. The message names the file, the 1-based line and the problem."""

    def __init__(self, path: Any, line: int, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{self.path} line {line}: {problem}")


def _short(value: str, limit: int = 80) -> str:
    """repr() of a raw value, cut to ``limit`` characters for error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


# --------------------------------------------------------------------------------------------------
# catalogue


@dataclass
class Catalogue:
    path: str
    ids: list[int]  # item ids in file order
    titles: list[str]  # titles in file order (titles[i] is the title of ids[i])
    codes: list[str] | None = None  # per-item codes (code_title_id format only)
    lines: list[int] | None = None  # line number of each item in its file (when read from a file)
    _title_by_id: dict[int, str] = field(init=False, repr=False, compare=False)
    _index_by_id: dict[int, int] = field(init=False, repr=False, compare=False)
    _ids_by_title: dict[str, list[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.titles):
            raise ValueError(f"{len(self.ids)} ids but {len(self.titles)} titles")
        if self.codes is not None and len(self.codes) != len(self.ids):
            raise ValueError(f"{len(self.ids)} ids but {len(self.codes)} codes")
        self._index_by_id = {}
        self._title_by_id = {}
        self._ids_by_title = {}
        for index, (item_id, title) in enumerate(zip(self.ids, self.titles)):
            if item_id in self._index_by_id:
                raise ValueError(f"duplicate item id {item_id} in catalogue {self.path}")
            if not isinstance(title, str) or not title.strip():
                raise ValueError(f"empty title for item id {item_id} in catalogue {self.path}")
            self._index_by_id[item_id] = index
            self._title_by_id[item_id] = title
            self._ids_by_title.setdefault(title, []).append(item_id)

    def title_of(self, item_id: int) -> str:
        """The title of ``item_id``; KeyError when the id is not in the catalogue."""
        try:
            return self._title_by_id[item_id]
        except KeyError:
            raise KeyError(f"item id {item_id!r} is not in the catalogue {self.path}") from None

    def items_with_title(self, title: str) -> list[int]:
        """All ids (in file order) whose title is exactly ``title``; [] when there is none."""
        return list(self._ids_by_title.get(title, ()))

    def index_of(self, item_id: int) -> int:
        """Position of ``item_id`` in :attr:`ids`."""
        return self._index_by_id[item_id]

    def line_of(self, item_id: int) -> int | None:
        """Line of ``item_id`` in the catalogue file (None when not read from a file)."""
        if self.lines is None:
            return None
        return self.lines[self._index_by_id[item_id]]

    @property
    def distinct_titles(self) -> int:
        return len(self._ids_by_title)

    def __contains__(self, item_id: object) -> bool:
        try:
            return item_id in self._title_by_id
        except TypeError:  # unhashable
            return False

    def __len__(self) -> int:
        return len(self.ids)


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a leading BOM dropped); a decoding error names its line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return text


# A NUL byte is never text: a damaged or binary file (and ast.literal_eval refuses one).
_NUL_PROBLEM = "contains a NUL byte (a damaged or binary file?)"


_INT64_MIN, _INT64_END = -(2 ** 63), 2 ** 63  # item ids become int64 tensors


def _parse_int(path: Path, line: int, name: str, raw: str) -> int:
    text = raw.strip()
    try:
        # int() accepts '1_000' and surrounding whitespace; be strict about digits.
        if not text.isascii() or not (text.isdigit() or (text[:1] in "+-" and text[1:].isdigit())):
            raise ValueError
        value = int(text)
    except ValueError:  # also int()'s limit on the number of digits
        raise DataFormatError(path, line, f"{name} is not an integer: {_short(raw)}") from None
    if not _INT64_MIN <= value < _INT64_END:
        raise DataFormatError(path, line, f"{name} does not fit a 64-bit integer: {_short(raw)}")
    return value


def read_catalogue(path: str | os.PathLike, fmt: str = "auto") -> Catalogue:
    """Read an item catalogue: one item a line, ``title<TAB>item_id`` or ``code<TAB>title<TAB>item_id``.

    ``fmt`` is ``"auto"`` (decided by the number of tab-separated fields of the first item line,
    which every other line must then have), ``"title_id"`` or ``"code_title_id"``.  Blank lines are
    skipped.  Titles may be shared by several items; ids may not.
    """
    if fmt not in CATALOGUE_FORMATS:
        raise ValueError(f"unknown catalogue format {fmt!r}; expected one of {', '.join(CATALOGUE_FORMATS)}")
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise DataFormatError(path, 1, "the catalogue file is empty")
    has_nul = "\x00" in text

    ids: list[int] = []
    titles: list[str] = []
    codes: list[str] = []
    lines: list[int] = []
    first_line_of_id: dict[int, int] = {}
    n_fields = _FIELDS_OF_FORMAT.get(fmt)
    format_line = 0  # the line that decided the format under fmt="auto"

    for line_no, raw_line in enumerate(text.split("\n"), start=1):
        raw_line = raw_line.rstrip("\r")
        if not raw_line.strip():
            continue
        if has_nul and "\x00" in raw_line:
            raise DataFormatError(path, line_no, f"the line {_NUL_PROBLEM}")
        parts = raw_line.split("\t")
        if n_fields is None:
            if len(parts) not in _FORMAT_OF_FIELDS:
                raise DataFormatError(
                    path,
                    line_no,
                    f"expected 2 tab-separated fields (title<TAB>item_id) or 3 (code<TAB>title<TAB>item_id), "
                    f"found {len(parts)}: {_short(raw_line)}",
                )
            fmt = _FORMAT_OF_FIELDS[len(parts)]
            n_fields = len(parts)
            format_line = line_no
        elif len(parts) != n_fields:
            origin = f" as on line {format_line}" if format_line else ""
            raise DataFormatError(
                path,
                line_no,
                f"expected {n_fields} tab-separated fields ({_LAYOUT_OF_FORMAT[fmt]}){origin}, "
                f"found {len(parts)}: {_short(raw_line)}",
            )
        if n_fields == 3:
            code, title, raw_id = parts
            codes.append(code)
        else:
            title, raw_id = parts
        if not title.strip():
            raise DataFormatError(path, line_no, "empty title")
        item_id = _parse_int(path, line_no, "item_id", raw_id)
        if item_id in first_line_of_id:
            raise DataFormatError(
                path, line_no, f"duplicate item_id {item_id} (first on line {first_line_of_id[item_id]})"
            )
        first_line_of_id[item_id] = line_no
        ids.append(item_id)
        titles.append(title)
        lines.append(line_no)

    return Catalogue(
        path=str(path),
        ids=ids,
        titles=titles,
        codes=codes if n_fields == 3 else None,
        lines=lines,
    )


# --------------------------------------------------------------------------------------------------
# split files


@dataclass
class Sample:
    history_titles: list[str]
    history_ids: list[int]
    target_title: str
    target_id: int
    line: int  # line number in its file (of the row's first line; header = line 1)
    extra: dict[str, str]  # every other column, raw string, by name


# Fast paths for the common, simple list literals (ast.literal_eval compiles every cell and is the
# bulk of the reading time).  They only accept literals whose value is obvious without a parser: ints
# written as plain digits, strings in '...' or "..." without backslashes or line breaks.  Anything
# else (escapes, prefixes, implicit concatenation, malformed input) goes to ast.literal_eval, which
# decides; for the literals they accept, they give exactly what ast.literal_eval gives.
_W = r"[ \t\f\r\n]*"  # whitespace Python allows inside brackets
_INT = r"[+-]?(?:0|[1-9][0-9]*)"  # no leading zeros: ast.literal_eval rejects them
_INT_LIST = re.compile(r"\[" + _W + "(?:" + _INT + _W + "(?:," + _W + _INT + _W + ")*,?" + _W + r")?\]")
_INT_TOKEN = re.compile(r"[+-]?[0-9]+")
_STR_ITEM = "(?:'[^'\\\\\r\n]*'|\"[^\"\\\\\r\n]*\")"
_STR_LIST = re.compile(r"\[" + _W + "(?:" + _STR_ITEM + _W + "(?:," + _W + _STR_ITEM + _W + ")*,?" + _W + r")?\]")
_STR_ELEMENT = re.compile("'([^'\\\\\r\n]*)'|\"([^\"\\\\\r\n]*)\"")


def _fast_list(text: str, kind: type) -> list | None:
    if kind is int:
        if _INT_LIST.fullmatch(text):
            return list(map(int, _INT_TOKEN.findall(text)))
    elif kind is str:
        if _STR_LIST.fullmatch(text):
            # one of the two groups matched; '' for the other (and both '' for an empty string)
            return [single or double for single, double in _STR_ELEMENT.findall(text)]
    return None


def _parse_list(path: Path, line: int, name: str, raw: str, kind: type) -> list:
    kind_name = kind.__name__
    text = raw.strip()
    try:
        value = _fast_list(text, kind)
    except ValueError:  # int()'s limit on digits (4300)
        raise DataFormatError(path, line, f"{name} has an id that does not fit a 64-bit integer: {_short(raw)}") from None
    if value is not None:
        if kind is int and value and not (_INT64_MIN <= min(value) and max(value) < _INT64_END):
            raise DataFormatError(path, line, f"{name} has an id that does not fit a 64-bit integer: {_short(raw)}")
        return value
    if "\x00" in text:  # ast.literal_eval refuses NUL with a message that does not say where
        raise DataFormatError(path, line, f"{name} contains a NUL byte: {_short(raw)}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DataFormatError(path, line, f"{name} is not a valid Python list literal: {_short(raw)}") from None
    if not isinstance(value, list):
        raise DataFormatError(
            path, line, f"{name} is not a valid Python list literal (got {type(value).__name__}): {_short(raw)}"
        )
    for position, element in enumerate(value):
        # bool is an int subclass, but True is not an item id.
        if not isinstance(element, kind) or isinstance(element, bool):
            raise DataFormatError(
                path,
                line,
                f"{name} must be a list of {kind_name}, but element {position} is "
                f"{type(element).__name__} {_short(_bounded_repr(element), 60)}",
            )
        if kind is int and not _INT64_MIN <= element < _INT64_END:
            raise DataFormatError(path, line, f"{name} element {position} does not fit a 64-bit integer")
    return value


def _bounded_repr(value: Any) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxstring, r.maxother = 3, 6, 80, 80
    return r.repr(value)


def read_split(path: str | os.PathLike, catalogue: Catalogue | None = None) -> list[Sample]:
    """Read a split CSV file into samples.

    With a ``catalogue``, every target and history id must be in it and every title must equal the
    catalogue's title of that id.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise DataFormatError(path, 1, "the file is empty (no header line)")

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise DataFormatError(path, 1, f"malformed CSV header: {exc}") from None
    header = [name.strip() for name in header]
    has_nul = "\x00" in text
    if "\x00" in "".join(header):
        raise DataFormatError(path, 1, f"the header {_NUL_PROBLEM}")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataFormatError(path, 1, f"duplicate column {name!r}")
        seen.add(name)
    missing = [name for name in REQUIRED_COLUMNS if name not in seen]
    if missing:
        raise DataFormatError(
            path,
            1,
            f"missing required column(s) {', '.join(missing)}; the file has columns: {', '.join(header)}",
        )
    col = {name: index for index, name in enumerate(header)}
    i_hist_titles = col["history_item_title"]
    i_title = col["item_title"]
    i_hist_ids = col["history_item_id"]
    i_id = col["item_id"]
    extra_columns = [(name, index) for name, index in col.items() if name not in REQUIRED_COLUMNS]
    n_columns = len(header)

    catalogue_title = catalogue._title_by_id.get if catalogue is not None else None
    samples: list[Sample] = []
    while True:
        line = reader.line_num + 1  # first physical line of the next record
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataFormatError(path, line, f"malformed CSV: {exc}") from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) != n_columns:
            raise DataFormatError(path, line, f"expected {n_columns} fields (as in the header), found {len(row)}")
        if has_nul:
            for name, cell in zip(header, row):
                if "\x00" in cell:
                    raise DataFormatError(path, line, f"column {name!r} {_NUL_PROBLEM}")

        history_titles = _parse_list(path, line, "history_item_title", row[i_hist_titles], str)
        history_ids = _parse_list(path, line, "history_item_id", row[i_hist_ids], int)
        target_title = row[i_title]
        target_id = _parse_int(path, line, "item_id", row[i_id])
        if len(history_titles) != len(history_ids):
            raise DataFormatError(
                path,
                line,
                f"history_item_title has {len(history_titles)} titles but history_item_id has "
                f"{len(history_ids)} ids",
            )
        # Fast check of the common case; the slow path finds and reports the first problem.
        if catalogue_title is None:  # every title non-empty
            ok = bool(target_title.strip()) and all(map(str.strip, history_titles))
        else:  # every title equals the catalogue's (which are non-empty)
            ok = catalogue_title(target_id) == target_title and all(
                map(operator.eq, map(catalogue_title, history_ids), history_titles)
            )
        if not ok:
            _diagnose_row(path, line, catalogue, target_id, target_title, history_ids, history_titles)
        samples.append(
            Sample(
                history_titles=history_titles,
                history_ids=history_ids,
                target_title=target_title,
                target_id=target_id,
                line=line,
                extra={name: row[index] for name, index in extra_columns},
            )
        )
    return samples


def _diagnose_row(
    path: Path,
    line: int,
    catalogue: Catalogue | None,
    target_id: int,
    target_title: str,
    history_ids: list[int],
    history_titles: list[str],
) -> None:
    """Raise the DataFormatError for the first problem of a row that failed the fast check."""
    if not target_title.strip():
        raise DataFormatError(path, line, "item_title is empty")
    for position, title in enumerate(history_titles):
        if not title.strip():
            raise DataFormatError(path, line, f"history_item_title element {position} is empty")
    if catalogue is None:
        return

    def where(item_id: int) -> str:
        cat_line = catalogue.line_of(item_id)
        return f"{catalogue.path} line {cat_line}" if cat_line is not None else catalogue.path

    if target_id not in catalogue:
        raise DataFormatError(path, line, f"item_id {target_id} is not in the catalogue {catalogue.path}")
    expected = catalogue.title_of(target_id)
    if expected != target_title:
        raise DataFormatError(
            path,
            line,
            f"item_title {_short(target_title)} differs from the catalogue title {_short(expected)} of "
            f"item_id {target_id} ({where(target_id)})",
        )
    for position, (item_id, title) in enumerate(zip(history_ids, history_titles)):
        if item_id not in catalogue:
            raise DataFormatError(
                path,
                line,
                f"history_item_id element {position} ({item_id}) is not in the catalogue {catalogue.path}",
            )
        expected = catalogue.title_of(item_id)
        if expected != title:
            raise DataFormatError(
                path,
                line,
                f"history_item_title element {position} {_short(title)} differs from the catalogue title "
                f"{_short(expected)} of item_id {item_id} ({where(item_id)})",
            )


# --------------------------------------------------------------------------------------------------
# writers (used by the MovieLens converter)


def _atomic_write_text(path: Path, write) -> None:
    """Write through ``write(file)`` into a temporary file next to ``path``, then rename it over."""
    from ..atomic import atomic_open

    with atomic_open(path, "w", newline="") as handle:
        write(handle)


def _cell(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, (list, tuple)):
        return repr(list(value))
    return str(value)


def write_split(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts with the same keys, in the same order) as a split CSV file.

    List (or tuple) values are written as Python list literals (``repr``), so that ``ast.literal_eval``
    reads them back; everything else with ``str``.  The file is written to a temporary name and then
    renamed, so an interrupted write leaves no half file.
    """
    rows = list(rows)
    if not rows:
        raise ValueError(f"write_split({path}): no rows to write (the header comes from the first row)")
    columns = list(rows[0].keys())
    for index, row in enumerate(rows):
        if list(row.keys()) != columns:
            raise ValueError(f"write_split({path}): row {index} has columns {list(row.keys())}, expected {columns}")

    def write(handle) -> None:
        writer = csv.writer(handle, lineterminator="\n")
        # csv.writer quotes a field with the line terminator ("\n") but not one with a bare "\r", which
        # the reader takes for a line end: rows with one are written fully quoted.
        quoted = csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if columns and columns[0].startswith("\ufeff"):
            handle.write("\ufeff")  # the reader drops one leading BOM: keep the column's own
        writer.writerow(columns)
        for row in rows:
            cells = [_cell(row[name]) for name in columns]
            if any("\x00" in c for c in cells):
                raise ValueError(f"write_split({path}): a NUL byte in a cell (the reader refuses it): {cells}")
            (quoted if any("\r" in c for c in cells) else writer).writerow(cells)

    _atomic_write_text(Path(path), write)


def write_catalogue(
    path: str | os.PathLike,
    ids: Iterable[int],
    titles: Iterable[str],
    codes: Iterable[str] | None = None,
) -> None:
    """Write a catalogue, ``title<TAB>item_id`` a line (``code<TAB>title<TAB>item_id`` with ``codes``)."""
    ids = [int(item_id) for item_id in ids]
    titles = list(titles)
    code_list = list(codes) if codes is not None else None
    if len(ids) != len(titles) or (code_list is not None and len(code_list) != len(ids)):
        raise ValueError(f"write_catalogue({path}): ids, titles (and codes) differ in length")
    if len(set(ids)) != len(ids):
        raise ValueError(f"write_catalogue({path}): duplicate item ids")
    for value in titles + (code_list or []):
        if any(ch in value for ch in "\t\r\n\x00") or not value.strip():
            raise ValueError(f"write_catalogue({path}): empty value or one with a tab/newline/NUL: {value!r}")

    def write(handle) -> None:
        first = (code_list or titles)[:1]
        if first and first[0].startswith("\ufeff"):
            handle.write("\ufeff")  # the reader drops one leading BOM: keep the item's own
        for index, (item_id, title) in enumerate(zip(ids, titles)):
            prefix = f"{code_list[index]}\t" if code_list is not None else ""
            handle.write(f"{prefix}{title}\t{item_id}\n")

    _atomic_write_text(Path(path), write)
