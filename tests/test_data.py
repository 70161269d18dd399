"""Tests of latentr3.data.splits (split files, catalogue) and latentr3.data.movielens."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from latentr3.data import movielens
from latentr3.data.splits import (
    Catalogue,
    DataFormatError,
    Sample,
    read_catalogue,
    read_split,
    write_catalogue,
    write_split,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CDS_DIR = REPO_ROOT.parent / "shared/data/cds_and_vinyl"
HAVE_RECBOLE = importlib.util.find_spec("recbole") is not None

HEADER = ["user_id", "history_item_id", "item_id", "history_item_title", "item_title"]


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    return path


def _catalogue_file(tmp_path: Path) -> Path:
    path = tmp_path / "info.txt"
    path.write_text("Alpha\t0\nBeta, \"the\" one\t1\nGreatest Hits\t2\nGreatest Hits\t3\n", encoding="utf-8")
    return path


def _good_rows() -> list[list[str]]:
    return [
        HEADER,
        ["u1", "[0]", "1", "['Alpha']", 'Beta, "the" one'],
        ["u1", "[0, 1]", "2", "['Alpha', 'Beta, \"the\" one']", "Greatest Hits"],
        ["u2", "[]", "3", "[]", "Greatest Hits"],
    ]


# ------------------------------------------------------------------------------------------------
# split files: good input


def test_read_split_good(tmp_path):
    catalogue = read_catalogue(_catalogue_file(tmp_path))
    samples = read_split(_write_csv(tmp_path / "valid.csv", _good_rows()), catalogue)
    assert [s.line for s in samples] == [2, 3, 4]
    assert samples[1] == Sample(
        history_titles=["Alpha", 'Beta, "the" one'],
        history_ids=[0, 1],
        target_title="Greatest Hits",
        target_id=2,
        line=3,
        extra={"user_id": "u1"},
    )
    assert samples[2].history_ids == [] and samples[2].history_titles == []


def test_columns_found_by_name_and_extras_kept(tmp_path):
    rows = [["rating", "item_title", "item_id", "foo", "history_item_id", "history_item_title", "user_id"]]
    rows.append(["5.0", "Alpha", "0", "x,y", "[1, 2]", "['Beta, \"the\" one', 'Greatest Hits']", "u9"])
    catalogue = read_catalogue(_catalogue_file(tmp_path))
    (sample,) = read_split(_write_csv(tmp_path / "shuffled.csv", rows), catalogue)
    assert sample.target_id == 0 and sample.target_title == "Alpha"
    assert sample.history_ids == [1, 2]
    assert sample.history_titles == ['Beta, "the" one', "Greatest Hits"]
    assert sample.extra == {"rating": "5.0", "foo": "x,y", "user_id": "u9"}


def test_multiline_record_line_numbers(tmp_path):
    rows = [HEADER, ["u1", "[0]", "1", "['Alpha']", "Beta"], ["u2", "[0]", "1", "['Alpha']", "Be\nta"]]
    rows.append(["u3", "[0]", "1", "['Alpha']", "Beta"])
    samples = read_split(_write_csv(tmp_path / "m.csv", rows))
    assert [s.line for s in samples] == [2, 3, 5]
    assert samples[1].target_title == "Be\nta"


@pytest.mark.parametrize(
    "raw, kind",
    [
        ("[1, 2,3 ,]", int),
        ("[-1, +2]", int),
        ("[]", int),
        ("['a', \"Don't\", '', 'x,]y']", str),
        ("['a' 'b']", str),  # implicit concatenation: not the fast path
        ("['a\\\\b', 'caf\\xe9']", str),  # escapes: not the fast path
        ("[u'a']", str),
    ],
)
def test_list_parsing_matches_literal_eval(tmp_path, raw, kind):
    if kind is int:
        row = ["u", raw, "1", repr(["t"] * len(ast.literal_eval(raw))), "T"]
    else:
        row = ["u", repr(list(range(len(ast.literal_eval(raw))))), "1", raw, "T"]
    rows = [HEADER, row]
    if kind is str and "''" in raw:
        with pytest.raises(DataFormatError, match="element 2 is empty"):
            read_split(_write_csv(tmp_path / "l.csv", rows))
        return
    (sample,) = read_split(_write_csv(tmp_path / "l.csv", rows))
    got = sample.history_ids if kind is int else sample.history_titles
    assert got == ast.literal_eval(raw)


def test_header_only_file_is_empty_split(tmp_path):
    assert read_split(_write_csv(tmp_path / "h.csv", [HEADER])) == []


# ------------------------------------------------------------------------------------------------
# split files: bad input -> DataFormatError naming file, line and problem

BAD_SPLIT_CASES = {
    # name: (row replacing line 3 (as a dict of column -> value), expected problem regex)
    "unparsable_ids": ({"history_item_id": "[0, 1"}, r"history_item_id is not a valid Python list literal"),
    "unparsable_titles": ({"history_item_title": "['Alpha', 'Beta"}, r"history_item_title is not a valid Python list literal"),
    "ids_not_list": ({"history_item_id": "5"}, r"history_item_id is not a valid Python list literal \(got int\)"),
    "code_in_literal": ({"history_item_id": "[__import__('os')]"}, r"history_item_id is not a valid Python list literal"),
    "float_ids": ({"history_item_id": "[0.0, 1.0]"}, r"history_item_id must be a list of int, but element 0 is float"),
    "bool_ids": ({"history_item_id": "[True, 1]"}, r"history_item_id must be a list of int, but element 0 is bool"),
    "str_ids": ({"history_item_id": "['0', '1']"}, r"history_item_id must be a list of int, but element 0 is str"),
    "int_titles": ({"history_item_title": "['Alpha', 7]"}, r"history_item_title must be a list of str, but element 1 is int"),
    "length_mismatch": ({"history_item_id": "[0]"}, r"history_item_title has 2 titles but history_item_id has 1 ids"),
    "empty_target_title": ({"item_title": "   "}, r"item_title is empty"),
    "empty_history_title": ({"history_item_title": "['Alpha', ' ']"}, r"history_item_title element 1 is empty"),
    "non_integer_target": ({"item_id": "2.0"}, r"item_id is not an integer: '2.0'"),
    "non_integer_target_word": ({"item_id": "two"}, r"item_id is not an integer: 'two'"),
    "empty_target_id": ({"item_id": ""}, r"item_id is not an integer: ''"),
    "target_not_in_catalogue": ({"item_id": "99"}, r"item_id 99 is not in the catalogue"),
    "history_not_in_catalogue": ({"history_item_id": "[0, 42]"}, r"history_item_id element 1 \(42\) is not in the catalogue"),
    "target_title_disagrees": (
        {"item_title": "Gamma"},
        r"item_title 'Gamma' differs from the catalogue title 'Greatest Hits' of item_id 2 \(.*info\.txt line 3\)",
    ),
    "history_title_disagrees": (
        {"history_item_title": "['Alpha', 'Beta']"},
        r"history_item_title element 1 'Beta' differs from the catalogue title 'Beta, \"the\" one' of item_id 1",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPLIT_CASES))
def test_bad_split_row(tmp_path, case):
    change, problem = BAD_SPLIT_CASES[case]
    rows = _good_rows()
    row = dict(zip(HEADER, rows[2]))
    row.update(change)
    rows[2] = [row[name] for name in HEADER]
    path = _write_csv(tmp_path / "valid.csv", rows)
    catalogue = read_catalogue(_catalogue_file(tmp_path))
    with pytest.raises(DataFormatError) as info:
        read_split(path, catalogue)
    message = str(info.value)
    assert message.startswith(f"{path} line 3: "), message
    assert "valid.csv" in message
    assert re.search(problem, message), message
    assert info.value.line == 3 and info.value.path == str(path)


def test_catalogue_checks_need_a_catalogue(tmp_path):
    rows = _good_rows()
    rows[2][2] = "99"
    rows[2][4] = "Gamma"
    assert len(read_split(_write_csv(tmp_path / "valid.csv", rows))) == 3


def test_missing_column(tmp_path):
    path = _write_csv(tmp_path / "test.csv", [["user_id", "item_id", "item_title", "history_item_title"]])
    with pytest.raises(DataFormatError) as info:
        read_split(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 1: ")
    assert "missing required column(s) history_item_id" in message
    assert "columns: user_id, item_id, item_title, history_item_title" in message


def test_wrong_field_count(tmp_path):
    rows = _good_rows()
    rows[3] = rows[3][:-1]
    path = _write_csv(tmp_path / "valid.csv", rows)
    with pytest.raises(DataFormatError, match=r"valid\.csv line 4: expected 5 fields \(as in the header\), found 4"):
        read_split(path)


def test_duplicate_column(tmp_path):
    path = _write_csv(tmp_path / "d.csv", [HEADER + ["item_id"]])
    with pytest.raises(DataFormatError, match=r"d\.csv line 1: duplicate column 'item_id'"):
        read_split(path)


@pytest.mark.parametrize("content", ["", "\n\n", "  \n"])
def test_empty_split_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"empty\.csv line 1: the file is empty"):
        read_split(path)


def test_bad_utf8(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(",".join(HEADER).encode() + b"\nu,[],1,[],Caf\xe9\n")
    with pytest.raises(DataFormatError, match=r"bin\.csv line 2: not valid UTF-8"):
        read_split(path)


# ------------------------------------------------------------------------------------------------
# catalogue


def test_catalogue_title_id(tmp_path):
    catalogue = read_catalogue(_catalogue_file(tmp_path))
    for fmt in ("auto", "title_id"):
        catalogue = read_catalogue(tmp_path / "info.txt", fmt=fmt)
        assert catalogue.ids == [0, 1, 2, 3]
        assert catalogue.titles == ["Alpha", 'Beta, "the" one', "Greatest Hits", "Greatest Hits"]
        assert catalogue.codes is None
    assert catalogue.title_of(1) == 'Beta, "the" one'
    assert catalogue.items_with_title("Greatest Hits") == [2, 3]
    assert catalogue.items_with_title("Nope") == []
    assert 3 in catalogue and 4 not in catalogue and "3" not in catalogue and [3] not in catalogue
    assert len(catalogue) == 4
    with pytest.raises(KeyError):
        catalogue.title_of(4)


def test_catalogue_code_title_id(tmp_path):
    path = tmp_path / "codes.txt"
    path.write_text("<a_1><b_2>\tAlpha\t7\r\n<a_1><b_3>\tBeta\t5\r\n\r\n", encoding="utf-8")
    for fmt in ("auto", "code_title_id"):
        catalogue = read_catalogue(path, fmt=fmt)
        assert catalogue.ids == [7, 5] and catalogue.titles == ["Alpha", "Beta"]
        assert catalogue.codes == ["<a_1><b_2>", "<a_1><b_3>"]
        assert catalogue.lines == [1, 2]
    with pytest.raises(DataFormatError, match=r"codes\.txt line 1: expected 2 tab-separated fields \(title<TAB>item_id\), found 3"):
        read_catalogue(path, fmt="title_id")
    with pytest.raises(ValueError, match="unknown catalogue format"):
        read_catalogue(path, fmt="tsv")


BAD_CATALOGUE_CASES = {
    "inconsistent_fields": ("A\t0\nc\tB\t1\n", 2, r"expected 2 tab-separated fields \(title<TAB>item_id\) as on line 1, found 3"),
    "one_field": ("A\t0\nB\n", 2, r"expected 2 tab-separated fields .* found 1"),
    "four_fields_auto": ("a\tb\tc\t1\n", 1, r"expected 2 tab-separated fields .* or 3 .* found 4"),
    "duplicate_id": ("A\t0\nB\t1\nC\t0\n", 3, r"duplicate item_id 0 \(first on line 1\)"),
    "empty_title": ("A\t0\n  \t1\n", 2, r"empty title"),
    "empty_title_coded": ("c\tA\t0\nc\t\t1\n", 2, r"empty title"),
    "non_integer_id": ("A\t0\nB\tx1\n", 2, r"item_id is not an integer: 'x1'"),
    "float_id": ("A\t0\n\nB\t1.5\n", 3, r"item_id is not an integer: '1.5'"),
    "empty": ("", 1, r"the catalogue file is empty"),
    "blank": ("\n \n", 1, r"the catalogue file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_CATALOGUE_CASES))
def test_bad_catalogue(tmp_path, case):
    content, line, problem = BAD_CATALOGUE_CASES[case]
    path = tmp_path / "info.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        read_catalogue(path)
    message = str(info.value)
    assert message.startswith(f"{path} line {line}: "), message
    assert re.search(problem, message), message


def test_catalogue_constructor_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate item id 1"):
        Catalogue(path="mem", ids=[1, 1], titles=["a", "b"])


# ------------------------------------------------------------------------------------------------
# writers


def test_write_read_round_trip(tmp_path):
    titles = ["Don't Explain", 'He said "hi", twice', "Café, \\ backslash", "Greatest Hits"]
    write_catalogue(tmp_path / "info.txt", range(4), titles)
    rows = [
        {
            "user_id": "u1",
            "history_item_id": [0, 1, 2],
            "item_id": 3,
            "history_item_title": titles[:3],
            "item_title": titles[3],
            "history_rating": [5.0, 4.0, 1.0],
            "rating": 3.0,
        }
    ]
    write_split(tmp_path / "train.csv", rows)
    catalogue = read_catalogue(tmp_path / "info.txt")
    (sample,) = read_split(tmp_path / "train.csv", catalogue)
    assert sample.history_titles == titles[:3] and sample.history_ids == [0, 1, 2]
    assert sample.target_id == 3 and sample.target_title == "Greatest Hits"
    assert ast.literal_eval(sample.extra["history_rating"]) == [5.0, 4.0, 1.0]
    assert sample.extra["rating"] == "3.0"
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left
    write_catalogue(tmp_path / "coded.txt", [5], ["X"], codes=["<a>"])
    assert read_catalogue(tmp_path / "coded.txt").codes == ["<a>"]
    with pytest.raises(ValueError):
        write_catalogue(tmp_path / "bad.txt", [0], ["a\tb"])
    with pytest.raises(ValueError):
        write_split(tmp_path / "bad.csv", rows + [{"user_id": "u2"}])


# ------------------------------------------------------------------------------------------------
# the real CDs_and_Vinyl files


@pytest.fixture(scope="module")
def cds():
    if not (CDS_DIR / "info.txt").is_file():
        pytest.skip(f"the CDs_and_Vinyl data is not at {CDS_DIR} (expected ../shared/data/cds_and_vinyl next to the repo)")
    catalogue = read_catalogue(CDS_DIR / "info.txt")
    return catalogue, read_split(CDS_DIR / "valid.csv", catalogue), read_split(CDS_DIR / "test.csv", catalogue)


def test_cds_real_data(cds):
    catalogue, valid, test = cds
    assert len(valid) == 6156 and len(test) == 6157
    assert len(catalogue) == 5841 and catalogue.ids == list(range(5841))
    assert len(set(catalogue.titles)) == 5377
    assert len(catalogue.items_with_title("Greatest Hits")) == 54
    shared = {t: c for t, c in Counter(catalogue.titles).items() if c > 1}
    assert len(shared) == 185 and sum(shared.values()) == 649
    for samples in (valid, test):
        assert all(1 <= len(s.history_ids) <= 10 for s in samples)
        stamps = [int(float(s.extra["timestamp"])) for s in samples]
        assert stamps == sorted(stamps)
    assert int(float(valid[-1].extra["timestamp"])) <= int(float(test[0].extra["timestamp"]))
    assert set(valid[0].extra) == {
        "user_id", "item_asins", "item_asin", "history_rating", "rating", "history_timestamp", "timestamp"
    }
    assert valid[0].line == 2 and test[-1].line == 6158


# ------------------------------------------------------------------------------------------------
# MovieLens-100K


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    if not HAVE_RECBOLE:
        pytest.skip("recbole is not installed (pip install --no-deps recbole==1.2.1); MovieLens is read from its files")
    out = tmp_path_factory.mktemp("ml-100k")
    stats = movielens.prepare_movielens(out)
    catalogue = read_catalogue(out / "info.txt")
    splits = {name: read_split(out / f"{name}.csv", catalogue) for name in ("train", "valid", "test")}
    return out, stats, catalogue, splits


def _reference_sequences():
    """An independent, straightforward rebuild from the raw recbole files: 5-core, then each kept
    user's items sorted by (timestamp, file order), as original ids; and the kept original item ids."""
    inter_path, item_path = movielens.find_movielens_files()
    with open(inter_path, encoding="utf-8") as handle:
        next(handle)
        inter = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    with open(item_path, encoding="utf-8") as handle:
        next(handle)
        items = {f[0]: f for f in (line.rstrip("\n").split("\t") for line in handle if line.strip())}
    rows = [(user, item, float(ts), k) for k, (user, item, _, ts) in enumerate(inter)]
    while True:
        users = Counter(r[0] for r in rows)
        item_count = Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= 5 and item_count[r[1]] >= 5]
        if len(kept) == len(rows):
            break
        rows = kept
    sequences: dict[str, list[str]] = {}
    for user, item, ts, k in sorted(rows, key=lambda r: (r[2], r[3])):
        sequences.setdefault(user, []).append(item)
    return sequences, sorted(item_count, key=int), items


