"""SASRec (Kang & McAuley, 2018): a self-attentive next-item recommender over item ids.

Why a compact module and not RecBole's SASRec: RecBole 1.2.1 is in the venv only as ``--no-deps`` (for
the embedded MovieLens file).  Its real dependencies (``pip install --dry-run recbole==1.2.1``) pull
ray<=2.6.3, pandas, scipy, scikit-learn, tensorboard, plotly, thop, ... and a different torch build, and
its model only runs inside RecBole's own Dataset/Interaction/Trainer machinery, not on our split files.
The model itself is ~80 lines of PyTorch, so it is written here.

Model: item embeddings (id 0 = padding, shared with the output layer) + learned position embeddings
counted from the END of the sequence (position 0 = most recent item, so left padding does not shift
them), ``layers`` pre-LayerNorm causal self-attention blocks, a final LayerNorm.  The score of catalogue
item i after a history is <h_last, E[i]>; training is full-softmax cross-entropy over the whole catalogue
(5.8k items on CDs: cheap), at every position of each row's sequence ``history + [target]``
(``loss_positions: all``, the SASRec objective) or at the last one only (``last``).

Training: ``latentr3 baseline sasrec --config <yaml> [key=value ...]``.  Rows come from
``latentr3.data.dataset.train_and_valid`` (so ``data.valid_holdout`` is respected); early stopping on
validation NDCG@10 of the exact target item under full-catalogue ranking; the best epoch is saved to
``sasrec.output_dir``: ``sasrec.safetensors`` (weights), ``sasrec.json`` (hyper-parameters, item ids in
output order, validation history) and ``catalogue.txt`` (the catalogue copy); ``done.json`` marks a
finished run (a second call returns at once).

Scoring as a title recommender (``latentr3 eval --model <dir>``): the metrics compare DISTINCT titles,
so item scores are turned into title scores, by default the MAX over a title's items
(``sasrec.title_score: max``): the title list is then exactly SASRec's ranked item list with repeated
titles dropped, and a title shared by 54 items ("Greatest Hits") gets no bonus for being shared.
``sum`` instead ranks titles by the probability that the next item carries the title (what an LLM that
generates titles models, and what the D3 assistant uses).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, SASRecConfig
from ..data.splits import Catalogue, Sample

WEIGHTS_NAME = "sasrec.safetensors"
CONFIG_NAME = "sasrec.json"
_ARCH_KEYS = ("hidden", "layers", "heads", "max_len", "dropout")


def is_sasrec_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


# ----------------------------------------------------------------------------------------------- model
class _Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from 16 random bits per element (p rounded to a multiple of 2**-16).

    Written by hand because torch's CPU dropout draws one Bernoulli sample at a time: in a profile of the
    demo's SASRec step (batch 128, 11 positions, hidden 64) its `bernoulli_` was 34 % of the step, and
    this mask costs about a fifth of it (one `randint` of 64-bit words, viewed as 16-bit lanes).  The mask
    is the same distribution up to that rounding (keep with probability 1 - p, kept values scaled by
    1 / (1 - p)); on other devices F.dropout (fused there) is used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.p >= 1:
            return super().forward(x)
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep * (1.0 / (1.0 - self.p))


class _Block(nn.Module):
    """Pre-LN causal self-attention + feed-forward (the SASRec block, with GELU)."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"sasrec.hidden {hidden} is not a multiple of sasrec.heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), _Dropout(dropout),
                                nn.Linear(hidden, hidden))
        self.drop = _Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, H)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    """Sequences are (B, L) LongTensors of item indices + 1, LEFT-padded with 0."""

    def __init__(self, num_items: int, hidden: int = 64, layers: int = 2, heads: int = 1, max_len: int = 50,
                 dropout: float = 0.2):
        super().__init__()
        self.num_items, self.hidden, self.max_len = num_items, hidden, max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.drop = _Dropout(dropout)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) hidden state after each position."""
        B, L = seq.shape
        real = seq > 0
        pos = torch.arange(L - 1, -1, -1, device=seq.device)             # 0 = the most recent item
        x = self.item_emb(seq) * math.sqrt(self.hidden) + self.pos_emb(pos)
        x = self.drop(x) * real[..., None]
        i = torch.arange(L, device=seq.device)
        # query i sees real keys j <= i, and itself (so a padding row is never fully masked: no NaN)
        mask = (i[None, :] <= i[:, None]) & (real[:, None, :] | (i[None, :] == i[:, None]))
        mask = mask[:, None]                                              # (B, 1, L, L)
        for blk in self.blocks:
            x = blk(x, mask) * real[..., None]
        return self.norm(x)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., num_items) scores of every catalogue item (output index = item index)."""
        return h @ self.item_emb.weight[1:].T

    def last_logits(self, seq: torch.Tensor) -> torch.Tensor:
        return self.item_logits(self.encode(seq)[:, -1])


