"""Wall time and peak memory of `latentr3 prepare amazon2018` on a generated 5-million-review file.

Run:

    .venv/bin/python benchmarks/bench_prepare.py                 # 5,000,000 reviews, temp dir removed after
    .venv/bin/python benchmarks/bench_prepare.py --reviews 500000 --keep /tmp/bench_prepare

The script writes, into a temporary directory (or --keep DIR, reused when the files are there):

* ``Bench.json.gz``: Amazon-2018-style review lines (reviewerID, asin, overall, unixReviewTime,
  reviewTime, reviewerName, summary, a ~250-character reviewText; ~450 bytes a line), users and items
  drawn from power laws, times uniform over 2012-01-01 .. 2018-12-31; a few malformed lines;
* ``meta_Bench.json.gz``: one line per item (asin, title, brand, a description), with some titles
  missing, too long, HTML (``<span class=...``), shared ("Greatest Hits"), and some lines written as
  Python dict literals.

Then it runs ``prepare_amazon2018`` (default settings: window 2017-10-01 .. 2018-11-01, 5-core,
--min-items 5000, both fixes on) in a child process and reports the child's wall time and peak
resident memory (``ru_maxrss`` of RUSAGE_CHILDREN), the input sizes, and the output statistics.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T0 = 1325376000  # 2012-01-01
T1 = 1546214400  # 2018-12-31
WORDS = ("great sound quality album songs love classic band music record vinyl fast shipping "
         "recommend favorite track listen again wonderful beautiful voice edition").split()


def _power_law(rng, n: int, size: int, exponent: float) -> np.ndarray:
    """Indices in [0, n) with P(i) ~ (i + 1) ** -exponent (approximately), by inverse transform."""
    u = rng.random(size)
    a = 1.0 - exponent
    x = ((n + 1) ** a - 1) * u + 1
    return np.minimum((x ** (1 / a)).astype(np.int64) - 1, n - 1)


def generate(directory: Path, n_reviews: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    n_users = max(1000, n_reviews // 8)
    n_items = max(500, n_reviews // 40)
    reviews = directory / "Bench.json.gz"
    meta = directory / "meta_Bench.json.gz"
    text = " ".join(rng.choice(WORDS, 40))
    with gzip.open(meta, "wt", encoding="utf-8", compresslevel=1) as handle:
        for j in range(n_items):
            asin = f"B{j:09d}"
            kind = j % 50
            record = {"asin": asin, "description": [text[:120]], "brand": f"Artist {j % 7919}"}
            if kind == 1:
                pass  # no title
            elif kind == 2:
                record["title"] = '<span class="a-size-medium a-color-secondary a-text-normal'
            elif kind == 3:
                record["title"] = " ".join(["long"] * 25)
            elif kind in (4, 5):
                record["title"] = "Greatest Hits"
            else:
                record["title"] = f"Album &amp; Songs {j}"
            handle.write((repr(record) if kind == 6 else json.dumps(record)) + "\n")
    # popularity ranks mapped to shuffled ids (so the popular items are not the special-title ones)
    users = rng.permutation(n_users)[_power_law(rng, n_users, n_reviews, 0.85)]
    items = rng.permutation(n_items)[_power_law(rng, n_items, n_reviews, 0.9)]
    stamps = rng.integers(T0, T1, n_reviews)
    ratings = rng.integers(1, 6, n_reviews)
    body = text.replace('"', "")
    chunk = 200_000
    with gzip.open(reviews, "wt", encoding="utf-8", compresslevel=1) as handle:
        for lo in range(0, n_reviews, chunk):
            lines = []
            for u, i, t, r in zip(users[lo:lo + chunk].tolist(), items[lo:lo + chunk].tolist(),
                                  stamps[lo:lo + chunk].tolist(), ratings[lo:lo + chunk].tolist()):
                lines.append(
                    f'{{"overall": {r}.0, "verified": true, "reviewTime": "01 1, 2018", "reviewerID": "A{u:013d}", '
                    f'"asin": "B{i:09d}", "reviewerName": "Name {u}", "reviewText": "{body[: 150 + (u % 100)]}", '
                    f'"summary": "Five Stars", "unixReviewTime": {t}}}'
                )
            if lo == 0:
                lines[10] = '{"overall": 5.0, "reviewerID": '  # a few malformed lines
                lines[20] = "not json at all"
            handle.write("\n".join(lines) + "\n")
    return reviews, meta


CHILD = """
import json, sys, time
from latentr3.data.amazon import prepare_amazon2018
start = time.perf_counter()
stats = prepare_amazon2018(sys.argv[1], sys.argv[2], sys.argv[3], progress=sys.argv[4] == "1")
print(json.dumps({"wall_s": time.perf_counter() - start, "stats": stats}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reviews", type=int, default=5_000_000)
    parser.add_argument("--keep", default=None, help="directory for the generated files (reused when present)")
    parser.add_argument("--progress", action="store_true", help="show the child's progress bars")
    args = parser.parse_args()

    tmp = None
    if args.keep:
        directory = Path(args.keep)
        directory.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_prepare_")
        directory = Path(tmp.name)
    try:
        reviews, meta = directory / "Bench.json.gz", directory / "meta_Bench.json.gz"
        marker = directory / f"generated_{args.reviews}"
        if not marker.exists():
            t = time.perf_counter()
            generate(directory, args.reviews)
            marker.touch()
            print(f"generated {args.reviews:,} reviews in {time.perf_counter() - t:.1f} s", flush=True)
        out = directory / "out"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(reviews), str(meta), str(out), "1" if args.progress else "0"],
            stdout=subprocess.PIPE, text=True, check=True,
        )
        wall = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        child = json.loads(result.stdout.strip().splitlines()[-1])
        stats = child["stats"]
        report = {
            "reviews": args.reviews,
            "reviews_gz_mib": round(reviews.stat().st_size / 2**20, 1),
            "meta_gz_mib": round(meta.stat().st_size / 2**20, 1),
            "wall_s_child_process": round(wall, 1),
            "wall_s_prepare_call": round(child["wall_s"], 1),
            "peak_rss_mib": round(peak_kib / 1024, 1),
            "reviews_per_s": round(args.reviews / child["wall_s"]),
            "output": {
                "users": stats["users"], "items": stats["items"], "interactions": stats["interactions"],
                "samples": stats["samples"], "window": [stats["window"]["start"], stats["window"]["end"]],
                "reviews_removed": stats["reviews"]["removed"],
                "titles_changed_by_dedupe": stats["titles"]["changed_by_dedupe"],
            },
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(report, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