def test_movielens_titles_and_ids(ml):
    _, stats, catalogue, splits = ml
    reference, kept_items, items = _reference_sequences()
    assert len(kept_items) == len(catalogue)
    # new id i is the i-th kept original id in numeric order; its title is "title (year)"
    for new_id, original in enumerate(kept_items):
        _, raw_title, year, _ = items[original]
        title = catalogue.title_of(new_id)
        assert title.startswith(raw_title)
        if re.fullmatch(r"\d{4}", year):
            assert title.endswith(f"({year})")
    # only items whose release_year field is not a year may lack "(YYYY)": ML-100K has two, the
    # placeholder item "unkonwn" and one whose title already ends with "(1995)" (year field "V")
    no_year = [i for i, t in zip(catalogue.ids, catalogue.titles) if not re.search(r" \(\d{4}\)$", t)]
    assert set(no_year) <= set(stats["items_without_year"])
    assert len(stats["items_without_year"]) == 2 and len(no_year) == 1
    assert catalogue.title_of(0) == "Toy Story (1995)"
    # each sample's history is the user's previous <= 10 items, against the independent rebuild
    to_new = {original: new for new, original in enumerate(kept_items)}
    position = Counter()
    for sample in splits["train"] + splits["valid"] + splits["test"]:
        user = sample.extra["user_id"]
        position[user] += 1
        k = position[user]  # the sample's target is the user's k-th item (0-based)
        seq = reference[user]
        assert sample.target_id == to_new[seq[k]]
        assert sample.history_ids == [to_new[i] for i in seq[max(0, k - 10) : k]]
    assert all(position[user] == len(seq) - 1 for user, seq in reference.items())


