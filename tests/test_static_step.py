"""The static-shape beam step (eval.cuda_graphs = on) returns the eager step's lists: several users, per-user
top_k, excluded titles, users finishing at different steps, admissions while others are mid-title."""
from __future__ import annotations

import pytest
import torch

from latentr3.decoding.beam_search import BeamBatch, BeamKV, StaticBeamKV, _CUDAGraphs, batch_shared_prefix
from latentr3.decoding.engine import DecodeRequest, DecodingEngine
from test_decoding import make_varied


@pytest.fixture(scope="module")
def varied():
    return make_varied(0)


def run_engine(varied, mode, max_users, admit_at, with_assistant, requests, on_step=None):
    model, tok, trie, prompts, assistant = varied
    batch = BeamBatch(model, trie, tok.pad_token_id, num_beams=4, max_top_k=4,
                      length_penalty=0.0 if with_assistant else 1.0,
                      assistant=assistant if with_assistant else None,
                      shared_prefix=batch_shared_prefix(prompts), cuda_graphs=mode)
    assert batch.static == (mode == "on")
    engine = DecodingEngine(batch, max_users, admit_at=admit_at, on_step=on_step)
    reqs = [DecodeRequest(prompts[i], k, exclude, key=i) for i, k, exclude in requests]
    futures = engine.submit_many(reqs)
    engine.run_until_idle()
    return [f.result() for f in futures], batch


def test_static_step_lists_equal_the_eager_step(varied):
    model, tok, trie, prompts, _ = varied
    titles = trie.titles_unique
    # per-user top_k 1..4; two users exclude titles (one of them the eager top title of that user)
    first, _ = run_engine(varied, "off", 8, 8, False, [(i, 4, ()) for i in range(len(prompts))])
    banned = (trie.title_to_index[first[2].titles[0]], 3, 7)
    requests = [(i, 1 + i % 4, banned if i in (2, 5) else ()) for i in range(len(prompts))]
    for with_assistant in (True, False):
        for max_users, admit_at in ((8, 8), (3, 1), (2, 2)):
            finished_at = []
            want, _ = run_engine(varied, "off", max_users, admit_at, with_assistant, requests)
            got, batch = run_engine(varied, "on", max_users, admit_at, with_assistant, requests,
                                    on_step=finished_at.append)
            if max_users == 3:
                assert len(set(finished_at)) > 1            # the batch size changed: users left, others joined
            for (i, k, exclude), a, b in zip(requests, want, got):
                assert b.titles == a.titles, (with_assistant, max_users, i)
                assert len(b.titles) == k and not set(b.title_index) & set(exclude)
                assert torch.allclose(torch.tensor(b.scores), torch.tensor(a.scores), atol=1e-4, rtol=0)
    assert first[2].titles[0] not in [titles[j] for j in got[2].title_index]


def test_static_step_runs_bucketed_rows_and_keeps_its_kv_storage(varied, monkeypatch):
    model, tok, trie, prompts, _ = varied
    lengths = []
    generations = set()
    real_forward = BeamBatch._static_forward

    def spy(self, tokens, positions, run, fed, lineage):
        lengths.append((tokens.numel(), self.act.cache.layers[0].places * self.K, fed.numel(), lineage.shape))
        generations.add(self.act.cache.layers[0].generation)
        return real_forward(self, tokens, positions, run, fed, lineage)

    monkeypatch.setattr(BeamBatch, "_static_forward", spy)
    run_engine(varied, "on", 3, 1, True, [(i, 4, ()) for i in range(len(prompts))])
    assert lengths
    for rows, r_cap, places, lineage_shape in lengths:
        assert rows == r_cap or (rows & (rows - 1) == 0 and rows < r_cap), (rows, r_cap)
        slots = lineage_shape[2]
        assert places == r_cap // 4 and lineage_shape[:2] == (places, 4)
        assert slots == trie.max_depth or (slots & (slots - 1) == 0 and slots < trie.max_depth)
    # users left and joined at many steps; the storage moved only when more places / prompt were needed
    assert len(generations) <= 3 < len(lengths)


