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


def cmd_run(args) -> int:
    from .pipeline import run_pipeline

    run_pipeline(_config(args))
    return 0


def cmd_grpo(args) -> int:
    from .training.grpo import train_grpo

    best = train_grpo(_config(args))
    print(f"best checkpoint: {best}")
    return 0


def cmd_sweep(args) -> int:
    from .training.sweep import parse_grid, run_sweep

    run_sweep(_config(args), parse_grid(args.grid), args.stage)
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


def cmd_baseline(args) -> int:
    if args.baseline == "sasrec":
        from .baselines.sasrec import train_sasrec

        out = train_sasrec(_config(args))
        print(f"checkpoint: {out}")
        return 0
    raise ValueError(f"unknown baseline {args.baseline!r}")


def cmd_recommend(args) -> int:
    from .recommend import Recommender, UnknownItemError

    rec = Recommender.from_pretrained(args.model, catalogue=args.catalogue, num_beams=args.num_beams)
    history = [int(h) if args.ids else h for h in args.history]
    try:
        (recs,) = rec.recommend([history], k=args.k, allow_free_text=args.allow_free_text,
                                exclude_history=args.exclude_history)
        explanation = rec.explain(rec.history_titles(history, args.allow_free_text)) if args.explain else None
    except UnknownItemError as e:
        print(f"latentr3 recommend: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = [r.__dict__ for r in recs]
        if explanation is not None:
            out = {"items": out, "explanation": [{"title": t, "attention": a} for t, a in explanation]}
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        for rank, r in enumerate(recs, 1):
            print(f"{rank:>3}. {r.title}  (score {r.score:.4f}, item ids {r.item_ids})")
        if explanation is not None:
            print("latent thought's attention per history title (the rest is on the template):")
            for t, a in explanation:
                print(f"  {a:6.1%}  {t}")
    return 0


def cmd_serve(args) -> int:
    from .serving import ServeSettings, serve

    return serve(ServeSettings(
        model=args.model, host=args.host, port=args.port, max_batch_users=args.max_batch_users,
        admit_at=args.admit_at, max_queue=args.max_queue, timeout_s=args.timeout_s, max_body_bytes=args.max_body_bytes,
        num_beams=args.num_beams, catalogue=args.catalogue, device=args.device, dtype=args.dtype,
        threads=args.threads, workers=args.workers, log_level=args.log_level))


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

    with_config("run", "the whole pipeline: data -> SFT -> GRPO -> test evaluation -> results table", cmd_run)
    with_config("sft", "stage 1: supervised fine-tuning of backbone + LatentRATT", cmd_sft)
    with_config("grpo", "stage 2: latent GRPO on an SFT checkpoint (grpo.init=<dir>)", cmd_grpo)
    sp = with_config("sweep", "train a grid of configs and pick by validation (never test)", cmd_sweep)
    sp.add_argument("--grid", action="append", required=True, metavar="key=v1,v2",
                    help="values to try, e.g. --grid grpo.lr=1e-5,1e-4,5e-4 (repeatable)")
    sp.add_argument("--stage", choices=["grpo", "sft"], default="grpo", help="stage to sweep (default grpo)")
    sp = with_config("eval", "recommend for a split with constrained beam search and report HR@K / NDCG@K",
                     cmd_eval)
    sp.add_argument("--model", help="checkpoint directory (same as eval.model=...)")
    sp.add_argument("--split", help="split to evaluate: train/valid/test or a file stem (eval.split)")
    bp = sub.add_parser("baseline", help="train a non-LLM baseline on the same splits",
                        description="train a non-LLM baseline on the same splits")
    bsub = bp.add_subparsers(dest="baseline", required=True, metavar="baseline")
    help_ = ("SASRec (self-attentive next-item model over item ids), early stopping on validation "
             "NDCG@10, saved to sasrec.output_dir; score it with `latentr3 eval --model <dir>`")
    sp = bsub.add_parser("sasrec", help=help_, description=help_)
    sp.add_argument("--config", help="YAML config (every field has a default)")
    sp.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides, e.g. sasrec.hidden=64 data.dir=../data")
    sp.set_defaults(fn=cmd_baseline)
    sp = sub.add_parser("recommend", help="recommend catalogue titles for one history",
                        description="recommend catalogue titles for one history")
    sp.add_argument("--model", required=True, help="checkpoint directory")
    sp.add_argument("--history", nargs="+", required=True, help="history titles, oldest first")
    sp.add_argument("-k", type=int, default=10, help="number of titles (default 10)")
    sp.add_argument("--ids", action="store_true", help="--history gives item ids instead of titles")
    sp.add_argument("--allow-free-text", action="store_true", help="accept titles not in the catalogue")
    sp.add_argument("--exclude-history", action="store_true", help="never recommend a title of the history")
    sp.add_argument("--explain", action="store_true",
                    help="also print the share of LatentRATT's attention on each history title")
    sp.add_argument("--catalogue", help="catalogue file (default: the checkpoint's copy)")
    sp.add_argument("--num-beams", type=int, default=10)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(fn=cmd_recommend)
    help_ = "serve recommendations over HTTP (FastAPI + uvicorn; POST /v1/recommend, /healthz, /metrics)"
    sp = sub.add_parser("serve", help=help_, description=help_ + ". SIGTERM drains: accepted requests are "
                        "answered, new ones get 503, then it exits 0.")
    sp.add_argument("--model", required=True, help="checkpoint directory")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--max-batch-users", type=int, default=16, help="users decoded at once (default 16)")
    sp.add_argument("--admit-at", type=int, default=0,
                    help="free batch places that trigger an admission, one prefill for all waiting users that fit; "
                         "an empty batch admits at once (default 0 = max(1, max-batch-users // 4))")
    sp.add_argument("--max-queue", type=int, default=256,
                    help="users waiting for a place in the batch before new requests get 429 (default 256)")
    sp.add_argument("--timeout-s", type=float, default=30.0, help="a request unanswered after this gets 504")
    sp.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    sp.add_argument("--num-beams", type=int, default=10, help="beams per user, also the largest k (default 10)")
    sp.add_argument("--catalogue", help="catalogue file (default: the checkpoint's copy)")
    sp.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    sp.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (default: torch's choice)")
    sp.add_argument("--workers", type=int, default=1,
                    help="worker processes sharing the port, each with its own model copy and engine (default 1; "
                         "on a CPU under load, one per core with --threads 1 is fastest)")
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sp.set_defaults(fn=cmd_serve)
    with_config("config", "print the resolved config (defaults + file + overrides)", cmd_config)
    from .data.prepare import add_prepare_parser

    add_prepare_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError) as e:
        from .atomic import CheckpointError, OutputWriteError
        from .config import ConfigError
        from .data.splits import DataFormatError

        if isinstance(e, (ConfigError, DataFormatError, FileNotFoundError, CheckpointError, OutputWriteError)):
            print(f"latentr3 {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