class SASRecRecommender:
    """A trained SASRec with its item-id mapping: `item_probs(histories)` for any batch of id lists."""

    def __init__(self, model: SASRec, item_ids: list[int], meta: dict | None = None):
        self.model = model.eval()
        self.item_ids = [int(i) for i in item_ids]
        self.index = {i: n for n, i in enumerate(self.item_ids)}
        self.meta = meta or {}

    @property
    def device(self) -> torch.device:
        return self.model.item_emb.weight.device

    def to(self, device) -> "SASRecRecommender":
        self.model.to(device)
        return self

    def encode_histories(self, histories: list[list[int]]) -> torch.Tensor:
        """Left-padded (B, L) index+1 tensor of the last max_len known items of each history."""
        return _pad_left([[self.index[h] + 1 for h in hist if h in self.index] for hist in histories],
                         self.model.max_len, self.device)

    @torch.no_grad()
    def item_logits(self, histories: list[list[int]]) -> torch.Tensor:
        return self.model.last_logits(self.encode_histories(histories)).float()

    @torch.no_grad()
    def item_probs(self, histories: list[list[int]]) -> torch.Tensor:
        """(B, num_items) next-item probabilities, items in `item_ids` order."""
        return torch.softmax(self.item_logits(histories), dim=-1)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "SASRecRecommender":
        from safetensors.torch import load_file

        from ..atomic import verify_manifest

        path = Path(path)
        verify_manifest(path, "SASRec checkpoint")  # names a missing, truncated or corrupt file
        meta = json.loads((path / CONFIG_NAME).read_text())
        model = SASRec(len(meta["item_ids"]), **{k: meta["model"][k] for k in _ARCH_KEYS})
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return cls(model.to(device), meta["item_ids"], meta)

    def save_pretrained(self, path: str | Path, catalogue: Catalogue, extra: dict | None = None) -> None:
        from safetensors.torch import save

        from ..data.dataset import save_catalogue_copy

        from ..atomic import atomic_write_bytes, atomic_write_json, fault_injection_pause, write_manifest

        # The run directory is the checkpoint (done.json sits beside it), so its files are written one by
        # one atomically and the manifest, written last, marks the checkpoint complete.
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / WEIGHTS_NAME, save({k: v.detach().cpu().contiguous()
                                                      for k, v in self.model.state_dict().items()}))
        atomic_write_json(path / CONFIG_NAME, {**self.meta, **(extra or {}), "item_ids": self.item_ids})
        save_catalogue_copy(path, catalogue)
        fault_injection_pause()
        write_manifest(path)


def _pad_left(seqs: list[list[int]], max_len: int, device=None) -> torch.Tensor:
    seqs = [s[-max_len:] for s in seqs]
    L = max(1, max((len(s) for s in seqs), default=1))
    out = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            out[r, L - len(s):] = torch.tensor(s, dtype=torch.long)
    return out.to(device) if device is not None else out