@pytest.mark.parametrize("kind", ["eager", "static"])
def test_kv_select_and_append_in_place(kind):
    """Both KV storages: users join in free places and leave by a move of the last users into their places;
    only more users or a longer prompt than it holds reallocate (places to a power of two)."""
    torch.manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0
    kv = StaticBeamKV(keys, values, mask, beams=2, slots=3) if kind == "static" else BeamKV(keys, values, mask, beams=2)
    P = 32 if kind == "static" else 5           # the static prompt part is a multiple of 32 positions
    assert kv.places == 4 and kv.prompt_len == P and kv.capacity == (3 if kind == "static" else 16)
    kv.k_all[:3, :, P:] = torch.arange(3.0)[:, None, None, None]      # each user's generated part: its number
    ptr, gen = kv.k_all.data_ptr(), kv.generation
    before = kv.k_all.clone()
    kv.select(torch.tensor([2, 1]), [0])        # user 0 leaves, user 2 takes its place, user 1 stays
    assert kv.users == 2 and torch.equal(kv.k_all[0, :, P - 5:P], keys[2]) and torch.equal(kv.k_all[1], before[1])
    assert kv.k_all[0, :, P:].eq(2).all() and kv.k_all.data_ptr() == ptr
    assert kv.prompt_bias[1, 0, 0, P - 5:P - 3].eq(float("-inf")).all() and kv.prompt_bias[1, 0, 0, P - 3:].eq(0).all()
    kv.append(keys[:1, :, :3], values[:1, :, :3], torch.ones(1, 3))
    assert kv.k_all.data_ptr() == ptr and kv.generation == gen and kv.users == 3
    assert kv.prompt_bias[2, 0, 0, :P - 3].eq(float("-inf")).all() and torch.equal(kv.v_all[2, :, P - 3:P], values[0, :, :3])
    kv.append(torch.randn(2, 2, 40, 4), torch.randn(2, 2, 40, 4), torch.ones(2, 40))   # more users, longer prompt
    P2 = 64 if kind == "static" else 40
    assert kv.generation != gen and kv.places == 8 and kv.prompt_len == P2 and kv.users == 5
    assert torch.equal(kv.k_all[0, :, P2 - 5:P2], keys[2]) and kv.prompt_bias[0, 0, 0, :P2 - 5].eq(float("-inf")).all()
    assert kv.k_all[0, :, P2:].eq(2).all()     # the generated part moved with the prompt part
    kv.begin_step(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1, None)
    k, _ = kv.update(torch.zeros(0, 2, 1, 4), torch.zeros(0, 2, 1, 4))
    # attention reads the active users (eager) or every place (static: shapes independent of the users)
    assert k.shape == ((8 if kind == "static" else 5), 2, P2 + 1 * 2, 4)


def test_cuda_graphs_recapture_when_the_kv_storage_moves(monkeypatch):
    """The graph cache logic (capture itself needs CUDA): one capture per key, all dropped on a new storage."""
    captured = []
    graphs = _CUDAGraphs(lambda x: x * 2)

    class FakeGraph:
        def __init__(self, fn, inputs):
            self.fn, self.inputs, self.out = fn, inputs, torch.zeros_like(inputs[0])

        def replay(self):
            self.out.copy_(self.fn(*self.inputs))

    def capture(inputs):
        static = [x.clone() for x in inputs]
        g = FakeGraph(graphs.body, static)
        captured.append(g)
        return g, static, g.out

    monkeypatch.setattr(graphs, "_capture", capture)
    assert graphs(4, 0, torch.ones(4)).tolist() == [2.0] * 4
    assert graphs(4, 0, torch.full((4,), 3.0)).tolist() == [6.0] * 4 and len(captured) == 1
    graphs(8, 0, torch.ones(8))
    graphs(4, 1, torch.ones(4))
    assert len(captured) == 3 and list(graphs.graphs) == [4]


