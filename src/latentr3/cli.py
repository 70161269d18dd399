"""The latentr3 command line: `latentr3 <command> --config <yaml> [key=value ...]`."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _config(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_sft(args) -> int:
    from .training.sft import train_sft

    best = train_sft(_config(args))
    print(f"best checkpoint: {best}")
    return 0


def cmd_eval(args) -> int:
    from .evaluation.evaluate import run_eval

    cfg = _config(args)
    if args.model:
        cfg.eval.model = args.model
    if args.split:
        cfg.eval.split = args.split
    run_eval(cfg)
    return 0


def cmd_prepare(args) -> int:
    if args.source == "movielens":
        from .data.movielens import ensure_movielens

        out = ensure_movielens(args.out)
        print(f"MovieLens-100K splits in {out}")
        print((out / "stats.json").read_text())
    return 0


def cmd_config(args) -> int:
    import yaml

    from .config import config_to_dict

    print(yaml.safe_dump(config_to_dict(_config(args)), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentr3", description="LLM-based sequential recommendation with "
                                "reinforced latent reasoning (LatentR3).")
    p.add_argument("--version", action="version", version=f"latentr3 {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")

    def with_config(name, help_, fn):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help="YAML config (every field has a default)")
        sp.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. sft.lr=1e-4 data.dir=../data")
        sp.set_defaults(fn=fn)
        return sp

    with_config("sft", "stage 1: supervised fine-tuning of backbone + LatentRATT", cmd_sft)
    sp = with_config("eval", "recommend for a split with constrained beam search and report HR@K / NDCG@K",
                     cmd_eval)
    sp.add_argument("--model", help="checkpoint directory (same as eval.model=...)")
    sp.add_argument("--split", help="split to evaluate: train/valid/test or a file stem (eval.split)")
    with_config("config", "print the resolved config (defaults + file + overrides)", cmd_config)
    sp = sub.add_parser("prepare", help="turn a raw dataset into split files",
                        description="turn a raw dataset into split files")
    sp.add_argument("source", choices=["movielens"], help="movielens: the embedded MovieLens-100K")
    sp.add_argument("--out", default=None, help="output directory (default: the latentr3 cache)")
    sp.set_defaults(fn=cmd_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        from .config import ConfigError
        from .data.splits import DataFormatError

        if isinstance(e, (ConfigError, DataFormatError, FileNotFoundError)):
            print(f"latentr3 {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
