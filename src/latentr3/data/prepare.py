"""`latentr3 prepare <source>`: raw interaction data -> the split files the recipes read."""
from __future__ import annotations


def cmd_prepare_movielens(args) -> int:
    from .movielens import ensure_movielens

    out = ensure_movielens(args.out)
    print(f"MovieLens-100K splits in {out}")
    print((out / "stats.json").read_text())
    return 0


def add_prepare_parser(sub) -> None:
    """Adds `prepare` and its sources to the CLI's sub-command parser."""
    p = sub.add_parser("prepare", help="turn a raw dataset into split files",
                       description="turn a raw dataset into split files")
    sources = p.add_subparsers(dest="source", required=True, metavar="source")
    sp = sources.add_parser("movielens", help="the embedded MovieLens-100K (shipped by recbole)")
    sp.add_argument("--out", default=None, help="output directory (default: the latentr3 cache)")
    sp.set_defaults(fn=cmd_prepare_movielens)
