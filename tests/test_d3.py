"""D3 decoding: the text-free assistant in the beam search, checked against brute force; presets."""
from __future__ import annotations

import pytest
import torch
from test_decoding import CATALOGUE_TITLES, brute_force, make

from latentr3.baselines.sasrec import SASRec, SASRecRecommender
from latentr3.config import EvalConfig
from latentr3.decoding.assistant import AssistantScores, TrieAssistant, load_assistant, resolve_decoding
from latentr3.decoding.beam_search import constrained_beam_search
from latentr3.evaluation.evaluate import build_trie, output_vocab_size
from latentr3.data.dataset import left_pad

HISTORIES = [[8, 10], [12], [19, 20, 21, 17]]        # item ids (= positions in CATALOGUE_TITLES)


def _sasrec(seed: int = 0) -> SASRecRecommender:
    torch.manual_seed(seed)
    m = SASRec(len(CATALOGUE_TITLES), hidden=16, layers=1, heads=1, max_len=8, dropout=0.0)
    with torch.no_grad():
        m.item_emb.weight.mul_(40.0)                      # a peaked, not uniform, next-item distribution
    return SASRecRecommender(m, list(range(len(CATALOGUE_TITLES))))


def _setup(num_latent=1, seed=0):
    model, tok, builder, cat = make(num_latent, seed)
    trie = build_trie(cat, builder, output_vocab_size(model))
    prompts = [builder.prompt_ids([CATALOGUE_TITLES[i] for i in h]) for h in HISTORIES]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    return model, tok, builder, trie, prompts, ids, mask


def _title_mass(rec: SASRecRecommender, distinct: list[str]) -> torch.Tensor:
    """Brute force: P(next item carries the title) for every distinct title, per history."""
    p = rec.item_probs(HISTORIES)
    out = torch.zeros(len(HISTORIES), len(distinct))
    for i, t in enumerate(CATALOGUE_TITLES):
        out[:, distinct.index(t)] += p[:, i]
    return out


def test_edge_scores_are_normalised_and_telescope():
    model, tok, builder, trie, *_ = _setup()
    a = TrieAssistant(_sasrec(), trie, weight=1.0).scores(HISTORIES)
    rows, _, kids = trie.edges(torch.arange(trie.num_nodes))
    for u in range(len(HISTORIES)):
        e = a.edge_scores(torch.full_like(rows, u), rows, kids).exp()
        per_node = torch.zeros(trie.num_nodes).index_add_(0, rows, e)
        inner = trie.row_ptr[1:] > trie.row_ptr[:-1]
        assert torch.allclose(per_node[inner], torch.ones(int(inner.sum())), atol=1e-5)
    distinct = trie.titles_unique
    assert torch.allclose(a.title_scores(trie).exp(), _title_mass(_sasrec(), distinct), atol=1e-5)


@pytest.mark.parametrize("num_latent", [0, 1])
def test_d3_beam_search_equals_brute_force(num_latent):
    model, tok, builder, trie, prompts, ids, mask = _setup(num_latent)
    rec = _sasrec()
    distinct = list(dict.fromkeys(CATALOGUE_TITLES))
    mass = _title_mass(rec, distinct).log()
    lengths = torch.tensor([len(builder.target_ids(t)) for t in distinct], dtype=torch.float)
    for w in (0.5, 2.0):
        assistant = TrieAssistant(rec, trie, weight=w)
        for lp in (0.0, 1.0):
            res = constrained_beam_search(model, trie, ids, mask, num_beams=len(distinct), top_k=10,
                                          length_penalty=lp, assistant=assistant.scores(HISTORIES))
            for u, prompt in enumerate(prompts):
                llm = brute_force(model, tok, builder, prompt, distinct, 0.0)     # plain sums
                total = (llm + w * mass[u]) / lengths ** lp
                order = total.argsort(descending=True)[:10]
                assert res.titles[u] == [distinct[i] for i in order], (w, lp, u)
                assert torch.allclose(torch.tensor(res.scores[u]), total[order], atol=1e-4)


def test_weight_zero_is_plain_beam_search_and_deterministic():
    model, tok, builder, trie, prompts, ids, mask = _setup(1, seed=3)
    plain = constrained_beam_search(model, trie, ids, mask, num_beams=4, top_k=4, length_penalty=0.0)
    zero = constrained_beam_search(model, trie, ids, mask, num_beams=4, top_k=4, length_penalty=0.0,
                                   assistant=TrieAssistant(_sasrec(), trie, 0.0).scores(HISTORIES))
    assert zero.titles == plain.titles and zero.scores == plain.scores
    scores = TrieAssistant(_sasrec(), trie, 1.0).scores(HISTORIES)
    a = constrained_beam_search(model, trie, ids, mask, num_beams=4, top_k=4, length_penalty=0.0, assistant=scores)
    b = constrained_beam_search(model, trie, ids, mask, num_beams=4, top_k=4, length_penalty=0.0, assistant=scores)
    assert a.titles == b.titles and a.scores == b.scores
    assert a.titles != plain.titles          # the assistant does change the ranking here


def test_presets():
    with pytest.raises(ValueError, match="assistant"):
        resolve_decoding(EvalConfig(decoding="d3"))
    with pytest.raises(ValueError, match="decoding"):
        resolve_decoding(EvalConfig(decoding="beam"))
    d3 = resolve_decoding(EvalConfig(decoding="d3", assistant="x", length_penalty=1.0))
    assert d3.length_penalty == 0.0 and d3.assistant == "x"
    bigrec = resolve_decoding(EvalConfig(decoding="bigrec", assistant="x", length_penalty=0.0))
    assert bigrec.length_penalty == 1.0 and bigrec.assistant == ""
    assert load_assistant(bigrec, None) is None
    assert load_assistant(EvalConfig(assistant="x", assistant_weight=0.0), None) is None
    raw = EvalConfig(length_penalty=0.3)
    assert resolve_decoding(raw).length_penalty == 0.3 and raw.decoding == ""


def test_eval_with_d3_preset_uses_the_assistant(tmp_path):
    from latentr3.data.splits import Catalogue, Sample
    from latentr3.evaluation.evaluate import evaluate_samples

    model, tok, builder, trie, prompts, ids, mask = _setup(1)
    rec = _sasrec()
    cat = Catalogue(path="mem", ids=list(range(len(CATALOGUE_TITLES))), titles=CATALOGUE_TITLES)
    rec.save_pretrained(tmp_path / "sasrec", cat, {"model": {"hidden": 16, "layers": 1, "heads": 1,
                                                              "max_len": 8, "dropout": 0.0}})
    samples = [Sample([CATALOGUE_TITLES[i] for i in h], h, "Bad", 15, n + 2, {}) for n, h in enumerate(HISTORIES)]
    cfg = EvalConfig(decoding="d3", assistant=str(tmp_path / "sasrec"), assistant_weight=2.0, num_beams=6,
                     top_k=5, ks=[1, 5])
    got = evaluate_samples(model, tok, builder, samples, cat, cfg)
    want = constrained_beam_search(model, trie, ids, mask, num_beams=6, top_k=5, length_penalty=0.0,
                                   assistant=TrieAssistant(rec, trie, 2.0).scores(HISTORIES))
    assert [r["predicted"] for r in got.records] == want.titles
    assert isinstance(AssistantScores, type)
