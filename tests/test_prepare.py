"""Tests of `latentr3 prepare` (latentr3.data.prepare / amazon / interactions / sequences).

The raw fixtures are generated here: small Amazon 2018 / 2023 style files and a generic log.  The
output with the two fixes switched off is compared, file for file, against a straightforward
re-implementation of the reference script's rules written in this file.
"""

from __future__ import annotations

import ast
import csv
import gzip
import html
import importlib.util
import json
import random
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from latentr3.cli import main as cli_main
from latentr3.data.amazon import prepare_amazon2018, prepare_amazon2023
from latentr3.data.interactions import prepare_interactions
from latentr3.data.sequences import PrepareError, has_html_markup, make_titles_distinct, shift_months
from latentr3.data.splits import DataFormatError, read_catalogue, read_split

SPLITS = ("train", "valid", "test")
SPAN_CLASS = '<span class="a-size-medium a-color-secondary a-text-normal'


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp())


def write_lines(path: Path, lines: list[str], gz: bool = True) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def review(user: str, asin: str, when: int, rating: float = 5.0) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": when,
                       "reviewText": "ok", "reviewTime": "01 1, 2018"})


def meta(asin: str, title=None, brand=None, literal: bool = False) -> str:
    record = {"asin": asin}
    if title is not None:
        record["title"] = title
    if brand is not None:
        record["brand"] = brand
    return repr(record) if literal else json.dumps(record)


BASE = ts("2018-01-01T00:00:00")
DAY = 86400


def amazon2018_fixture(directory: Path, *, extra_meta=(), extra_reviews=(), bad=True):
    """Items P0..P11 (plain), special-title items, users U0..U11 each reviewing every P item and the
    special ones; a k-core cascade (V0..V4 around item W); reviews on both sides of the window."""
    metas = [meta(f"P{j}", f"Plain Album {j}", brand=f"Band {j}") for j in range(12)]
    metas[3] = meta("P3", "Rock &amp; Roll Classics", literal=True)  # a Python dict literal line
    special = {
        "S_CLASS": SPAN_CLASS,  # survives only with --no-drop-html
        "S_ID": '<span id="x">Fake</span>',  # dropped either way
        "S_BR": "Live<br/>Album",  # markup: dropped by the fix, kept by the reference
        "S_ONE": "X",  # too short
        "S_LONG": " ".join(["word"] * 21),  # too long
        "S_TWENTY": " ".join(["w"] * 20),  # exactly 20 words: kept
        "G0": "Greatest Hits",
        "G1": "Greatest Hits",
        "G2": "Greatest Hits",
        "G3": "Greatest Hits",
    }
    brands = {"G0": "Queen", "G1": "ABBA", "G3": "Visit Amazon's Queen Page"}
    for asin, title in special.items():
        metas.append(meta(asin, title, brand=brands.get(asin)))
    metas.append(meta("NOTITLE"))
    metas.append(meta("W", "Weak Item"))
    if bad:
        metas.insert(5, "{this is not json")
    metas.extend(extra_meta)

    reviews = []
    asins = [f"P{j}" for j in range(12)] + list(special) + ["NOTITLE"]
    for i in range(12):
        for k, asin in enumerate(asins):
            when = BASE + (i * 20 + k) * DAY // 2
            reviews.append(review(f"U{i}", asin, when, rating=float(1 + (i + k) % 5)))
    # a tie: U0 reviews P0 and P1 at the same second (P1 later in the file)
    reviews.append(review("U0", "P1", BASE + 200 * DAY))
    reviews.append(review("U0", "P0", BASE + 200 * DAY))
    # cascade: V0 has 4 reviews -> W falls to 4 -> V1..V4 fall to 4
    for v in range(5):
        items = ["W", "P0", "P1", "P2"] + (["P3"] if v else [])
        for k, asin in enumerate(items):
            reviews.append(review(f"V{v}", asin, BASE + (v * 5 + k) * DAY))
    # window edges (UTC): inside at 2017-10-01T00:30, outside at 2017-09-30T23:30, inside at
    # 2018-10-31T23:30, outside at 2018-11-01T00:00
    reviews.append(review("U1", "P5", ts("2017-10-01T00:30:00")))
    reviews.append(review("U2", "P6", ts("2017-09-30T23:30:00")))
    reviews.append(review("U3", "P7", ts("2018-10-31T23:30:00")))
    reviews.append(review("U4", "P8", ts("2018-11-01T00:00:00")))
    reviews.append(review("U5", "UNKNOWN", BASE))  # no metadata
    if bad:
        reviews.insert(7, '{"reviewerID": "U9", "asin": ')  # truncated line
        reviews.insert(30, "")  # a blank line
    reviews.extend(extra_reviews)
    r = write_lines(directory / "CDs.json.gz", reviews)
    m = write_lines(directory / "meta_CDs.json.gz", metas)
    return r, m


