"""The online decoding engine: results independent of the batch and of admission times, per-user top_k
and excluded titles, cancellation, deadlines, queue limits, draining, errors."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from latentr3.decoding.beam_search import BeamBatch, batch_shared_prefix, beam_search_prompts
from latentr3.decoding.engine import DeadlineExceeded, DecodeRequest, DecodingEngine, EngineClosed, QueueFull
from latentr3.evaluation.evaluate import build_trie, output_vocab_size
from latentr3.data.dataset import left_pad
from test_decoding import CATALOGUE_TITLES, brute_force, make, make_varied


@pytest.fixture(scope="module")
def varied():
    model, tok, trie, prompts, assistant = make_varied(2)
    return model, tok, trie, prompts, batch_shared_prefix(prompts)


def engine_for(varied, max_users=16, **kw):
    model, tok, trie, prompts, shared = varied
    batch = BeamBatch(model, trie, tok.pad_token_id, num_beams=4, max_top_k=4, shared_prefix=shared)
    return DecodingEngine(batch, max_users, **kw)


def alone(varied, prompt, top_k=4):
    engine = engine_for(varied)
    fut = engine.submit(prompt, top_k)
    engine.run_until_idle()
    return fut.result()


def assert_same(a, b):
    assert a.titles == b.titles
    assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-5, rtol=0)


def test_alone_equals_inside_a_busy_batch_with_staggered_admissions(varied):
    prompts = varied[3]
    want = [alone(varied, p) for p in prompts]
    engine = engine_for(varied, max_users=3, admit_at=1)
    futures = [engine.submit(prompts[0], 4), engine.submit(prompts[5], 4)]
    order = [0, 5]
    for i in (3, 1, 7, 2, 6, 4):                # one new user every other step, while others are mid-title
        engine.step()
        engine.step()
        futures.append(engine.submit(prompts[i], 4))
        order.append(i)
    sizes = []
    engine.on_step = sizes.append
    engine.run_until_idle()
    assert max(sizes) == 3                       # it really was a busy batch
    for i, fut in zip(order, futures):
        assert_same(fut.result(), want[i])
    # beam_search_prompts goes through the same engine: same lists
    res = beam_search_prompts(varied[0], varied[2], prompts, varied[1].pad_token_id, max_users=2, num_beams=4,
                              top_k=4)
    for i in range(len(prompts)):
        assert res.titles[i] == want[i].titles


def test_per_request_top_k_is_a_prefix_of_the_longer_list(varied):
    prompts = varied[3]
    engine = engine_for(varied)
    f4 = [engine.submit(p, 4) for p in prompts[:3]]
    f1 = [engine.submit(p, k) for p, k in zip(prompts[:3], (1, 2, 3))]
    engine.run_until_idle()
    for a, b, k in zip(f4, f1, (1, 2, 3)):
        assert b.result().titles == a.result().titles[:k]
        assert b.result().scores == pytest.approx(a.result().scores[:k], abs=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        engine.submit(prompts[0], 5)        # refused when submitted, before it can fail a batch
    assert engine.queue_depth == 0


def test_excluded_titles_are_masked_for_that_user_only():
    model, tok, builder, cat = make(1, seed=6)
    trie = build_trie(cat, builder, output_vocab_size(model))
    distinct = list(dict.fromkeys(CATALOGUE_TITLES))
    K = len(distinct)                            # as many beams as titles: the search is exhaustive
    histories = [["Abbey Road", "Help!"], ["Rumours", "Tusk"]]
    prompts = [builder.prompt_ids(h) for h in histories]
    batch = BeamBatch(model, trie, tok.pad_token_id, num_beams=K, max_top_k=10)
    engine = DecodingEngine(batch, 4)
    plain = engine.submit(prompts[1], 10)
    scores = brute_force(model, tok, builder, prompts[0], distinct, 1.0)
    ranked = [distinct[i] for i in scores.argsort(descending=True)]
    banned = ranked[:3] + ["Greatest Hits"]      # the top 3 and a title two items share
    exclude = [trie.title_to_index[t] for t in banned]
    masked = engine.submit(prompts[0], 10, exclude=exclude)
    engine.run_until_idle()
    assert masked.result().titles == [t for t in ranked if t not in banned][:10]
    # the other user in the same batch is untouched
    ids, mask = left_pad([prompts[1]], tok.pad_token_id)
    from latentr3.decoding.beam_search import constrained_beam_search

    ref = constrained_beam_search(model, trie, ids, mask, num_beams=K, top_k=10)
    assert plain.result().titles == ref.titles[0]


def test_threads_cancellation_deadlines_queue_and_draining(varied):
    prompts = varied[3]
    want = [alone(varied, p) for p in prompts]
    engine = engine_for(varied, max_users=2, max_queue=6).start()
    results = {}

    def client(i):
        results[i] = engine.submit(prompts[i], 4).result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert_same(results[i], want[i])
    # a cancelled request (a client that went away) and an expired one leave the others intact
    cancelled = engine.submit(prompts[4], 4)
    cancelled.cancel()
    late = engine.submit(prompts[5], 4, deadline=time.monotonic() - 1)
    ok = engine.submit(prompts[6], 4)
    assert_same(ok.result(timeout=60), want[6])
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=60)
    assert cancelled.cancelled()
    # a full queue refuses, all or nothing
    engine.close()                                # drains and stops the thread
    with pytest.raises(EngineClosed):
        engine.submit(prompts[0], 4)
    queued = engine_for(varied, max_queue=2)
    queued.submit(prompts[0], 4)
    with pytest.raises(QueueFull):
        queued.submit_many([DecodeRequest(prompts[1], 4), DecodeRequest(prompts[2], 4)])
    assert queued.queue_depth == 1
    # close() answers what was accepted
    fut = queued.submit(prompts[2], 4)
    assert queued.close()
    assert_same(fut.result(timeout=0), want[2])


class _Failing:
    """A batch whose step fails once: every request in it gets the error, the engine carries on."""

    def __init__(self):
        self.reqs, self.fail = [], True

    def __len__(self):
        return len(self.reqs)

    def admit(self, reqs):
        self.reqs += reqs

    def retire(self, predicate):
        self.reqs = [r for r in self.reqs if not predicate(r)]

    def reset(self):
        self.reqs = []

    def step(self):
        if self.fail:
            self.fail = False
            raise RuntimeError("out of memory")
        done, self.reqs = [(r, "ok") for r in self.reqs], []
        return done


def test_an_error_in_a_step_fails_its_requests_and_the_engine_keeps_serving():
    engine = DecodingEngine(_Failing(), 4).start()
    first = engine.submit([1, 2], 1)
    with pytest.raises(RuntimeError, match="out of memory"):
        first.result(timeout=10)
    assert engine.submit([3], 1).result(timeout=10) == "ok"
    assert engine.close(timeout=10)
