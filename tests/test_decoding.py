"""Constrained beam search: exact against brute force, catalogue-only, distinct, padding-invariant."""
from __future__ import annotations

import torch

from latentr3.data.prompts import PromptBuilder
from latentr3.data.splits import Catalogue
from latentr3.decoding.beam_search import (BeamKV, beam_search_prompts, begin_beam_step, constrained_beam_search,
                                           shared_prefix_length)
from latentr3.decoding.decoder_step import LlamaFamilyStep
from latentr3.evaluation.evaluate import build_trie, output_vocab_size
from latentr3.model.backbones import add_latent_token, tiny_qwen2, tiny_tokenizer_corpus, train_tiny_tokenizer
from latentr3.data.dataset import left_pad, right_pad
from latentr3.model.latent_lm import LatentR3Model

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


HISTORIES = [["Abbey Road", "Help!"], ["Rumours"], ["Ten", "Vs.", "Yield", "Nevermind"], ["Bad"],
             ["Tusk", "Blue", "Heligoland"], ["Animals"] * 3]


def _beam_cache(model, ids, mask, beams=1):
    from transformers import DynamicCache

    prefix = model.think(model.prefill(ids, mask))
    cache = DynamicCache()
    cache.layers = [BeamKV(layer.keys, layer.values, prefix.attention_mask, beams) for layer in prefix.cache.layers]
    return prefix, cache


def test_fast_step_logits_equal_the_backbone_forward():
    """Users at different depths in one batch, a row that does not run, garbage in unwritten slots."""
    for num_latent in (0, 1):
        model, tok, builder, _ = make(num_latent, seed=7)
        prompts = [builder.prompt_ids(h) for h in HISTORIES[:2]]
        fed = {0: [5, 17, 42], 1: [9]}           # user 1 starts two steps after user 0
        want = {}
        for u, tokens in fed.items():            # reference: the backbone's forward over prompt + tokens
            ids, mask = left_pad([prompts[u]], tok.pad_token_id)
            embeds = model.backbone.get_input_embeddings()(torch.tensor([tokens]))
            _, logits = model.append(model.think(model.prefill(ids, mask)), embeds, keep_hidden=False)
            want[u] = logits[0, -1]
        ids, mask = left_pad(prompts, tok.pad_token_id)
        prefix, cache = _beam_cache(model, ids, mask)
        for layer in cache.layers:               # unwritten slots must be masked, not merely zero
            layer.k_all[:, :, layer.prompt_len:] = 30.0
            layer.v_all[:, :, layer.prompt_len:] = 30.0
        step = LlamaFamilyStep(model.backbone)
        for i, (rows, slot) in enumerate([([0], [0, 0]), ([0], [1, 0]), ([0, 1], [2, 0])]):
            rows, slot = torch.tensor(rows), torch.tensor(slot)
            begin_beam_step(cache, slot, rows, torch.zeros(2, 1, 3, dtype=torch.long))   # one beam: column 0
            tokens = torch.tensor([fed[0][i]] + ([fed[1][0]] if len(rows) == 2 else []))
            logits = step(tokens, (prefix.next_position + slot)[rows], rows, 2, cache)
        assert torch.allclose(logits[0], want[0], atol=1e-5), num_latent
        assert torch.allclose(logits[1], want[1], atol=1e-5), num_latent


def test_fast_step_and_backbone_forward_paths_give_the_same_beams():
    for num_latent in (0, 1):
        model, tok, builder, cat = make(num_latent, seed=2)
        trie = build_trie(cat, builder, output_vocab_size(model))
        ids, mask = left_pad([builder.prompt_ids(h) for h in HISTORIES], tok.pad_token_id)
        for lp in (1.0, 0.0):
            fast = constrained_beam_search(model, trie, ids, mask, num_beams=5, top_k=5, length_penalty=lp)
            slow = constrained_beam_search(model, trie, ids, mask, num_beams=5, top_k=5, length_penalty=lp,
                                           fast_step=False)
            assert fast.titles == slow.titles, (num_latent, lp)
            for a, b in zip(fast.scores, slow.scores):
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_llama_family_step_support_check():
    from transformers import GPT2Config, GPT2LMHeadModel

    model, *_ = make(1)
    assert LlamaFamilyStep.supports(model.backbone)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    assert not LlamaFamilyStep.supports(gpt2)


def test_shared_prefix_prefill_equals_the_full_prefill():
    model, tok, _, _ = make(1, seed=4)
    builder = PromptBuilder(tok, "paper", "albums", 256, 1)   # a long instruction shared by every prompt
    prompts = [builder.prompt_ids(h) for h in HISTORIES]
    start = shared_prefix_length(prompts)
    assert start >= 20 and all(p[:start] == prompts[0][:start] for p in prompts)
    with torch.no_grad():
        ids, mask = left_pad(prompts, tok.pad_token_id)
        full = model.think(model.prefill(ids, mask))
        head = torch.tensor([prompts[0][:start]])
        shared = model.prefill(head, torch.ones_like(head))
        ids, mask = left_pad([p[start:] for p in prompts], tok.pad_token_id)
        split = model.think(model.prefill(ids, mask, shared))
    assert torch.allclose(split.latents, full.latents, atol=1e-5)
    assert torch.allclose(split.last_logits, full.last_logits, atol=1e-4)
    assert torch.equal(split.next_position, full.next_position)