def read_out(out: Path):
    catalogue = read_catalogue(out / "info.txt")
    splits = {name: read_split(out / f"{name}.csv", catalogue) for name in SPLITS}
    stats = json.loads((out / "stats.json").read_text())
    return catalogue, splits, stats


# ------------------------------------------------------------------------------------------------
# an independent re-implementation of the reference rules (fixes off)


def reference_prepare(reviews_path: Path, meta_path: Path, start: datetime, end: datetime, *,
                      k: int = 5, min_items: int = 5000, seed: int = 42, max_history: int = 10):
    titles = {}
    with gzip.open(meta_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                try:
                    record = ast.literal_eval(line.strip())
                except (ValueError, SyntaxError):
                    continue
            if "title" not in record or "<span id" in record["title"] or record["asin"] in titles:
                continue
            title = html.unescape(record["title"])
            if len(title) > 1 and len(title.split()) <= 20:
                titles[record["asin"]] = title
    rows = []
    with gzip.open(reviews_path, "rt", encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record["asin"] in titles:
                rows.append((record["reviewerID"], record["asin"], float(record["overall"]), record["unixReviewTime"]))
    while True:
        lo, hi = start.timestamp(), end.timestamp()
        kept = [r for r in rows if lo <= r[3] < hi]
        while True:
            users = Counter(r[0] for r in kept)
            items = Counter(r[1] for r in kept)
            still = [r for r in kept if users[r[0]] >= k and items[r[1]] >= k]
            if len(still) == len(kept):
                break
            kept = still
        if len({r[1] for r in kept}) >= min_items:
            break
        start = shift_months(start, -3)
    asins = sorted({r[1] for r in kept})
    random.Random(seed).shuffle(asins)
    new_id = {asin: i for i, asin in enumerate(asins)}
    sequences: dict[str, list] = {}
    for r in kept:
        sequences.setdefault(r[0], []).append(r)
    samples = []
    for user, seq in sequences.items():
        seq = sorted(seq, key=lambda r: r[3])
        for p in range(1, len(seq)):
            history = seq[max(0, p - max_history):p]
            samples.append({
                "user_id": user,
                "item_asins": repr([r[1] for r in history]),
                "item_asin": seq[p][1],
                "history_item_id": repr([new_id[r[1]] for r in history]),
                "item_id": str(new_id[seq[p][1]]),
                "history_item_title": repr([titles[r[1]] for r in history]),
                "item_title": titles[seq[p][1]],
                "history_rating": repr([r[2] for r in history]),
                "rating": repr(seq[p][2]),
                "history_timestamp": repr([r[3] for r in history]),
                "timestamp": str(seq[p][3]),
                "_t": seq[p][3],
            })
    samples.sort(key=lambda s: s["_t"])
    n = len(samples)
    a, b = int(n * 0.8), int(n * 0.9)
    for s in samples:
        del s["_t"]
    info = sorted(((titles[asin], i) for asin, i in new_id.items()), key=lambda x: x[1])
    return {"train": samples[:a], "valid": samples[a:b], "test": samples[b:]}, info, start


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------------
# Amazon 2018


def test_fixes_off_follow_reference_exactly(tmp_path):
    r, m = amazon2018_fixture(tmp_path)
    out = tmp_path / "out"
    stats = prepare_amazon2018(r, m, out, min_items=10, drop_html=False, dedupe_titles=False, progress=False)
    expected, info, _ = reference_prepare(r, m, datetime(2017, 10, 1, tzinfo=timezone.utc),
                                          datetime(2018, 11, 1, tzinfo=timezone.utc), min_items=10)
    for name in SPLITS:
        assert read_rows(out / f"{name}.csv") == expected[name], name
    lines = (out / "info.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [f"{title}\t{i}" for title, i in info]
    catalogue, splits, _ = read_out(out)
    # the reference rules: the <span class title survives, <br/> too; <span id does not
    assert SPAN_CLASS in catalogue.titles and "Live<br/>Album" in catalogue.titles
    assert not any("<span id" in t for t in catalogue.titles)
    assert len(catalogue.items_with_title("Greatest Hits")) == 4
    assert "Rock & Roll Classics" in catalogue.titles  # unescaped, read from a dict-literal line
    assert " ".join(["w"] * 20) in catalogue.titles
    assert stats["item_table"]["removed"]["title_span_id"] == 1
    assert stats["titles"]["changed_by_dedupe"] == 0
    assert stats["samples"]["train"] == len(expected["train"])


def test_fixes_on(tmp_path):
    r, m = amazon2018_fixture(tmp_path)
    out = tmp_path / "out"
    stats = prepare_amazon2018(r, m, out, min_items=10, progress=False)
    catalogue, splits, stats_file = read_out(out)
    assert stats == stats_file
    assert not any(has_html_markup(t) for t in catalogue.titles)
    assert SPAN_CLASS not in catalogue.titles and "Live<br/>Album" not in catalogue.titles
    removed = stats["item_table"]["removed"]
    assert removed["title_html_markup"] == 3 and removed["no_title"] == 1
    assert removed["title_too_short"] == 1 and removed["title_too_long"] == 1
    # duplicates made distinct: brand appended, then a counter
    assert len(set(catalogue.titles)) == len(catalogue)
    greatest = {t for t in catalogue.titles if t.startswith("Greatest Hits")}
    assert greatest == {"Greatest Hits (Queen)", "Greatest Hits (ABBA)", "Greatest Hits", "Greatest Hits (Queen) [2]"}
    assert stats["titles"]["changed_by_dedupe"] == 3
    assert stats["titles"]["before_dedupe"]["items_with_duplicate_title"] == 4
    assert stats["duplicate_title_share"] == 0.0 and stats["items_with_duplicate_title"] == 0
    # titles in the split files follow the catalogue (read_split checked them) and every item appears
    seen = {s.target_id for name in SPLITS for s in splits[name]}
    seen |= {i for name in SPLITS for s in splits[name] for i in s.history_ids}
    assert seen == set(catalogue.ids) and sorted(catalogue.ids) == list(range(len(catalogue)))


def test_every_review_and_item_accounted_for(tmp_path):
    r, m = amazon2018_fixture(tmp_path)
    stats = prepare_amazon2018(r, m, tmp_path / "out", min_items=10, progress=False)
    reviews, items, files = stats["reviews"], stats["item_table"], stats["files"]
    assert reviews["read"] == reviews["kept"] + sum(reviews["removed"].values())
    assert reviews["read"] == files["reviews"]["lines"] - files["reviews"]["blank_lines"]
    assert reviews["kept"] == stats["interactions"]
    assert items["items"] == items["kept"] + sum(items["removed"].values())
    assert items["kept"] == stats["items"]
    removed = reviews["removed"]
    assert removed["malformed_line"] == 1 and removed["item_not_in_metadata"] == 1
    assert removed["after_window_end"] == 1 and removed["before_window_start"] == 1
    assert removed["core_filter"] == 4 + 4 * 5  # the V cascade
    assert removed["item_title_html_markup"] == 3 * 12 and removed["item_no_title"] == 12
    assert items["removed"]["core_filter"] == 1  # W
    # malformed lines are reported with their numbers
    assert files["reviews"]["malformed_line_numbers"] == [8]
    assert files["items"]["malformed_line_numbers"] == [6]
    assert files["items"]["python_literal_lines"] == 1
    assert stats["core_filter_rounds"] == 4


def test_history_cap_order_and_split_boundaries(tmp_path):
    r, m = amazon2018_fixture(tmp_path)
    out = tmp_path / "out"
    stats = prepare_amazon2018(r, m, out, min_items=10, progress=False, max_history=10)
    catalogue, splits, _ = read_out(out)
    n = stats["samples_total"]
    assert [len(splits[s]) for s in SPLITS] == [n * 8 // 10, n * 9 // 10 - n * 8 // 10, n - n * 9 // 10]
    ordered = splits["train"] + splits["valid"] + splits["test"]
    stamps = [int(s.extra["timestamp"]) for s in ordered]
    assert stamps == sorted(stamps)
    sequences: dict[str, list[int]] = {}
    lengths = Counter()
    asin_of: dict[int, str] = {}
    for s in ordered:
        seq = sequences.setdefault(s.extra["user_id"], list(s.history_ids))
        assert s.history_ids == seq[-10:]
        asin_of[s.target_id] = s.extra["item_asin"]
        history_asins = ast.literal_eval(s.extra["item_asins"])
        assert len(history_asins) == len(s.history_ids)
        assert all(asin_of.get(i, a) == a for i, a in zip(s.history_ids, history_asins))
        lengths[len(s.history_ids)] += 1
        seq.append(s.target_id)
    assert max(lengths) == 10 and lengths[10] > 0
    # the tie: U0's P1 (earlier in the file) comes before P0 at the same second
    u0 = [s for s in ordered if s.extra["user_id"] == "U0" and int(s.extra["timestamp"]) == BASE + 200 * DAY]
    assert [s.extra["item_asin"] for s in u0] == ["P1", "P0"]
    assert stats["window"]["start"] == "2017-10-01T00:00:00Z" and stats["window"]["end"] == "2018-11-01T00:00:00Z"


@pytest.mark.parametrize("zone", ["LINT-14", "HST+10", "PST+8PDT"])
def test_window_is_utc_whatever_the_time_zone(tmp_path, monkeypatch, zone):
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        assert time.timezone != 0
        r, m = amazon2018_fixture(tmp_path)
        out = tmp_path / "out"
        prepare_amazon2018(r, m, out, min_items=10, progress=False)
        _, splits, stats = read_out(out)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    stamps = {(s.extra["user_id"], int(s.extra["timestamp"])) for name in SPLITS for s in splits[name]}
    stamps |= {(s.extra["user_id"], t) for name in SPLITS for s in splits[name]
               for t in ast.literal_eval(s.extra["history_timestamp"])}
    assert ("U1", ts("2017-10-01T00:30:00")) in stamps
    assert ("U3", ts("2018-10-31T23:30:00")) in stamps
    assert ("U2", ts("2017-09-30T23:30:00")) not in stamps
    assert ("U4", ts("2018-11-01T00:00:00")) not in stamps
    assert stats["reviews"]["removed"]["before_window_start"] == 1


def test_window_widening(tmp_path):
    # items O0..O5, only reviewed (by users O-users) in summer 2017: reachable after one widening
    extra_meta = [meta(f"O{j}", f"Old Record {j}") for j in range(6)]
    extra_reviews = [review(f"OU{i}", f"O{j}", ts("2017-07-15T00:00:00") + (i * 6 + j) * 3600)
                     for i in range(6) for j in range(6)]
    # and one review of the outside kind much earlier, which a wider window would reach
    extra_reviews.append(review("OU0", "O0", ts("2015-01-01T00:00:00")))
    r, m = amazon2018_fixture(tmp_path, extra_meta=extra_meta, extra_reviews=extra_reviews)
    stats = prepare_amazon2018(r, m, tmp_path / "a", min_items=20, progress=False)
    assert stats["items"] >= 20
    assert stats["window"]["start"] == "2017-07-01T00:00:00Z"
    assert [a["start"] for a in stats["window"]["attempts"]] == ["2017-10-01T00:00:00Z", "2017-07-01T00:00:00Z"]
    assert stats["window"]["min_items_reached"] is True
    cat = read_catalogue(tmp_path / "a" / "info.txt")
    assert {f"Old Record {j}" for j in range(6)} <= set(cat.titles)
    # fixes-off output equals the reference with its widening loop
    prepare_amazon2018(r, m, tmp_path / "b", min_items=20, drop_html=False, dedupe_titles=False, progress=False)
    expected, _, start = reference_prepare(r, m, datetime(2017, 10, 1, tzinfo=timezone.utc),
                                           datetime(2018, 11, 1, tzinfo=timezone.utc), min_items=20)
    assert start == datetime(2017, 7, 1, tzinfo=timezone.utc)
    for name in SPLITS:
        assert read_rows(tmp_path / "b" / f"{name}.csv") == expected[name]
    # unreachable: widening stops once the window holds every review, with a warning and a flag
    stats = prepare_amazon2018(r, m, tmp_path / "c", min_items=1000, progress=False)
    assert stats["window"]["min_items_reached"] is False
    assert stats["window"]["attempts"][-1]["start"][:10] <= "2015-01-01"
    assert stats["window"]["start"] == stats["window"]["attempts"][-1]["start"]


def test_seed_changes_ids_only(tmp_path):
    r, m = amazon2018_fixture(tmp_path)
    prepare_amazon2018(r, m, tmp_path / "a", min_items=10, seed=1, progress=False)
    prepare_amazon2018(r, m, tmp_path / "b", min_items=10, seed=2, progress=False)
    a, b = read_catalogue(tmp_path / "a" / "info.txt"), read_catalogue(tmp_path / "b" / "info.txt")
    assert sorted(a.titles) == sorted(b.titles) and a.titles != b.titles
    rows_a = read_rows(tmp_path / "a" / "test.csv")
    rows_b = read_rows(tmp_path / "b" / "test.csv")
    assert [x["item_title"] for x in rows_a] == [x["item_title"] for x in rows_b]


def test_bad_input_errors(tmp_path):
    r, m = amazon2018_fixture(tmp_path)
    # too many malformed lines: the error names the file and the line
    bad = write_lines(tmp_path / "bad.json", [review("U0", "P0", BASE), "nope", "{", "[1, 2]"], gz=False)
    with pytest.raises(DataFormatError, match=r"bad\.json line 4: .*more than --max-bad-lines 2.*lines 2, 3, 4"):
        prepare_amazon2018(bad, m, tmp_path / "o", max_bad_lines=2, progress=False)
    # missing field
    missing = write_lines(tmp_path / "missing.json", [review("U0", "P0", BASE),
                                                      json.dumps({"reviewerID": "U1", "asin": "P0", "overall": 5.0})])
    with pytest.raises(DataFormatError, match=r"missing\.json line 2: missing field 'unixReviewTime'"):
        prepare_amazon2018(missing, m, tmp_path / "o", progress=False)
    # unparseable timestamp
    stamp = write_lines(tmp_path / "stamp.json", [json.dumps({"reviewerID": "U1", "asin": "P0", "overall": 5.0,
                                                              "unixReviewTime": "yesterday"})])
    with pytest.raises(DataFormatError, match=r"stamp\.json line 1: field 'unixReviewTime' is not an integer"):
        prepare_amazon2018(stamp, m, tmp_path / "o", progress=False)
    # meta line without asin
    no_asin = write_lines(tmp_path / "meta_bad.json", [meta("P0", "A"), json.dumps({"title": "B"})])
    with pytest.raises(DataFormatError, match=r"meta_bad\.json line 2: missing field 'asin'"):
        prepare_amazon2018(r, no_asin, tmp_path / "o", progress=False)
    # empty result after filtering: a window with nothing inside
    with pytest.raises(PrepareError, match=r"no interaction survives the 5-core"):
        prepare_amazon2018(r, m, tmp_path / "o", start="2018-10-31", end="2018-11-01", min_items=0, progress=False)
    # no file
    with pytest.raises(FileNotFoundError):
        prepare_amazon2018(tmp_path / "nope.json", m, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "stats.json").exists()


def test_cli(tmp_path, capsys):
    r, m = amazon2018_fixture(tmp_path)
    out = tmp_path / "out"
    code = cli_main(["prepare", "amazon2018", "--reviews", str(r), "--meta", str(m), "--out", str(out),
                     "--min-items", "10", "--no-progress", "--no-drop-html", "--no-dedupe-titles"])
    assert code == 0
    assert "samples train" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["params"]["drop_html"] is False and stats["params"]["dedupe_titles"] is False
    code = cli_main(["prepare", "amazon2018", "--reviews", str(r), "--meta", str(m), "--out", str(out),
                     "--start", "2018-10-31", "--end", "2018-11-01", "--min-items", "0", "--no-progress"])
    assert code == 2 and "no interaction survives" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Amazon 2023, generic interactions


def test_amazon2023(tmp_path):
    metas = [json.dumps({"parent_asin": f"P{j}", "title": f"Thing {j}", "store": f"Store {j % 2}"}) for j in range(8)]
    metas += [json.dumps({"parent_asin": "D0", "title": "Same", "store": "A"}),
              json.dumps({"parent_asin": "D1", "title": "Same", "store": "B"})]
    reviews = []
    for i in range(8):
        for k, asin in enumerate([f"P{j}" for j in range(8)] + ["D0", "D1"]):
            ms = (ts("2018-03-01T00:00:00") + (i * 10 + k) * 3600) * 1000 + 123
            reviews.append(json.dumps({"user_id": f"u{i}", "parent_asin": asin, "asin": "x", "rating": 4.0,
                                       "timestamp": ms, "text": "fine"}))
    r = write_lines(tmp_path / "Toys.jsonl.gz", reviews)
    m = write_lines(tmp_path / "meta_Toys.jsonl", metas, gz=False)
    stats = prepare_amazon2023(r, m, tmp_path / "out", min_items=5, progress=False)
    catalogue, splits, _ = read_out(tmp_path / "out")
    assert stats["items"] == 10 and stats["users"] == 8
    assert {"Same (A)", "Same (B)"} <= set(catalogue.titles)
    assert all(int(s.extra["timestamp"]) % 1000 == 123 for s in splits["test"])  # milliseconds kept
    assert stats["target_time_range"]["train"][0].startswith("2018-03-01")


def test_interactions_csv(tmp_path):
    with open(tmp_path / "items.csv", "w", encoding="utf-8", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["id", "name", "maker"])
        for j in range(7):
            w.writerow([f"i{j}", "Dup" if j < 2 else f"Movie, {j}", f"M{j}"])
        w.writerow(["i9", "", "M9"])
    with open(tmp_path / "log.csv", "w", encoding="utf-8", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["who", "what", "when", "stars"])
        for i in range(6):
            for j in [*range(7), 9]:
                w.writerow([f"user{i}", f"i{j}", f"2020-01-{1 + i + j:02d}T10:00:00", 3])
        w.writerow(["user0", "i0"])  # malformed row (2 fields)
    stats = prepare_interactions(tmp_path / "log.csv", tmp_path / "items.csv", tmp_path / "out",
                                 user_col="who", item_col="what", time_col="when", title_col="name",
                                 item_key_col="id", rating_col="stars", brand_col="maker", progress=False)
    catalogue, splits, _ = read_out(tmp_path / "out")
    assert stats["items"] == 7 and set(catalogue.titles) >= {"Dup (M0)", "Dup (M1)", "Movie, 2"}
    assert stats["reviews"]["removed"]["item_no_title"] == 6
    assert stats["files"]["reviews"]["malformed_line_numbers"] == [2 + 6 * 8]
    assert splits["train"][0].extra["rating"] == "3.0"
    assert splits["train"][0].extra["timestamp"] == str(ts("2020-01-02T10:00:00"))
    # a bad time is an error naming file and line
    (tmp_path / "bad.csv").write_text("who,what,when\nu,i0,2020-01-01\nu,i1,soon\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv line 3: column 'when' is neither"):
        prepare_interactions(tmp_path / "bad.csv", tmp_path / "items.csv", tmp_path / "o", user_col="who",
                             item_col="what", time_col="when", title_col="name", item_key_col="id", progress=False)
    with pytest.raises(DataFormatError, match=r"items\.csv line 1: missing column\(s\) what, title"):
        prepare_interactions(tmp_path / "log.csv", tmp_path / "items.csv", tmp_path / "o", user_col="who",
                             item_col="what", time_col="when", title_col="title", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow is installed")
def test_interactions_parquet_needs_pyarrow(tmp_path, capsys):
    (tmp_path / "log.parquet").write_bytes(b"PAR1")
    (tmp_path / "items.csv").write_text("id,name\ni0,A\n", encoding="utf-8")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        prepare_interactions(tmp_path / "log.parquet", tmp_path / "items.csv", tmp_path / "o", user_col="u",
                             item_col="id", time_col="t", title_col="name", progress=False)
    code = cli_main(["prepare", "interactions", "--file", str(tmp_path / "log.parquet"), "--user-col", "u",
                     "--item-col", "id", "--time-col", "t", "--items", str(tmp_path / "items.csv"),
                     "--title-col", "name", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "pyarrow" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# units


def test_make_titles_distinct():
    titles = ["A", "A", "A", "B", "A (x)", "C", "C"]
    brands = ["x", "y", "", "", "", "", ""]
    result, changed, _ = make_titles_distinct(titles, brands)
    assert len(set(result)) == len(result)
    # "A (x)" is another item's own title, so item 0 cannot take it: it keeps "A", item 2 gets a counter
    assert result == ["A", "A (y)", "A [2]", "B", "A (x)", "C", "C [2]"]
    assert changed == 3


def test_html_markup_and_months():
    assert has_html_markup(SPAN_CLASS) and has_html_markup("a</div>") and has_html_markup("x<br>")
    assert not has_html_markup("Love <3") and not has_html_markup("a < b > c") and not has_html_markup("<Greatest Hits>")
    assert shift_months(datetime(2017, 1, 31, tzinfo=timezone.utc), -3) == datetime(2016, 10, 31, tzinfo=timezone.utc)
    assert shift_months(datetime(2018, 5, 31), -3) == datetime(2018, 2, 28)
