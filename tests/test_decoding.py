"""Constrained beam search: exact against brute force, catalogue-only, distinct, padding-invariant."""
from __future__ import annotations

import torch

from latentr3.data.prompts import PromptBuilder
from latentr3.data.splits import Catalogue
from latentr3.decoding.beam_search import constrained_beam_search
from latentr3.evaluation.evaluate import build_trie, output_vocab_size
from latentr3.model.backbones import add_latent_token, tiny_qwen2, tiny_tokenizer_corpus, train_tiny_tokenizer
from latentr3.model.latent_lm import LatentR3Model, left_pad, right_pad

CATALOGUE_TITLES = [
    "Hits", "Hits 2", "Greatest Hits", "Greatest Hits", "Greatest Hits Vol. 2", "Blue", "Blue Train",
    "Kind of Blue", "Abbey Road", "Let It Be", "Help!", "Revolver", "Rumours", "Tusk", "Thriller",
    "Bad", "Off the Wall", "Nevermind", "In Utero", "Ten", "Vs.", "Yield", "Dark Side of the Moon",
    "Animals", "The Wall", "Wish You Were Here", "Blue Lines", "Mezzanine", "Heligoland", "OK Computer",
]


def make(num_latent: int, seed: int = 0):
    tok = train_tiny_tokenizer(tiny_tokenizer_corpus(CATALOGUE_TITLES, "albums"), 400)
    backbone = tiny_qwen2(len(tok), hidden=32, layers=2, heads=2, seed=seed)
    latent_id = add_latent_token(backbone, tok) if num_latent else None
    torch.manual_seed(seed)
    model = LatentR3Model(backbone, latent_id, num_latent).eval()
    # A random init scores titles nearly uniformly; sharpen it so the ranking is not a near tie.
    with torch.no_grad():
        backbone.get_input_embeddings().weight.mul_(8.0)
    catalogue = Catalogue(path="mem", ids=list(range(len(CATALOGUE_TITLES))), titles=CATALOGUE_TITLES)
    builder = PromptBuilder(tok, "short", "albums", 256, num_latent)
    return model, tok, builder, catalogue


def brute_force(model, tok, builder, prompt, titles, length_penalty):
    """Scores every distinct catalogue title in full: the ranking beam search must reproduce."""
    targets = [builder.target_ids(t) for t in titles]
    pi, pm = left_pad([prompt] * len(titles), tok.pad_token_id)
    ti, tm = right_pad(targets, tok.pad_token_id)
    with torch.no_grad():
        sums = model(pi, pm, ti, tm).sum(1)
    lengths = tm.sum(1).float()
    return sums / lengths ** length_penalty if length_penalty else sums


def test_beam_search_equals_brute_force_ranking():
    for num_latent in (0, 1):
        model, tok, builder, cat = make(num_latent)
        trie = build_trie(cat, builder, output_vocab_size(model))
        histories = [["Abbey Road", "Help!"], ["Rumours"], ["Ten", "Vs.", "Yield", "Nevermind"]]
        prompts = [builder.prompt_ids(h) for h in histories]
        ids, mask = left_pad(prompts, tok.pad_token_id)
        distinct = list(dict.fromkeys(CATALOGUE_TITLES))
        for lp in (1.0, 0.0):
            res = constrained_beam_search(model, trie, ids, mask, num_beams=len(distinct), top_k=10,
                                          length_penalty=lp)
            for u, prompt in enumerate(prompts):
                scores = brute_force(model, tok, builder, prompt, distinct, lp)
                order = scores.argsort(descending=True)[:10]
                assert res.titles[u] == [distinct[i] for i in order], (num_latent, lp, u)
                assert torch.allclose(torch.tensor(res.scores[u]), scores[order], atol=1e-4)


def test_results_are_distinct_catalogue_titles_and_deterministic():
    model, tok, builder, cat = make(1, seed=3)
    trie = build_trie(cat, builder, output_vocab_size(model))
    prompts = [builder.prompt_ids(h) for h in (["Bad"], ["Tusk", "Blue"], ["Animals"] * 5)]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    a = constrained_beam_search(model, trie, ids, mask, num_beams=4, top_k=4)
    b = constrained_beam_search(model, trie, ids, mask, num_beams=4, top_k=4)
    assert a.titles == b.titles and a.scores == b.scores
    for titles, scores in zip(a.titles, a.scores):
        assert len(titles) == len(set(titles)) > 0
        assert set(titles) <= set(CATALOGUE_TITLES)
        assert scores == sorted(scores, reverse=True)


def test_left_padding_does_not_change_recommendations():
    model, tok, builder, cat = make(1, seed=5)
    trie = build_trie(cat, builder, output_vocab_size(model))
    short, long = builder.prompt_ids(["Bad"]), builder.prompt_ids(["Tusk", "Blue", "Ten", "Help!"])
    ids, mask = left_pad([short, long], tok.pad_token_id)
    both = constrained_beam_search(model, trie, ids, mask, num_beams=5, top_k=5)
    ids1, mask1 = left_pad([short], tok.pad_token_id)
    alone = constrained_beam_search(model, trie, ids1, mask1, num_beams=5, top_k=5)
    assert both.titles[0] == alone.titles[0]
    assert torch.allclose(torch.tensor(both.scores[0]), torch.tensor(alone.scores[0]), atol=1e-4)


def test_shared_title_is_one_leaf_with_all_items():
    model, tok, builder, cat = make(1)
    trie = build_trie(cat, builder, output_vocab_size(model))
    node = int(trie.leaf_node_of_title[trie.title_to_index["Greatest Hits"]])
    assert sorted(trie.items_of(node)) == [2, 3]