def make_varied(seed: int = 0):
    """A catalogue of 1- to 12-word titles (trie depth ~50), a latent model, the paper prompt, 8 users
    ordered by prompt length, and per-user assistant log-masses: with the assistant the users' searches
    diverge and end at different steps, so admissions happen while others are mid-title."""
    import random

    from latentr3.decoding.assistant import AssistantScores

    rng = random.Random(seed)
    words = "blue red train moon wall road kind of the in a love night day song live best hits volume".split()
    titles = sorted({" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(60)})
    tok = train_tiny_tokenizer(tiny_tokenizer_corpus(titles, "albums"), 300)
    backbone = tiny_qwen2(len(tok), hidden=32, layers=2, heads=2, seed=seed)
    latent_id = add_latent_token(backbone, tok)
    torch.manual_seed(seed)
    model = LatentR3Model(backbone, latent_id, 1).eval()
    with torch.no_grad():
        backbone.get_input_embeddings().weight.mul_(8.0)
    catalogue = Catalogue(path="mem", ids=list(range(len(titles))), titles=titles)
    builder = PromptBuilder(tok, "paper", "albums", 512, 1)
    trie = build_trie(catalogue, builder, output_vocab_size(model))
    histories = [[titles[i] for i in rng.sample(range(len(titles)), rng.randint(1, 4))] for _ in range(8)]
    prompts = sorted((builder.prompt_ids(h) for h in histories), key=len)
    gen = torch.Generator().manual_seed(seed)
    log_mass = trie.subtree_sum(torch.rand(len(prompts), trie.num_items, generator=gen) ** 8).log()
    return model, tok, trie, prompts, lambda idx: AssistantScores(log_mass[idx], 3.0)


class _Finished:
    def __init__(self):
        self.counts = []

    def update(self, n):
        self.counts.append(n)


def test_results_do_not_depend_on_batching_refill_or_prefix_sharing(monkeypatch):
    import latentr3.decoding.beam_search as beam_search

    monkeypatch.setattr(beam_search, "_SLOT_CHUNK", 2)   # buffers grow during the search and on admission
    model, tok, trie, prompts, assistant = make_varied()
    assert len(prompts[0]) < len(prompts[-1])            # admitted users widen the prompt part
    for kw in ({"length_penalty": 0.0, "assistant": assistant}, {"length_penalty": 1.0}):
        finished = _Finished()
        want = beam_search_prompts(model, trie, prompts, tok.pad_token_id, max_users=len(prompts), num_beams=4,
                                   top_k=4, share_prefix=False, progress=finished, **kw)
        if "assistant" in kw:
            assert len(finished.counts) > 3               # users finish at different steps
        for max_users, refill, share in ((3, 0.34, True), (2, 1.0, True), (4, 0.25, False), (1, 1.0, True)):
            got = beam_search_prompts(model, trie, prompts, tok.pad_token_id, max_users=max_users, num_beams=4,
                                      top_k=4, share_prefix=share, refill=refill, **kw)
            assert got.titles == want.titles, (max_users, refill, share, kw.keys())
            for a, b in zip(got.scores, want.scores):
                assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4), (max_users, refill, share)


def test_assistant_changes_the_ranking():
    model, tok, trie, prompts, assistant = make_varied(1)
    kw = dict(max_users=8, num_beams=4, top_k=4, length_penalty=0.0)
    with_assistant = beam_search_prompts(model, trie, prompts, tok.pad_token_id, assistant=assistant, **kw)
    plain = beam_search_prompts(model, trie, prompts, tok.pad_token_id, **kw)
    assert with_assistant.titles != plain.titles


def test_fast_step_runs_lora_layers_like_the_backbone_forward():
    from peft import LoraConfig, get_peft_model

    model, tok, builder, cat = make(1, seed=9)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model.backbone = get_peft_model(model.backbone, lora)    # random, non-zero adapters
    assert LlamaFamilyStep.supports(model.backbone)
    trie = build_trie(cat, builder, output_vocab_size(model))
    ids, mask = left_pad([builder.prompt_ids(h) for h in HISTORIES], tok.pad_token_id)
    fast = constrained_beam_search(model, trie, ids, mask, num_beams=5, top_k=5)
    slow = constrained_beam_search(model, trie, ids, mask, num_beams=5, top_k=5, fast_step=False)
    model.backbone.disable_adapter_layers()
    plain = constrained_beam_search(model, trie, ids, mask, num_beams=5, top_k=5)
    assert fast.titles == slow.titles and fast.titles != plain.titles
    for a, b in zip(fast.scores, slow.scores):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


def test_negative_length_penalty_is_rejected():
    """p < 0 invalidates the stopping bound s / max_len**p (scores would no longer only fall)."""
    import pytest

    from latentr3.config import EvalConfig
    from latentr3.decoding.assistant import resolve_decoding

    model, tok, builder, cat = make(1)
    trie = build_trie(cat, builder, output_vocab_size(model))
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        beam_search_prompts(model, trie, [builder.prompt_ids(["Bad"])], tok.pad_token_id, length_penalty=-0.5)
    with pytest.raises(ValueError, match="eval.length_penalty must be >= 0"):
        resolve_decoding(EvalConfig(length_penalty=-1.0))
    assert resolve_decoding(EvalConfig(length_penalty=0.5)).length_penalty == 0.5
