"""Hostile input, fuzzed (issue 13, item 4): every reader and parser, with hypothesis.

Each generated input either loads correctly (round trips of what was written, row counts checked against
what was written: nothing dropped without being counted) or raises the documented error type with a
message naming the file and the line (or the config key): DataFormatError for data files, ConfigError for
configs and overrides, CheckpointError for latentr3.json, UnknownItemError / TypeError for recommend
histories.  Never another exception and never a hang: every example runs under a SIGALRM time limit
(`LIMIT_S`), a stronger per-example deadline than hypothesis' own (which only measures after the fact).
Fixed seed: ``derandomize=True``.  The classics of the issue are explicit tests at the end.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import math
import random
import re
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentr3.config import Config, ConfigError, load_config
from latentr3.data.amazon import JsonItems, JsonLinesFile, JsonReviews
from latentr3.data.interactions import TableFile, TableItems, TableReviews
from latentr3.data.sequences import TitleRules
from latentr3.data.splits import Catalogue, DataFormatError, read_catalogue, read_split, write_catalogue, write_split
from latentr3.model.latent_lm import CONFIG_NAME, CheckpointError, read_checkpoint_meta

N = int(__import__("os").environ.get("FUZZ_N", "2000"))  # generated inputs per reader (issue 13: >= 2,000)
LIMIT_S = 10.0


class Hang(BaseException):
    """An example ran past LIMIT_S (BaseException: no reader's `except Exception` can swallow it)."""


@contextmanager
def time_limit(seconds: float = LIMIT_S):
    def alarm(signum, frame):
        raise Hang(f"ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# No st.floats anywhere: once torch (or a library compiled with -ffast-math) has set flush-to-zero in this
# process, hypothesis refuses to generate floats (FloatingPointError about subnormals).
FUZZ = settings(max_examples=N, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
# thousands of tiny files: in memory where there is a tmpfs (the disk's metadata writes cost ~3 ms each)
WORK = Path(tempfile.mkdtemp(prefix="latentr3_fuzz_", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))


@pytest.fixture(autouse=True, scope="module")
def no_fsync():
    """The writers fsync every file (atomic writes); thousands of tiny files need not reach the disk."""
    import os

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield

# --------------------------------------------------------------------------------------- strategies
# Values are drawn from fixed pools of hostile pieces (hypothesis then searches their combinations):
# st.text / st.recursive generate ~10x slower, which the time budget of the file cannot afford.
CHARS = list("abcXYZ019 .,;:'\"\\[]{}()#&*-+_=<>!|%\t\r\n\x00\x0b\x0c\x1c\x85\u2028\ufeff\xe9\u0394\U0001f600")
SPECIALS = ["", " ", "\r\n", "<span id", "&amp;", "*a", "&a ", "- ", "'" * 3, '"' * 3, "NaN", "nan", "1e999",
            "9" * 25, "True", "None", "[]", "['a']", "[1, 2]", "{}", "\\x00", "\\u2028", "x" * 3000, "a,b", 'say "hi"',
            "it's", "line\nbreak", "cr\rhere", "tab\there", "\ufeffbom", "nul\x00", " padded ", "é€😀"]


def _text_pool(seed: int = 13, n: int = 1500) -> list[str]:
    rng = __import__("random").Random(seed)
    pool = list(CHARS) + SPECIALS
    while len(pool) < n:
        pool.append("".join(rng.choice(CHARS + SPECIALS[:12]) for _ in range(rng.randint(1, 8))))
    return pool


TEXT_POOL = _text_pool()
hostile_text = st.sampled_from(TEXT_POOL)
clean_text = st.sampled_from([t.replace("\x00", "") for t in TEXT_POOL])  # a NUL is refused (see mutations)
title_text = st.sampled_from([t.replace("\x00", "") for t in TEXT_POOL if t.replace("\x00", "").strip()])
INT_POOL = [0, 1, -1, 2, 7, 42, 10 ** 4, 2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1,
            10 ** 30, -(10 ** 30), 2 ** 70, 1525000000, 1525000000000, -86400, 253402300800, -62135596801]
big_int = st.one_of(st.integers(-5, 10 ** 4), st.sampled_from(INT_POOL))
INT64 = range(-(2 ** 63), 2 ** 63)
ID_POOL = [i for i in INT_POOL if i in INT64] + list(range(-3, 40))


def pool(make, n: int = 600, seed: int = 0) -> list:
    """n values of make(rng), seeded: hypothesis draws from these pools (one draw per row or line)."""
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]


def lines_of_records(text: str) -> list[tuple[int, list[str]]]:
    """(first physical line, fields) of every CSV record, by the csv module (header = line 1)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    out = []
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return out
        out.append((line, row))


def assert_names_file_and_line(exc: DataFormatError, path: Path, max_line: int) -> None:
    assert exc.path == str(path)
    assert str(exc).startswith(f"{path} line {exc.line}: ")
    assert 1 <= exc.line <= max_line, (exc.line, max_line)


# ------------------------------------------------------------------------------------ split CSV files
CLEAN_TITLES = [t.replace("\x00", "") for t in TEXT_POOL if t.replace("\x00", "").strip()]


def _split_row(rng) -> dict:
    n = rng.randint(0, 4)
    return {"user_id": rng.choice(TEXT_POOL).replace("\x00", ""),
            "history_item_id": [rng.choice(ID_POOL) for _ in range(n)], "item_id": rng.choice(ID_POOL),
            "history_item_title": [rng.choice(CLEAN_TITLES) for _ in range(n)], "item_title": rng.choice(CLEAN_TITLES),
            "timestamp": rng.choice(INT_POOL)}


split_row = st.sampled_from(pool(_split_row, 800, 1))
CELL_MUTATIONS = st.one_of(hostile_text, st.sampled_from([
    "[", "[1,", "[True]", "[1.5]", "['a', 1]", "[[1]]", "{1: 2}", "(1, 2)", "[" * 300 + "]" * 300, "['\\x00']",
    "[1_000]", "[01]", "[0x1f]", "['a' 'b']", "[b'a']", "[f'a']", "[ ]", "[9999999999999999999999]",
    "[-9223372036854775809]", "9223372036854775808", "+5", " 7 ", "1e3", "٣", "", "[]", "['']", "[' ']"]))


@st.composite
def split_case(draw):
    rows = draw(st.lists(split_row, min_size=0, max_size=6))
    mutation = None
    if rows and draw(st.booleans()):
        k = draw(st.integers(0, len(rows) - 1))
        column = draw(st.sampled_from(["history_item_id", "item_id", "history_item_title", "item_title"]))
        mutation = (k, column, draw(CELL_MUTATIONS))
    return rows, mutation


def expected_literal(cell: str, kind: type):
    """What the documented rule accepts for a list cell: a list literal of `kind` (not bool), ids in int64."""
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, list) or any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
        return None
    if kind is int and any(v not in INT64 for v in value):
        return None
    return value


@settings(FUZZ, max_examples=N // 2)
@given(split_case())
def test_fuzz_split_round_trip_and_mutations(case):
    rows, mutation = case
    path = WORK / "split.csv"
    if not rows:
        path.write_text("user_id,history_item_id,item_id,history_item_title,item_title\n")
        assert read_split(path) == []
        return
    columns = ["user_id", "history_item_id", "item_id", "history_item_title", "item_title", "timestamp"]
    cells = [{k: (repr(r[k]) if isinstance(r[k], list) else str(r[k])) for k in columns} for r in rows]
    if mutation:  # written by csv itself: write_split refuses some mutations (a NUL) before writing
        k, column, value = mutation
        cells[k][column] = value
        with open(path, "w", encoding="utf-8", newline="") as handle:
            csv.writer(handle, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(
                [columns, *[[c[name] for name in columns] for c in cells]])
    else:
        write_split(path, cells)
    records = lines_of_records(path.read_text(encoding="utf-8"))
    with time_limit():
        try:
            samples = read_split(path)
        except DataFormatError as exc:
            assert mutation is not None, f"a good file was refused: {exc}"
            assert_names_file_and_line(exc, path, records[-1][0])
            assert exc.line == records[mutation[0] + 1][0], (exc, mutation)
            return
    assert len(samples) == len(rows)  # nothing dropped
    for i, (sample, row, cell) in enumerate(zip(samples, rows, cells)):
        assert sample.line == records[i + 1][0]
        if mutation and mutation[0] == i:  # a mutation the rules accept: its value is what was written
            assert sample.history_ids == expected_literal(cell["history_item_id"], int)
            assert sample.history_titles == expected_literal(cell["history_item_title"], str)
            assert sample.target_title == cell["item_title"] and sample.target_title.strip()
            assert str(sample.target_id) == cell["item_id"].strip().lstrip("+") or int(cell["item_id"]) == sample.target_id
            continue
        assert sample.history_ids == row["history_item_id"] and sample.history_titles == row["history_item_title"]
        assert sample.target_id == row["item_id"] and sample.target_title == row["item_title"]
        assert sample.extra == {"user_id": cell["user_id"], "timestamp": cell["timestamp"]}


RAW_EDITS = st.lists(st.tuples(st.integers(0, 1000).map(lambda k: k / 1000),  # no st.floats (see FUZZ)
                                st.sampled_from(SPECIALS + ["", "\n\n", ",,,", '"\n"', "\xff",
                                                                            "item_id,", "\ufeff"])), max_size=4)
GOOD_TEXT = ("history_item_title,item_title,history_item_id,item_id,user_id\n"
             "\"['A', \"\"B, c\"\"]\",Gamma,\"[1, 2]\",3,u1\r\n"
             "[],\"He said \"\"hi\"\"\nthere\",[],4,u2\n"
             "['x'],y,[5],6,u3\n")


@settings(FUZZ, max_examples=N // 2)
@given(RAW_EDITS, st.booleans())
def test_fuzz_split_raw_bytes(edits, as_bytes):
    """Byte-level damage to a good file: insertions at random places, invalid UTF-8, a BOM, NULs."""
    text = GOOD_TEXT
    for where, chunk in edits:
        at = int(where * len(text))
        text = text[:at] + chunk + text[at:]
    path = WORK / "raw.csv"
    data = text.encode("utf-8", "surrogatepass")
    if as_bytes:
        data = data.replace("\xff".encode(), b"\xff")  # a raw invalid byte
    path.write_bytes(data)
    with time_limit():
        try:
            samples = read_split(path)
        except DataFormatError as exc:
            assert_names_file_and_line(exc, path, text.count("\n") + text.count("\r") + 2)
            return
    decoded = data.decode("utf-8-sig")
    records = [r for _, r in lines_of_records(decoded)][1:]
    data_records = [r for r in records if r and not (len(r) == 1 and not r[0].strip())]
    assert len(samples) == len(data_records)  # every non-blank record is a sample
    for s in samples:
        assert s.target_id in INT64 and s.target_title.strip() and all(h in INT64 for h in s.history_ids)
        assert len(s.history_ids) == len(s.history_titles)


# --------------------------------------------------------------------------------------- catalogues
CAT_TITLES = [t for t in TEXT_POOL if t.strip() and not any(c in t for c in "\t\r\n\x00")]


CAT_ENTRIES = pool(lambda rng: (rng.choice(ID_POOL), rng.choice(CAT_TITLES), rng.choice(CAT_TITLES)), 800, 2)
CAT_EDITS = pool(lambda rng: rng.choice(TEXT_POOL + ["a\t1\t2\t3", "\t5", "a\t", "a\tb", "x\t9" * 3,
                                                     "a\t99999999999999999999", "a\t-9223372036854775809", "a\t1 ",
                                                     " \t2", "\ufeffa\t1", "a\t" + rng.choice(TEXT_POOL)]), 400, 3)


@st.composite
def catalogue_case(draw):
    drawn = draw(st.lists(st.sampled_from(CAT_ENTRIES), min_size=1, max_size=6))
    entries = list({e[0]: e for e in reversed(drawn)}.values())[::-1]  # ids unique (unique_by is slow here)
    ids, titles, codes = [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]
    if draw(st.booleans()):
        codes = None
    line_edit = None
    if draw(st.booleans()):
        line_edit = (draw(st.integers(0, len(ids) - 1)), draw(st.sampled_from(["replace", "insert"])),
                     draw(st.sampled_from(CAT_EDITS)))
    return ids, titles, codes, line_edit, draw(st.booleans())


@FUZZ
@given(catalogue_case())
def test_fuzz_catalogue(case):
    ids, titles, codes, line_edit, crlf = case
    path = WORK / "info.txt"
    # the layout write_catalogue writes (its own round trip: test_found_* below and tests/test_data.py)
    lines = [f"{codes[i]}\t{t}\t{ids[i]}" if codes else f"{t}\t{ids[i]}" for i, t in enumerate(titles)]
    if line_edit:
        k, how, text = line_edit
        if how == "replace":
            lines[k] = text
        else:
            lines.insert(k, text)
    # always with a BOM (the reader drops one), so that a first title starting with U+FEFF keeps it
    path.write_bytes(("\ufeff" + ("\r\n" if crlf else "\n").join(lines) + "\n").encode("utf-8"))
    with time_limit():
        try:
            cat = read_catalogue(path)
        except DataFormatError as exc:
            assert line_edit is not None, f"a good catalogue was refused: {exc}"
            assert_names_file_and_line(exc, path, len(lines) + 1)
            return
    assert isinstance(cat, Catalogue)
    if line_edit is None:
        assert cat.ids == ids and cat.titles == titles and cat.codes == codes
    # nothing dropped: every line that is not blank is an item
    assert len(cat) == sum(1 for line in lines if line.strip())
    assert all(i in INT64 for i in cat.ids) and all(t.strip() for t in cat.titles)


# ------------------------------------------------------------------------------ amazon2018 / amazon2023
JSON_POOL = [None, True, False, *INT_POOL, 1.5, 5.0, -0.0, 1e308, math.nan, math.inf, -math.inf, "", " ", "5.0",
             "1525000000", "-1", "nan", "1e999", " 3 ", "a", "\x00", "\ufeff", "x" * 3000, [], [1], ["a", None], {},
             {"a": 1}, {"title": ["x"]}, [[[[]]]], {"": {"": {}}}, "<span id=x>", "Greatest Hits"]


def json_value():
    return st.one_of(st.sampled_from(JSON_POOL), hostile_text)


RAW_LINES = ["", "   ", "[1, 2]", "nul\x00l", "{", "{'a': 1}", '{"a": NaN}', "[" * 5000 + "]" * 5000,
             '{"a": ' + "[" * 3000 + "]" * 3000 + "}", "\ufeff{}", '{"a": 1}\r']


def review_lines(keys, literal: bool, seed: int) -> list[str]:
    """JSON lines of reviews: good ones, ones with hostile fields, Python literals (2018), raw junk."""
    user, item, rating, time = keys

    def make(rng):
        record = {}
        if rng.random() < 0.7:
            record = {user: rng.choice(["A1", "u", "A2XYZ", "0"]), item: rng.choice(["B0001", "B0002", "x"]),
                      rating: rng.choice([1.0, 2.5, 5.0]), time: rng.randint(0, 2 ** 40)}
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            record[rng.choice([user, item, rating, time, "other"])] = rng.choice(JSON_POOL + TEXT_POOL[:300])
        kind = rng.random()
        if kind < 0.1:
            return rng.choice(RAW_LINES + TEXT_POOL[:200])
        if literal and kind < 0.3:
            return repr(record)
        return json.dumps(record, allow_nan=True)

    return pool(make, 800, seed)


FLAVOURS = {
    "amazon2018": (("reviewerID", "asin", "overall", "unixReviewTime"), 1, True, ("asin", "title", "brand")),
    "amazon2023": (("user_id", "parent_asin", "rating", "timestamp"), 1000, False, ("parent_asin", "title", "store")),
}


def check_reviews(flavour, lines, bom, crlf):
    keys, scale, literal, _ = FLAVOURS[flavour]
    path = WORK / f"{flavour}.jsonl"
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    n_lines = text.count("\n")  # a generated line may hold a line break of its own
    file = JsonLinesFile(path, max_bad_lines=1000, literal_fallback=literal)
    source = JsonReviews(file, *keys, time_scale=scale)
    out = []
    with time_limit():
        try:
            out = list(source.reviews(False))
        except DataFormatError as exc:
            assert_names_file_and_line(exc, path, n_lines)
            return
    # every line is accounted for: a review, a blank line or a counted malformed line
    assert len(out) + file.blank_lines + len(file.bad_lines) == n_lines == file.lines
    for line, u, i, t, r in out:
        assert isinstance(u, str) and u and isinstance(i, str) and i
        assert math.isfinite(t) and float(t).is_integer() and -62135596800 * scale <= t <= 253402300799 * scale
        assert isinstance(r, float) and math.isfinite(r)


@settings(FUZZ, max_examples=3 * N // 4)
@given(st.lists(st.sampled_from(review_lines(FLAVOURS["amazon2018"][0], True, 4)), min_size=1, max_size=6),
       st.booleans(), st.booleans())
def test_fuzz_amazon2018_reviews(lines, bom, crlf):
    check_reviews("amazon2018", lines, bom, crlf)


@settings(FUZZ, max_examples=3 * N // 4)
@given(st.lists(st.sampled_from(review_lines(FLAVOURS["amazon2023"][0], False, 5)), min_size=1, max_size=6),
       st.booleans(), st.booleans())
def test_fuzz_amazon2023_reviews(lines, bom, crlf):
    check_reviews("amazon2023", lines, bom, crlf)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@settings(FUZZ, max_examples=N // 4)
@given(st.lists(st.sampled_from(pool(lambda rng: json.dumps(
    {k: rng.choice(JSON_POOL + TEXT_POOL[:300] + ["B01", "7", "B0001"]) for k in
     rng.sample(["asin", "parent_asin", "title", "brand", "store"], rng.randint(0, 5))}, allow_nan=True), 800, 6)),
    min_size=1, max_size=6))
def test_fuzz_amazon_items(flavour, lines):
    """Item metadata (N // 4 per flavour; with the reviews N per flavour): keys checked, any title cleaned."""
    _, _, literal, (key, title, brand) = FLAVOURS[flavour]
    path = WORK / f"meta_{flavour}.jsonl"
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    n_lines = text.count("\n")
    file = JsonLinesFile(path, max_bad_lines=1000, literal_fallback=literal)
    rules = TitleRules()
    with time_limit():
        try:
            items = list(JsonItems(file, key, title, brand).items(False))
        except DataFormatError as exc:
            assert_names_file_and_line(exc, path, n_lines)
            return
        for _, k, raw_title, raw_brand in items:
            assert isinstance(k, str) and k
            cleaned, reason = rules.clean(raw_title)
            assert (cleaned is None) == bool(reason)
    assert len(items) + file.blank_lines + len(file.bad_lines) == n_lines


# ------------------------------------------------------------------------------------ interactions
CELL_POOL = TEXT_POOL[:400] + [str(i) for i in INT_POOL] + [
    "2018-01-02T03:04:05", "2018-01-02T03:04:05Z", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
    "nan", "inf", "-1e30", "1e400", "1525000000", "1525000000000", "4.5", "", " "] * 3
ROW_POOL = pool(lambda rng: [rng.choice(CELL_POOL) for _ in range(rng.randint(2, 7))], 800, 7)
HEADER_POOL = pool(lambda rng: rng.sample(h := ["user", "item", "time", "rating"] + rng.sample(
    ["user", "time", "x", ""], rng.randint(0, 2)), len(h)), 60, 8)


@st.composite
def interactions_case(draw):
    return (draw(st.sampled_from(HEADER_POOL)), draw(st.lists(st.sampled_from(ROW_POOL), max_size=6)),
            draw(st.sampled_from(["s", "ms"])), draw(st.booleans()))


@settings(FUZZ, max_examples=3 * N // 4)
@given(interactions_case())
def test_fuzz_interactions(case):
    header, rows, unit, crlf = case
    path = WORK / "log.csv"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n" if crlf else "\n").writerows([header, *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")
    table = TableFile(path, ["user", "item", "time", "rating"], max_bad_lines=1000)
    reviews = TableReviews(table, rating=True, time_scale=1000 if unit == "ms" else 1)
    out = []
    with time_limit():
        try:
            out = list(reviews.reviews(False))
        except DataFormatError as exc:
            text = buf.getvalue()
            assert_names_file_and_line(exc, path, text.count("\n") + text.count("\r") + 1)
            return
    records = lines_of_records(buf.getvalue())[1:]
    blank = sum(1 for _, r in records if not r or (len(r) == 1 and not r[0].strip()))
    assert len(out) + len(table.bad_lines) + blank == len(records)  # every row accounted for
    scale = 1000 if unit == "ms" else 1
    for line, u, i, t, r in out:
        assert u.strip() and i.strip() and math.isfinite(t) and math.isfinite(r)
        assert -62135596800 * scale <= t <= 253402300799 * scale  # a time datetime can represent


@settings(FUZZ, max_examples=N // 4)
@given(st.lists(st.sampled_from(ROW_POOL), max_size=6))
def test_fuzz_interaction_items(rows):
    path = WORK / "items.csv"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["id", "title", "brand"], *rows])
    path.write_text(buf.getvalue(), encoding="utf-8")
    table = TableFile(path, ["id", "title", "brand"], max_bad_lines=1000)
    with time_limit():
        try:
            items = list(TableItems(table, brand=True).items(False))
        except DataFormatError as exc:
            text = buf.getvalue()
            assert_names_file_and_line(exc, path, text.count("\n") + text.count("\r") + 1)
            return
    records = lines_of_records(buf.getvalue())[1:]
    blank = sum(1 for _, r in records if not r or (len(r) == 1 and not r[0].strip()))
    assert len(items) + len(table.bad_lines) + blank == len(records)
    for _, key, title, _ in items:
        assert key.strip() and (title is None or isinstance(title, str))


# ---------------------------------------------------------------------------- YAML configs, overrides
SECTIONS = {f.name: [g.name for g in __import__("dataclasses").fields(getattr(Config(), f.name))]
            for f in __import__("dataclasses").fields(Config)}
yaml_scalar = st.one_of(st.sampled_from(JSON_POOL), hostile_text,
                        st.sampled_from(["1e-4", "auto", "cosine", "d3", "valid", "0.5", "-1", ".nan"]))
yaml_value = st.one_of(yaml_scalar, st.lists(yaml_scalar, max_size=3))


def _snippet(rng) -> tuple[str, list[str]]:
    """One section of a config file as YAML text (block or flow style), with the keys it names."""
    section = rng.choice(sorted(SECTIONS) + ["modle"])
    scalars = JSON_POOL + TEXT_POOL[:300] + ["1e-4", "auto", "cosine", "d3", "valid", "0.5", "-1", ".nan"]
    if rng.random() < 0.1:
        body, keys = rng.choice(scalars), []
    else:
        names = SECTIONS.get(section, ["x"]) + ["typo_key"]
        keys = rng.sample(names, rng.randint(0, min(3, len(names))))
        body = {k: (rng.choice(scalars) if rng.random() < 0.8 else [rng.choice(scalars) for _ in range(2)])
                for k in keys}
    text = (yaml.safe_dump({section: body}, allow_unicode=True) if rng.random() < 0.5
            else json.dumps({section: body}, allow_nan=True) + "\n")
    return text, [section, *keys]


SNIPPETS = pool(_snippet, 600, 9)


def assert_config_error_names(exc: ConfigError, source: str, keys: list[str]) -> None:
    text = str(exc)
    assert text.startswith(f"{source}: "), text
    assert any(k in text for k in keys) or "YAML" in text or "mapping" in text, text


@settings(FUZZ, max_examples=N // 2)
@given(st.lists(st.sampled_from(SNIPPETS), max_size=3), st.booleans())
def test_fuzz_yaml_config_files(snippets, raw_damage):
    """Config files (N // 2; the overrides below N // 2: N inputs for load_config in all)."""
    path = WORK / "config.yaml"
    text = "".join(t for t, _ in snippets)
    if raw_damage:
        text = text[: len(text) // 2] + "\n  : [&x *x\n"
    path.write_text(text, encoding="utf-8")
    keys = [k for _, ks in snippets for k in ks]
    with time_limit():
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            assert_config_error_names(exc, str(path), keys)
            return
    assert isinstance(cfg, Config)


override_key = st.one_of(
    st.sampled_from(sorted(f"{s}.{f}" for s, fs in SECTIONS.items() for f in fs)),
    st.sampled_from(["sft", "sft.", ".lr", "sft..lr", "sft.lr.x", "modle.num_latent", "", "a.b.c.d"]),
)
override_value = st.one_of(hostile_text, st.sampled_from(
    ["[", "{a: 1", "*a", "&a [*a]", "!!python/object:os.system ls", "!!binary aGk=", "1e999", "-1", "0", ".nan",
     "[1, 2]", "{}", "null", "~", "2020-01-01", "0x10", "0o7", "1_000", "yes", "'1'", "\"\\x00\""]))


@settings(FUZZ, max_examples=N // 2)
@given(st.lists(st.tuples(override_key, override_value), min_size=1, max_size=3), st.booleans())
def test_fuzz_dotted_overrides(pairs, no_equals):
    overrides = [f"{k}{'' if no_equals and i == 0 else '='}{v}" for i, (k, v) in enumerate(pairs)]
    with time_limit():
        try:
            cfg = load_config(None, overrides)
        except ConfigError as exc:
            text = str(exc)
            assert text.startswith("config: ") or text.startswith("override "), text
            # the key is what precedes the first "=" of each override as given
            parts = [p for o in overrides for p in o.split("=", 1)[0].strip().split(".") if p]
            parts += ["key=value", "section", "YAML"]
            assert any(p in text for p in parts) or "unknown key(s) ['']" in text, text
            return
    assert isinstance(cfg, Config)


# ------------------------------------------------------------------------ checkpoint metadata (latentr3.json)
GOOD_META = {"num_latent": 1, "latent_token_id": 400, "latent_rope_base": 1000.0, "hidden_size": 32,
             "lora": False, "backbone": "tiny", "item_noun": "movies", "template": "short", "cutoff_len": 128}


def _meta_case(rng):
    meta = dict(GOOD_META)
    for key in rng.sample(sorted(GOOD_META) + ["base_model", "extra"], rng.choice([0, 1, 1, 2, 3])):
        if rng.random() < 0.4:
            meta.pop(key, None)
        else:
            meta[key] = rng.choice(JSON_POOL + TEXT_POOL[:100])
    text = json.dumps(meta, allow_nan=True)
    how = rng.choice(["keep", "keep", "truncate", "junk", "bytes", "list", "deep"])
    if how == "truncate":
        text = text[: rng.randint(0, len(text))]
    elif how == "junk":
        at = rng.randint(0, len(text))
        text = text[:at] + rng.choice(TEXT_POOL) + text[at:]
    elif how == "list":
        text = json.dumps([meta])
    elif how == "deep":
        text = DEEP_JSON
    data = text.encode("utf-8")
    if how == "bytes":
        data = data[:5] + b"\xff\xfe" + data[5:]
    return meta, how, data


DEEP_JSON = "[" * 20000 + "]" * 20000
META_CASES = pool(_meta_case, 3 * N, 10)  # more than N: sampled_from of fewer values would run out of inputs


@FUZZ
@given(st.sampled_from(META_CASES))
def test_fuzz_checkpoint_meta(case):
    meta, how, data = case
    ckpt = WORK / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / CONFIG_NAME).write_bytes(data)
    with time_limit():
        try:
            loaded = read_checkpoint_meta(ckpt)
        except CheckpointError as exc:
            assert str(exc).startswith(f"{ckpt / CONFIG_NAME}: ") and exc.path == str(ckpt / CONFIG_NAME)
            return
    assert how in ("keep", "junk", "truncate")  # a cut at the very end (or inside trailing junk) loses nothing
    for key in ("num_latent", "latent_token_id"):
        if key == "latent_token_id" and loaded[key] is None:  # a checkpoint without latent tokens
            assert loaded["num_latent"] == 0
            continue
        assert isinstance(loaded[key], int) and not isinstance(loaded[key], bool) and loaded[key] >= 0
    assert 0 < loaded["latent_rope_base"] < math.inf
    if how == "keep":
        assert loaded == json.loads(data)


# ------------------------------------------------------------------------------- recommend histories
REC_TITLES = ["Alpha", "Beta", "Greatest Hits", "Greatest Hits", "Gamma \"Live\", 1999", "Δelta"]


@pytest.fixture(scope="module")
def recommender():
    from latentr3.recommend import Recommender

    rec = Recommender.__new__(Recommender)  # the history checks need only the catalogue
    rec.catalogue = Catalogue("catalogue.txt", [0, 1, 2, 3, 4, 5], REC_TITLES)
    rec._titles = set(REC_TITLES)
    return rec


history_entry = st.one_of(st.sampled_from(REC_TITLES), st.integers(-3, 8), big_int, hostile_text, st.none(),
                          st.booleans(), st.sampled_from([1.0, math.nan, -0.0, math.inf]), st.lists(st.integers(0, 5), max_size=2),
                          st.binary(max_size=4), st.sampled_from(["alpha", "Alpha ", "Greatest Hit", "\x00Alpha"]))


@FUZZ
@given(st.lists(history_entry, max_size=6), st.booleans())
def test_fuzz_recommend_histories(recommender, history, free_text):
    from latentr3.recommend import UnknownItemError

    check = getattr(recommender, "history_titles", None) or recommender._history_titles
    with time_limit():
        try:
            titles = check(history, free_text)
        except UnknownItemError as exc:
            bad = [h for h in history if not (isinstance(h, int) and not isinstance(h, bool) and h in range(6))
                   and not (isinstance(h, str) and (free_text or h in REC_TITLES))]
            assert bad and (repr(bad[0]) in str(exc) or str(bad[0]) in str(exc)), (exc, history)
            return
        except TypeError as exc:  # documented: an entry that is neither a title (str) nor an item id (int)
            assert "a history entry must be a title (str) or an item id (int)" in str(exc)
            assert any(not isinstance(h, (str, int)) or isinstance(h, bool) for h in history)
            return
    assert len(titles) == len(history)
    for entry, title in zip(history, titles):
        assert title == (REC_TITLES[entry] if isinstance(entry, int) else entry)


# ---------------------------------------------------------------------------------- the classics
HEAD = "history_item_title,item_title,history_item_id,item_id\n"


def write(name: str, data: bytes | str) -> Path:
    path = WORK / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def refused(path, reader=read_split, line=None, match=""):
    with time_limit():
        with pytest.raises(DataFormatError) as e:
            reader(path)
    assert str(e.value).startswith(f"{path} line "), str(e.value)
    if line is not None:
        assert e.value.line == line, str(e.value)
    assert re.search(match, str(e.value)), str(e.value)
    return e.value


def test_classic_nul_bytes():
    # found by the fuzzer: the fast list parser took a NUL that ast.literal_eval refuses
    refused(write("nul1.csv", HEAD + "\"['a\x00b']\",t,[1],2\n"), line=2,
            match="column 'history_item_title' contains a NUL byte")
    refused(write("nul2.csv", HEAD + "['a'],t,[1],2\n['a'],t\x00x,[1],2\n"), line=3, match="'item_title' contains a NUL")
    refused(write("nul3.csv", HEAD.replace(",item_id", ",item\x00_id")), line=1, match="header contains a NUL")
    refused(write("nul.txt", "a\t1\nb\x00\t2\n"), reader=read_catalogue, line=2, match="NUL")
    lines = JsonLinesFile(write("nul.jsonl", '{"a": 1}\n{"a"\x00: 2}\n'))
    assert [r for _, r in lines.records()] == [{"a": 1}] and lines.bad_lines == [2]


def test_classic_bom_and_crlf():
    text = HEAD.replace("\n", "\r\n") + "\"['a, b']\",\"t\r\nu\",[1],2\r\n['c'],d,[3],4\r\n"
    samples = read_split(write("bom.csv", b"\xef\xbb\xbf" + text.encode()))
    assert [s.target_title for s in samples] == ["t\r\nu", "d"] and [s.line for s in samples] == [2, 4]
    cat = read_catalogue(write("bom.txt", b"\xef\xbb\xbfA\t1\r\nB\t2\r\n"))
    assert cat.titles == ["A", "B"] and cat.ids == [1, 2]
    lines = JsonLinesFile(write("bom.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n'))
    assert [r for _, r in lines.records()] == [{"a": 1}, {"a": 2}] and not lines.bad_lines


def test_classic_quotes_commas_newlines_in_titles():
    titles = ['He said "hi", then left', "line\nbreak", "it's", 'both \' and "', "comma, comma", "tab\tin"]
    path = WORK / "quotes.csv"
    write_split(path, [{"history_item_title": titles, "item_title": t, "history_item_id": list(range(6)),
                        "item_id": 9} for t in titles])
    samples = read_split(path)
    assert [s.target_title for s in samples] == titles and all(s.history_titles == titles for s in samples)


def test_classic_10_mb_single_line():
    huge = "x" * (10 * 1024 * 1024)
    refused(write("huge.csv", HEAD + f"\"['{huge}']\",t,[1],2\n"), line=2, match="field larger than field limit")
    refused(write("huge.txt", f"{huge}\t1\n{huge}\n"), reader=read_catalogue, line=2)
    lines = JsonLinesFile(write("huge.jsonl", json.dumps({"a": huge}) + "\n" + huge + "\n"))
    with time_limit():
        assert len(list(lines.records())) == 1 and lines.bad_lines == [2]


def test_classic_int64_overflow():
    refused(write("big1.csv", HEAD + "['a'],t,[1],9223372036854775808\n"), line=2, match="64-bit")
    refused(write("big2.csv", HEAD + "['a'],t,[-9223372036854775809],1\n"), line=2, match="64-bit")
    refused(write("big3.csv", HEAD + "['a'],t,\"[ 99999999999999999999, 1 ]\",1\n"), line=2, match="64-bit")
    refused(write("big4.csv", HEAD + "['a'],t,[" + "9" * 5000 + "],1\n"), line=2)
    assert read_split(write("big5.csv", HEAD + "['a'],t,[9223372036854775807],-9223372036854775808\n"))[0].target_id \
        == -(2 ** 63)
    refused(write("big.txt", "a\t18446744073709551616\n"), reader=read_catalogue, line=1, match="64-bit")


def test_classic_nan_ratings_and_bad_timestamps():
    def reviews(name, records, scale=1, keys=("reviewerID", "asin", "overall", "unixReviewTime")):
        path = write(name, "\n".join(records) + "\n")
        return path, JsonReviews(JsonLinesFile(path, literal_fallback=scale == 1), *keys, time_scale=scale)

    for rating in ("NaN", "Infinity", "-Infinity", '"nan"', "1e999"):
        path, src = reviews("nan.json", ['{"reviewerID": "u", "asin": "i", "overall": 5.0, "unixReviewTime": 1}',
                                         f'{{"reviewerID": "u", "asin": "i", "overall": {rating}, "unixReviewTime": 2}}'])
        with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))} line 2: field 'overall' is not a number"):
            list(src.reviews(False))
    for time in ("-99999999999999", "99999999999999999999", "1e300", "-1e300"):
        path, src = reviews("time.json", [f'{{"reviewerID": "u", "asin": "i", "overall": 5.0, "unixReviewTime": {time}}}'])
        with pytest.raises(DataFormatError, match=r"line 1: field 'unixReviewTime' is (out of range|not an integer)"):
            list(src.reviews(False))
    # a negative time inside the datetime range (1969) is a time
    path, src = reviews("neg.json", ['{"reviewerID": "u", "asin": "i", "overall": 5.0, "unixReviewTime": -86400}'])
    assert [r[3] for r in src.reviews(False)] == [-86400]
    log = write("log.csv", "user,item,time,rating\nu,i,nan,5\n")
    with pytest.raises(DataFormatError, match="line 2: column 'time' is not a finite number"):
        list(TableReviews(TableFile(log, ["user", "item", "time", "rating"]), True, 1).reviews(False))
    log = write("log2.csv", "user,item,time,rating\nu,i,1,nan\n")
    with pytest.raises(DataFormatError, match="line 2: field 'rating' is not a number"):
        list(TableReviews(TableFile(log, ["user", "item", "time", "rating"]), True, 1).reviews(False))
    log = write("log3.csv", "user,item,time,rating\nu,i,1e20,5\n")
    with pytest.raises(DataFormatError, match="line 2: field 'time' is out of range"):
        list(TableReviews(TableFile(log, ["user", "item", "time", "rating"]), True, 1).reviews(False))


def test_classic_duplicated_header_columns():
    refused(write("dup.csv", "item_id,history_item_title,item_title,history_item_id,item_id\n"), line=1,
            match="duplicate column 'item_id'")
    log = write("dup_log.csv", "user,item,time,item\nu,a,1,b\n")
    with pytest.raises(DataFormatError, match=r"line 1: column\(s\) item appear more than once"):
        list(TableFile(log, ["user", "item", "time"]).rows())


def test_classic_list_nested_10000_deep():
    deep = "[" * 10000 + "]" * 10000
    refused(write("deep.csv", HEAD + f"['a'],t,\"{deep}\",1\n"), line=2, match="history_item_id")
    refused(write("deep2.csv", HEAD + f"\"{deep}\",t,[1],1\n"), line=2, match="history_item_title")
    lines = JsonLinesFile(write("deep.jsonl", deep + "\n{\"a\": " + deep + "}\n"), literal_fallback=True)
    with time_limit():
        assert list(lines.records()) == [] and lines.bad_lines == [1, 2]
    with pytest.raises(ConfigError, match="YAML"):
        load_config(None, ["eval.ks=" + deep])
    ckpt = WORK / "deep_ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / CONFIG_NAME).write_text(deep)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint_meta(ckpt)


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("where", ["top", "section", "list_field", "str_field"])
def test_classic_yaml_anchor_bomb(tmp_path, where):
    text = {"top": BILLION_LAUGHS,
            "section": BILLION_LAUGHS.replace("i: &i", "sft: &i"),
            "list_field": BILLION_LAUGHS.replace("\ni: &i", "\nmodel:\n  lora_target_modules: &i"),
            "str_field": BILLION_LAUGHS.replace("\ni: &i", "\ndata:\n  dir: &i")}[where]
    if where != "top":  # only the bomb's own section may be at the top level: drop a..h there
        text = "\n".join(("_" + line if line[:2] in {f"{c}:" for c in "abcdefgh"} else line)
                         for line in text.splitlines())
        text = "x: &x 1\n" + text
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with time_limit(5.0):
        with pytest.raises(ConfigError) as e:
            load_config(path)
    assert str(e.value).startswith(f"{path}: ") and len(str(e.value)) < 2000


# ------------------------------------------------------------- regressions: what the fuzzer found
def test_found_write_split_quotes_a_bare_carriage_return():
    """csv.writer quotes "\\n" but not a bare "\\r", which the reader takes for a line end: the file written
    was unreadable (or, with a "\\r" first in a cell, read a blank row and shifted the rest)."""
    path = WORK / "cr.csv"
    rows = [{"user_id": "u\r1", "history_item_title": ["a"], "item_title": "t\rx", "history_item_id": [1],
             "item_id": 2}, {"user_id": "\r", "history_item_title": [], "item_title": "y", "history_item_id": [],
                             "item_id": 3}]
    write_split(path, rows)
    samples = read_split(path)
    assert [(s.extra["user_id"], s.target_title) for s in samples] == [("u\r1", "t\rx"), ("\r", "y")]


def test_found_a_leading_u_feff_survives_the_round_trip():
    write_catalogue(WORK / "feff.txt", [1, 2], ["\ufeffA", "B"])
    assert read_catalogue(WORK / "feff.txt").titles == ["\ufeffA", "B"]
    write_split(WORK / "feff.csv", [{"\ufeffuser": "u", "history_item_title": [], "item_title": "t",
                                     "history_item_id": [], "item_id": 1}])
    assert list(read_split(WORK / "feff.csv")[0].extra) == ["\ufeffuser"]


def test_found_writers_refuse_what_the_readers_refuse():
    with pytest.raises(ValueError, match="NUL"):
        write_catalogue(WORK / "n.txt", [1], ["a\x00b"])
    with pytest.raises(ValueError, match="NUL"):
        write_split(WORK / "n.csv", [{"history_item_title": [], "item_title": "a\x00", "history_item_id": [],
                                      "item_id": 1}])


def test_found_iso_times_outside_the_datetime_range():
    log = write("iso.csv", "user,item,time\nu,i,0001-01-01T00:00:00+01:00\n")
    # 0001-01-01 at +01:00 is 31 Dec of year 0 in UTC: fromtimestamp() failed deep inside prepare
    with pytest.raises(DataFormatError, match="line 2: field 'time' is out of range"):
        list(TableReviews(TableFile(log, ["user", "item", "time"]), False, 1).reviews(False))


def test_found_yaml_keys_that_are_not_strings():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \[1, None\]"):
        load_config(write("keys.yaml", "1: a\nnull: b\n"))
    with pytest.raises(ConfigError, match="too large for a float"):
        load_config(None, ["sft.lr=" + "9" * 400])