def test_movielens_sequences(ml):
    _, stats, catalogue, splits = ml
    ordered = splits["train"] + splits["valid"] + splits["test"]
    # time order across and within splits
    stamps = [int(s.extra["timestamp"]) for s in ordered]
    assert stamps == sorted(stamps)
    assert max(int(s.extra["timestamp"]) for s in splits["train"]) <= min(int(s.extra["timestamp"]) for s in splits["valid"])
    assert max(int(s.extra["timestamp"]) for s in splits["valid"]) <= min(int(s.extra["timestamp"]) for s in splits["test"])
    # rebuild each user's sequence from the files alone: the first sample's single history item,
    # then the targets in order
    sequences: dict[str, list[int]] = {}
    for sample in ordered:
        seq = sequences.get(sample.extra["user_id"])
        if seq is None:
            assert len(sample.history_ids) == 1
            seq = sequences[sample.extra["user_id"]] = list(sample.history_ids)
        assert 1 <= len(sample.history_ids) <= 10
        assert sample.history_ids == seq[-10:]  # history = the user's previous <= 10 items
        assert sample.history_titles == [catalogue.title_of(i) for i in sample.history_ids]
        history_stamps = json.loads(sample.extra["history_timestamp"])  # int list: also JSON
        assert history_stamps == sorted(history_stamps) and history_stamps[-1] <= int(sample.extra["timestamp"])
        assert len(json.loads(sample.extra["history_rating"])) == len(sample.history_ids)
        seq.append(sample.target_id)
    # 5-core holds in the kept interactions
    user_counts = {user: len(seq) for user, seq in sequences.items()}
    item_counts = Counter(item for seq in sequences.values() for item in seq)
    assert min(user_counts.values()) >= 5 and min(item_counts.values()) >= 5
    assert sum(user_counts.values()) == stats["interactions"]
    assert len(sequences) == stats["users"] and set(item_counts) == set(catalogue.ids)