# -------------------------------------------------------------------------------------------- training
def _sequences(rows: list[Sample], index: dict[int, int], max_len: int) -> list[list[int]]:
    """history + [target] as item index + 1, cut to the last max_len + 1 items (unknown ids dropped)."""
    out = []
    for s in rows:
        if s.target_id not in index:
            continue
        seq = [index[h] + 1 for h in s.history_ids if h in index] + [index[s.target_id] + 1]
        out.append(seq[-(max_len + 1):])
    return out


def full_ranking_metrics(rec: SASRecRecommender, rows: list[Sample], k: int = 10,
                         batch_size: int = 512) -> dict[str, float]:
    """HR@k / NDCG@k of the exact target item among all catalogue items (ties count against)."""
    hits = ndcg = 0.0
    n = 0
    for start in range(0, len(rows), batch_size):
        chunk = [s for s in rows[start: start + batch_size] if s.target_id in rec.index]
        if not chunk:
            continue
        logits = rec.item_logits([s.history_ids for s in chunk])
        tgt = torch.tensor([rec.index[s.target_id] for s in chunk], device=logits.device)
        tscore = logits.gather(1, tgt[:, None])
        rank = (logits >= tscore).sum(1)                                  # 1-based, pessimistic on ties
        top = rank <= k
        hits += float(top.sum())
        ndcg += float((top / torch.log2(rank.float() + 1)).sum())
        n += len(chunk)
    return {f"HR@{k}": hits / max(n, 1), f"NDCG@{k}": ndcg / max(n, 1), "rows": n}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_sasrec(cfg: Config) -> Path:
    """Trains SASRec on the configured splits with early stopping; returns sasrec.output_dir."""
    from ..atomic import atomic_write_json
    from ..data.dataset import load_catalogue, subsample, train_and_valid

    s: SASRecConfig = cfg.sasrec
    out = Path(s.output_dir)
    if (out / "done.json").exists() and is_sasrec_checkpoint(out):
        print(f"sasrec: {out} is complete, skipped")
        return out
    if s.loss_positions not in ("all", "last"):
        raise ValueError(f"sasrec.loss_positions must be all or last, got {s.loss_positions!r}")
    device = resolve_device(s.device)
    torch.manual_seed(s.seed)
    catalogue = load_catalogue(cfg.data)
    train_rows, valid_rows = train_and_valid(cfg.data, catalogue)
    valid_rows = subsample(valid_rows, s.valid_sample, s.seed)
    index = {int(i): n for n, i in enumerate(catalogue.ids)}
    seqs = _sequences(train_rows, index, s.max_len)
    if not seqs:
        raise ValueError("sasrec: no training rows with a catalogue target")
    # Pad once: (N, L + 1) left-padded; inputs = [:, :-1], labels = [:, 1:] (0 = no label).
    data = _pad_left(seqs, s.max_len + 1)
    inputs, labels = data[:, :-1], data[:, 1:] - 1                       # labels: item index, -1 = pad
    if s.loss_positions == "last":
        labels = torch.cat([torch.full_like(labels[:, :-1], -1), labels[:, -1:]], 1)
    model = SASRec(len(catalogue.ids), s.hidden, s.layers, s.heads, s.max_len, s.dropout).to(device)
    rec = SASRecRecommender(model, catalogue.ids, {"model": {k: getattr(s, k) for k in _ARCH_KEYS},
                                                   "config": asdict(s)})
    # fused: one kernel for every parameter (on the demo's CPU step 0.6 ms instead of 2.5 ms of ~30 ms)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                           fused=device.type in ("cpu", "cuda"))
    gen = torch.Generator().manual_seed(s.seed)
    best, best_state, bad, history = -1.0, None, 0, []
    t0 = time.time()
    for epoch in range(1, s.epochs + 1):
        model.train()
        perm = torch.randperm(len(inputs), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(perm), s.batch_size):
            idx = perm[start: start + s.batch_size]
            x, y = inputs[idx].to(device), labels[idx].to(device)
            keep = (x > 0).any(0) | (y >= 0).any(0)                       # drop all-padding columns
            first = int(keep.nonzero()[0]) if keep.any() else 0
            x, y = x[:, first:], y[:, first:]
            h = model.encode(x)
            sel = y >= 0
            loss = F.cross_entropy(model.item_logits(h[sel]), y[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(sel.sum())
            count += int(sel.sum())
        model.eval()
        m = full_ranking_metrics(rec, valid_rows)
        history.append({"epoch": epoch, "loss": total / max(count, 1), "valid": m,
                        "seconds": time.time() - t0})
        improved = m["NDCG@10"] > best
        print(f"sasrec epoch {epoch}: loss {total / max(count, 1):.4f} valid HR@10 {m['HR@10']:.4f} "
              f"NDCG@10 {m['NDCG@10']:.4f}{' *' if improved else ''}", flush=True)
        if improved:
            best, bad = m["NDCG@10"], 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if s.patience and bad >= s.patience:
                break
    seconds = time.time() - t0
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda r: r["valid"]["NDCG@10"])["epoch"]
    rec.save_pretrained(out, catalogue, {"best_epoch": best_epoch, "best_valid_ndcg10": best,
                                         "history": history, "train_rows": len(seqs),
                                         "valid_rows": len(valid_rows)})
    atomic_write_json(out / "done.json", {"train_seconds": seconds, "best_epoch": best_epoch,
                                          "best_valid_ndcg10": best})
    print(f"sasrec: best epoch {best_epoch} (valid NDCG@10 {best:.4f}), {seconds:.0f}s -> {out}")
    return out


# ------------------------------------------------------------------------------------------ evaluation
def title_scores(item_scores: torch.Tensor, item_title: torch.Tensor, num_titles: int,
                 mode: str = "max") -> torch.Tensor:
    """(B, num_titles) title scores from (B, num_items) item scores; item_title[i] = title index.

    mode "max": the best item's score (scores may be logits); "sum": the summed scores (pass
    probabilities).  Titles without items score -inf.
    """
    B = item_scores.shape[0]
    idx = item_title[None].expand(B, -1)
    if mode == "max":
        out = item_scores.new_full((B, num_titles), float("-inf"))
        return out.scatter_reduce(1, idx, item_scores, "amax")
    if mode == "sum":
        out = item_scores.new_zeros(B, num_titles).scatter_add(1, idx, item_scores)
        has = torch.zeros(num_titles, dtype=torch.bool, device=out.device)
        has[item_title] = True
        return out.masked_fill(~has, float("-inf"))
    raise ValueError(f"sasrec.title_score must be max or sum, got {mode!r}")


def recommend_titles(rec: SASRecRecommender, histories: list[list[int]], catalogue: Catalogue, top_k: int,
                     mode: str = "max", batch_size: int = 256) -> list[tuple[list[str], list[float]]]:
    """Top-k DISTINCT catalogue titles per history by full-catalogue ranking (see the module doc)."""
    titles = list(dict.fromkeys(catalogue.titles))
    tindex = {t: i for i, t in enumerate(titles)}
    # SASRec's output order -> title index; items it does not know are left out
    known = [(rec.index[i], tindex[t]) for i, t in zip(catalogue.ids, catalogue.titles) if i in rec.index]
    cols = torch.tensor([c for c, _ in known], dtype=torch.long, device=rec.device)
    item_title = torch.tensor([t for _, t in known], dtype=torch.long, device=rec.device)
    out = []
    k = min(top_k, len(titles))
    for start in range(0, len(histories), batch_size):
        logits = rec.item_logits(histories[start: start + batch_size])
        scores = (torch.softmax(logits, -1) if mode == "sum" else logits)[:, cols]
        ts = title_scores(scores, item_title, len(titles), mode)
        val, idx = ts.topk(k, dim=1)
        for v, i in zip(val.tolist(), idx.tolist()):
            pairs = [(titles[j], x) for j, x in zip(i, v) if x > float("-inf")]
            out.append(([p[0] for p in pairs], [p[1] for p in pairs]))
    return out
