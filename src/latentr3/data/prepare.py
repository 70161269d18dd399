"""`latentr3 prepare <source>`: raw interaction data -> the split files the recipes read.

    latentr3 prepare amazon2018 --reviews CDs_and_Vinyl.json.gz --meta meta_CDs_and_Vinyl.json.gz --out DIR
    latentr3 prepare amazon2023 --reviews CDs_and_Vinyl.jsonl.gz --meta meta_CDs_and_Vinyl.jsonl.gz --out DIR
    latentr3 prepare interactions --file log.csv --user-col u --item-col i --time-col t \\
        --items items.csv --title-col title [--item-key-col id] --out DIR
    latentr3 prepare movielens [--out DIR]

Each writes train.csv, valid.csv, test.csv, info.txt and stats.json into --out.
"""
from __future__ import annotations

import json
import sys


def _summary(stats: dict, out) -> None:
    samples = stats["samples"]
    window = stats.get("window", {})
    print(
        f"{stats['users']} users, {stats['items']} items, {stats['interactions']} interactions; "
        f"samples train {samples['train']} / valid {samples['valid']} / test {samples['test']}"
    )
    if window.get("start") or window.get("end"):
        print(f"time window used: {window.get('start') or '-inf'} .. {window.get('end') or '+inf'}")
    titles = stats.get("titles")
    if titles:
        print(
            f"items sharing a title: {titles['before_dedupe']['items_with_duplicate_title']} before dedupe, "
            f"{stats['items_with_duplicate_title']} after ({titles['changed_by_dedupe']} titles changed)"
        )
    for name in ("items", "reviews"):
        report = stats.get("files", {}).get(name, {})
        if report.get("malformed_lines"):
            print(f"{report['path']}: {report['malformed_lines']} malformed line(s) skipped: "
                  f"{report['malformed_line_numbers'][:20]}")
    print(f"files in {out} (statistics: {out}/stats.json)")


def _run(fn, args) -> int:
    try:
        stats = fn()
    except (ValueError, ImportError) as exc:  # PrepareError, DataFormatError, bad arguments
        print(f"latentr3 prepare {args.source}: error: {exc}", file=sys.stderr)
        return 2
    _summary(stats, args.out)
    return 0


def _common(args) -> dict:
    return dict(
        min_count=args.min_count, min_items=args.min_items, widen_months=args.widen_months,
        max_history=args.max_history, seed=args.seed, drop_html=args.drop_html,
        dedupe_titles=args.dedupe_titles, max_bad_lines=args.max_bad_lines, progress=args.progress,
        start=args.start, end=args.end,
    )


def cmd_prepare_amazon(args) -> int:
    from .amazon import prepare_amazon2018, prepare_amazon2023

    fn = prepare_amazon2018 if args.source == "amazon2018" else prepare_amazon2023
    return _run(lambda: fn(args.reviews, args.meta, args.out, **_common(args)), args)


def cmd_prepare_interactions(args) -> int:
    from .interactions import prepare_interactions

    return _run(
        lambda: prepare_interactions(
            args.file, args.items, args.out, user_col=args.user_col, item_col=args.item_col,
            time_col=args.time_col, title_col=args.title_col, item_key_col=args.item_key_col,
            rating_col=args.rating_col, brand_col=args.brand_col, time_unit=args.time_unit, **_common(args),
        ),
        args,
    )


def cmd_prepare_movielens(args) -> int:
    from .movielens import ensure_movielens, prepare_movielens

    if args.max_history != 10 or args.min_count != 5:
        if args.out is None:
            print("latentr3 prepare movielens: error: --out is needed with non-default settings", file=sys.stderr)
            return 2
        prepare_movielens(args.out, max_history=args.max_history, min_count=args.min_count)
        out = args.out
    else:
        out = ensure_movielens(args.out)
    print(f"MovieLens-100K splits in {out}")
    print(json.dumps(json.loads((__import__("pathlib").Path(out) / "stats.json").read_text()), indent=2))
    return 0