def test_ensure_movielens_reuses_and_default_dir(ml, tmp_path, monkeypatch):
    out, _, _, _ = ml
    monkeypatch.setattr(movielens, "prepare_movielens", lambda *a, **k: pytest.fail("prepared again"))
    assert movielens.ensure_movielens(out) == out
    monkeypatch.setenv("LATENTR3_CACHE", str(tmp_path / "cache"))
    assert movielens.default_data_dir() == tmp_path / "cache" / "data" / "ml-100k"
    monkeypatch.delenv("LATENTR3_CACHE")
    assert movielens.default_data_dir() == Path.home() / ".cache" / "latentr3" / "data" / "ml-100k"
    calls = []
    monkeypatch.setattr(movielens, "prepare_movielens", lambda d, *a, **k: calls.append(Path(d)))
    assert movielens.ensure_movielens(tmp_path / "fresh") == tmp_path / "fresh"
    assert calls == [tmp_path / "fresh"]


def test_movielens_title_rule():
    assert movielens.movielens_title("Toy Story", "1995") == "Toy Story (1995)"
    assert movielens.movielens_title("Land Before Time III (1995)", "V") == "Land Before Time III (1995)"
    assert movielens.movielens_title("Some Film", "") == "Some Film"
    assert movielens.movielens_title("Old (1995)", "1995") == "Old (1995)"


def test_movielens_without_recbole(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        movielens.importlib.util, "find_spec", lambda name, *a: None if name == "recbole" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps recbole==1\.2\.1"):
        movielens.prepare_movielens(tmp_path)