def test_cuda_graphs_mode_is_resolved_and_checked(varied):
    from latentr3.config import ConfigError, load_config

    model, tok, trie, prompts, _ = varied
    assert not BeamBatch(model, trie, tok.pad_token_id, cuda_graphs="auto").static     # CPU: eager
    assert BeamBatch(model, trie, tok.pad_token_id, cuda_graphs="on").graphs is None      # CPU: no capture
    assert not BeamBatch(model, trie, tok.pad_token_id, fast_step=False, cuda_graphs="on").static
    with pytest.raises(ValueError, match="cuda_graphs"):
        BeamBatch(model, trie, tok.pad_token_id, cuda_graphs="yes")
    assert load_config(None, ["eval.cuda_graphs=off"]).eval.cuda_graphs == "off"     # YAML's boolean off
    with pytest.raises(ConfigError, match="eval.cuda_graphs must be one of 'auto', 'on', 'off'"):
        load_config(None, ["eval.cuda_graphs=sometimes"])


def test_emptied_batch_keeps_its_static_storage(varied):
    """A batch that empties (static batches, eval.refill = 1) keeps its KV storage, so CUDA graphs survive."""
    model, tok, trie, prompts, _ = varied
    batch = BeamBatch(model, trie, tok.pad_token_id, num_beams=4, max_top_k=4, cuda_graphs="on")
    seen = []
    for _ in range(2):
        batch.admit([DecodeRequest(p, 4) for p in prompts[:2]])
        layer = batch.act.cache.layers[0]
        seen.append((layer.generation, layer.k_all.data_ptr(), layer.users))
        while len(batch):
            batch.step()
    assert seen[0] == seen[1] and seen[0][2] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_lists_equal_the_eager_step_on_gpu(varied):
    model, tok, trie, prompts, assistant = varied
    model = model.to("cuda")
    try:
        requests = [(i, 4, ()) for i in range(len(prompts))]
        want, _ = run_engine((model, tok, trie, prompts, assistant), "off", 3, 1, True, requests)
        got, batch = run_engine((model, tok, trie, prompts, assistant), "on", 3, 1, True, requests)
        assert batch.graphs is not None and batch.graphs.graphs and not batch.graphs.failed
        for a, b in zip(want, got):
            assert a.titles == b.titles
            assert torch.allclose(torch.tensor(b.scores), torch.tensor(a.scores), atol=1e-4, rtol=0)
    finally:
        model.to("cpu")


def test_graph_replay_data_flow_on_cpu(varied, monkeypatch):
    """The graph path's plumbing without a GPU: a stand-in "graph" with a graph's semantics (warm-up runs,
    static input copies, one output buffer per key overwritten by every replay) gives the eager lists."""
    model, tok, trie, prompts, assistant = varied
    requests = [(i, 1 + i % 4, ()) for i in range(len(prompts))]
    want, _ = run_engine(varied, "off", 3, 1, True, requests)
    made = []
    real_init = BeamBatch.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        graphs = self.graphs = _CUDAGraphs(self._static_forward)

        def capture(inputs):
            static = [x.clone() for x in inputs]
            for _ in range(2):
                graphs.body(*static)
            out = graphs.body(*static).clone()

            class Replay:
                def replay(self):
                    out.copy_(graphs.body(*static))

            made.append(out)
            return Replay(), static, out

        graphs._capture = capture

    monkeypatch.setattr(BeamBatch, "__init__", init)
    got, batch = run_engine(varied, "on", 3, 1, True, requests)
    assert len(made) >= len(batch.graphs.graphs) > 3   # recaptured when the storage grew
    for a, b in zip(want, got):
        assert a.titles == b.titles
        assert torch.allclose(torch.tensor(b.scores), torch.tensor(a.scores), atol=1e-4, rtol=0)