def _shared_options(sp, *, window: tuple[str | None, str | None], min_items: int) -> None:
    start, end = window
    sp.add_argument("--out", required=True, help="output directory")
    g = sp.add_argument_group("processing")
    g.add_argument("--start", default=start,
                   help=f"window start, ISO date, UTC, inclusive; none: unbounded (default: {start or 'none'})")
    g.add_argument("--end", default=end, help=f"window end, ISO date, UTC, exclusive (default: {end or 'none'})")
    g.add_argument("--min-items", type=int, default=min_items,
                   help=f"while fewer items survive, move --start --widen-months earlier (default: {min_items})")
    g.add_argument("--widen-months", type=int, default=3, help="months the start moves per widening (default: 3)")
    g.add_argument("--min-count", type=int, default=5, help="k of the iterative user/item k-core (default: 5)")
    g.add_argument("--max-history", type=int, default=10, help="history length cap (default: 10)")
    g.add_argument("--seed", type=int, default=42, help="seed of the item id shuffle (default: 42)")
    g.add_argument("--no-drop-html", dest="drop_html", action="store_false",
                   help="reproduce the release: drop only titles containing '<span id'")
    g.add_argument("--no-dedupe-titles", dest="dedupe_titles", action="store_false",
                   help="reproduce the release: leave titles shared by several items as they are")
    g.add_argument("--max-bad-lines", type=int, default=100,
                   help="malformed lines skipped per file before it is an error (default: 100)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_prepare_parser(sub) -> None:
    """Adds `prepare` and its sources to the CLI's sub-command parser."""
    from .amazon import DEFAULT_END, DEFAULT_START

    p = sub.add_parser("prepare", help="turn a raw dataset into split files",
                       description="turn a raw dataset into split files (train/valid/test.csv, info.txt, stats.json)")
    sources = p.add_subparsers(dest="source", required=True, metavar="source")

    for name, what in (("amazon2018", "Amazon Review Data 2018: <Category>.json[.gz] + meta_<Category>.json[.gz]"),
                       ("amazon2023", "Amazon Reviews 2023: <Category>.jsonl[.gz] + meta_<Category>.jsonl[.gz]")):
        sp = sources.add_parser(name, help=what, description=what)
        sp.add_argument("--reviews", required=True, help="review file (JSON lines, gzip or plain)")
        sp.add_argument("--meta", required=True, help="metadata file (JSON lines, gzip or plain)")
        _shared_options(sp, window=(DEFAULT_START, DEFAULT_END), min_items=5000)
        sp.set_defaults(fn=cmd_prepare_amazon)

    what = "any interaction log (CSV/TSV[.gz] or Parquet) with an item table"
    sp = sources.add_parser("interactions", help=what, description=what)
    sp.add_argument("--file", required=True, help="interaction log")
    sp.add_argument("--user-col", required=True)
    sp.add_argument("--item-col", required=True)
    sp.add_argument("--time-col", required=True, help="numbers (see --time-unit) or ISO date-times (UTC if naive)")
    sp.add_argument("--rating-col", default=None, help="rating column (default: none; ratings written as None)")
    sp.add_argument("--time-unit", choices=("s", "ms"), default="s", help="unit of numeric times (default: s)")
    sp.add_argument("--items", required=True, help="item table")
    sp.add_argument("--title-col", required=True)
    sp.add_argument("--item-key-col", default=None, help="the item table's key column (default: --item-col)")
    sp.add_argument("--brand-col", default=None, help="brand column used to make duplicate titles distinct")
    _shared_options(sp, window=(None, None), min_items=0)
    sp.set_defaults(fn=cmd_prepare_interactions)

    sp = sources.add_parser("movielens", help="the embedded MovieLens-100K (shipped by recbole)")
    sp.add_argument("--out", default=None, help="output directory (default: the latentr3 cache)")
    sp.add_argument("--max-history", type=int, default=10, help="history length cap (default: 10)")
    sp.add_argument("--min-count", type=int, default=5, help="k of the k-core (default: 5)")
    sp.set_defaults(fn=cmd_prepare_movielens)
