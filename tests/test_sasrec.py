"""SASRec baseline: learns a simple sequential pattern, saves/loads, scores as distinct titles."""
from __future__ import annotations

import json
import random

import torch

from latentr3.baselines.sasrec import (SASRec, SASRecRecommender, is_sasrec_checkpoint, recommend_titles,
                                       title_scores, train_sasrec)
from latentr3.config import load_config
from latentr3.data.splits import Catalogue, write_catalogue, write_split

N_ITEMS = 24
# items 2k and 2k+1 share a title for k < 3 (shared titles, as in the CDs release)
TITLES = [f"Album {i // 2}" if i < 6 else f"Album {i}" for i in range(N_ITEMS)]


def _rows(n: int, seed: int) -> list[dict]:
    """Histories walking the catalogue upwards: the next item is (last + 1) mod N."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(N_ITEMS), rng.randint(1, 6)
        hist = [(start + j) % N_ITEMS for j in range(length)]
        tgt = (hist[-1] + 1) % N_ITEMS
        rows.append({"history_item_title": [TITLES[h] for h in hist], "item_title": TITLES[tgt],
                     "history_item_id": hist, "item_id": tgt})
    return rows


def _data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_catalogue(d / "info.txt", range(N_ITEMS), TITLES)
    write_split(d / "train.csv", _rows(600, 0))
    write_split(d / "valid.csv", _rows(80, 1))
    write_split(d / "test.csv", _rows(80, 2))
    return d


def _cfg(tmp_path, *extra):
    d = _data(tmp_path)
    return load_config(None, [f"data.dir={d}", f"sasrec.output_dir={tmp_path / 'sasrec'}", "sasrec.hidden=32",
                              "sasrec.max_len=8", "sasrec.epochs=30", "sasrec.patience=5", "sasrec.dropout=0.1",
                              "sasrec.lr=5e-3", "sasrec.batch_size=64", "sasrec.device=cpu",
                              f"eval.output_dir={tmp_path / 'eval'}", *extra])


def test_causal_and_padding_invariant():
    torch.manual_seed(0)
    m = SASRec(10, hidden=16, layers=2, heads=2, max_len=6, dropout=0.0).eval()
    with torch.no_grad():
        short = m.last_logits(torch.tensor([[3, 4]]))
        padded = m.last_logits(torch.tensor([[0, 0, 0, 3, 4], [1, 2, 5, 6, 7]]))[:1]
        assert torch.allclose(short, padded, atol=1e-5)
        h1 = m.encode(torch.tensor([[1, 2, 3, 4]]))
        h2 = m.encode(torch.tensor([[1, 2, 3, 9]]))
        assert torch.allclose(h1[:, :3], h2[:, :3], atol=1e-6)     # the future never leaks back
        assert torch.isfinite(m.encode(torch.zeros(2, 4, dtype=torch.long))).all()


def test_title_scores_max_and_sum():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.4, 0.1, 0.3, 0.2]])
    item_title = torch.tensor([0, 0, 1, 2])
    assert torch.equal(title_scores(scores, item_title, 4, "max")[:, :3], torch.tensor([[0.5, 0.2, 0.2],
                                                                                         [0.4, 0.3, 0.2]]))
    s = title_scores(scores, item_title, 4, "sum")
    assert torch.allclose(s[:, :3], torch.tensor([[0.6, 0.2, 0.2], [0.5, 0.3, 0.2]]))
    assert torch.isinf(s[:, 3]).all()


def test_train_save_load_and_eval(tmp_path):
    from latentr3.evaluation.evaluate import run_eval

    cfg = _cfg(tmp_path)
    out = train_sasrec(cfg)
    assert is_sasrec_checkpoint(out) and (out / "catalogue.txt").exists() and (out / "done.json").exists()
    meta = json.loads((out / "sasrec.json").read_text())
    assert meta["best_valid_ndcg10"] > 0.5, meta["history"][-1]      # the pattern is learnable
    rec = SASRecRecommender.from_pretrained(out)
    p = rec.item_probs([[3, 4, 5], [20]])
    assert p.shape == (2, N_ITEMS) and torch.allclose(p.sum(1), torch.ones(2), atol=1e-5)
    assert int(p[0].argmax()) == 6
    # a second call is skipped (done.json)
    assert train_sasrec(cfg) == out

    cfg.eval.model = str(out)
    summary = run_eval(cfg)
    assert summary["recommender"] == "sasrec" and summary["rows"] == 80
    assert summary["metrics"]["legacy/HR@10"] > 0.5
    records = [json.loads(line) for line in (tmp_path / "eval" / "recommendations.jsonl").open()]
    for r in records:
        assert len(r["predicted"]) == len(set(r["predicted"])) == 10
        assert r["scores"] == sorted(r["scores"], reverse=True)


def test_recommend_titles_dedups_shared_titles():
    torch.manual_seed(0)
    rec = SASRecRecommender(SASRec(N_ITEMS, hidden=16, layers=1, heads=1, max_len=4, dropout=0.0),
                            list(range(N_ITEMS)))
    cat = Catalogue(path="mem", ids=list(range(N_ITEMS)), titles=TITLES)
    hists = [[1, 2], [7]]
    logits = rec.item_logits(hists)
    for mode in ("max", "sum"):
        for (titles, scores), lg in zip(recommend_titles(rec, hists, cat, 5, mode), logits):
            # brute force: per distinct title, max logit or summed probability of its items
            p = torch.softmax(lg, -1)
            by_title = {}
            for i, t in enumerate(TITLES):
                v = float(lg[i]) if mode == "max" else float(p[i])
                by_title[t] = max(by_title.get(t, -1e9), v) if mode == "max" else by_title.get(t, 0.0) + v
            best = sorted(by_title, key=lambda t: -by_title[t])[:5]
            assert titles == best
            assert torch.allclose(torch.tensor(scores), torch.tensor([by_title[t] for t in best]), atol=1e-5)


def test_cli_baseline_sasrec(tmp_path):
    from latentr3.cli import main

    d = _data(tmp_path)
    rc = main(["baseline", "sasrec", f"data.dir={d}", f"sasrec.output_dir={tmp_path / 's'}", "sasrec.epochs=1",
               "sasrec.hidden=8", "sasrec.device=cpu"])
    assert rc == 0 and is_sasrec_checkpoint(tmp_path / "s")


def test_cpu_dropout_mask_is_bernoulli_and_scaled():
    """The bit-drawn CPU dropout keeps each value with probability 1 - p and scales it by 1 / (1 - p)."""
    from latentr3.baselines.sasrec import _Dropout

    n = 400_000
    for p in (0.2, 0.5, 0.9):
        drop = _Dropout(p).train()
        torch.manual_seed(0)
        y = drop(torch.ones(n))
        kept = y != 0
        share = float(kept.float().mean())
        assert abs(share - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, (p, share)   # within 4 standard errors
        assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
        # neighbouring elements are independent (the lanes of one random word)
        both = float((kept[:-1] & kept[1:]).float().mean())
        assert abs(both - (1 - p) ** 2) < 0.01, (p, both)
        torch.manual_seed(0)
        assert torch.equal(drop(torch.ones(n)), y)                                # seeded: reproducible
        x = torch.randn(3, 5)
        assert torch.equal(drop.eval()(x), x)                                    # eval: identity
    assert torch.equal(_Dropout(0.0).train()(x), x)
    # the gradient flows through the kept values only, scaled like the values
    x = torch.ones(1000, requires_grad=True)
    y = _Dropout(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
