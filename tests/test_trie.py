import random
import time

import pytest
import torch

from latentr3.decoding.trie import ItemTrie

EOS = 0
V = 50


def _words_tokenizer():
    vocab: dict[str, int] = {}

    def encode(title: str) -> list[int]:
        out = []
        for w in title.split():
            if w not in vocab:
                vocab[w] = len(vocab) + 1  # 0 is EOS
            out.append(vocab[w])
        return out + [EOS]

    return encode


@pytest.fixture()
def small():
    enc = _words_tokenizer()
    titles = ["Hits", "Hits 2", "Greatest Hits", "Greatest Hits", "Greatest Hits", "Blue"]
    ids = [10, 11, 20, 21, 22, 30]
    seqs = [enc(t) for t in titles]
    return ItemTrie.build(seqs, titles, ids, V), seqs, titles, ids


def _walk(trie, seq):
    node = torch.tensor([0])
    path = [0]
    for tok in seq:
        node = trie.child(node, torch.tensor([tok]))
        path.append(int(node))
    return path


def test_prefix_title_and_shared_title(small):
    trie, seqs, titles, ids = small
    hits, hits2, greatest = seqs[0], seqs[1], seqs[2]
    assert hits2[: len(hits) - 1] == hits[:-1]  # "Hits" is a prefix of "Hits 2"
    assert len(trie.titles_unique) == 4
    assert trie.num_items == 6

    # after "Hits" both EOS (-> leaf of "Hits") and "2" are allowed
    p = _walk(trie, hits[:-1])
    allowed = trie.allowed_mask(torch.tensor([p[-1]]))[0]
    assert set(allowed.nonzero().flatten().tolist()) == {EOS, hits2[1]}
    leaf_hits = _walk(trie, hits)[-1]
    leaf_hits2 = _walk(trie, hits2)[-1]
    assert trie.is_leaf(torch.tensor([leaf_hits, leaf_hits2, p[-1], 0])).tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert trie.title_of(leaf_hits) == "Hits"
    assert trie.title_of(leaf_hits2) == "Hits 2"
    assert trie.items_of(leaf_hits) == [10]
    # leaves have no allowed continuation
    assert not trie.allowed_mask(torch.tensor([leaf_hits])).any()

    # three items with one title end at one leaf that knows all of them
    leaf_g = _walk(trie, greatest)[-1]
    assert trie.title_of(leaf_g) == "Greatest Hits"
    assert sorted(trie.items_of(leaf_g)) == [20, 21, 22]
    assert int(trie.leaf_node_of_title[trie.title_to_index["Greatest Hits"]]) == leaf_g

    # item counts: root 6, the "Hits" node 2 items (Hits, Hits 2), "Greatest" 3, leaf_g 3
    assert int(trie.node_item_count[0]) == 6
    assert int(trie.node_item_count[p[-1]]) == 2
    assert int(trie.node_item_count[leaf_g]) == 3
    assert int(trie.node_item_count[_walk(trie, greatest[:1])[-1]]) == 3

    assert trie.depth[leaf_hits2].item() == len(hits2)
    assert trie.max_depth == 3
    assert trie.sequences_of(["Hits 2", "Blue"]) == [hits2, seqs[5]]
    with pytest.raises(KeyError, match="Nope"):
        trie.sequences_of(["Nope"])
    assert trie.titles_of(torch.tensor([0, leaf_g])) == [None, "Greatest Hits"]


def test_child_missing_and_invalid(small):
    trie, seqs, _, _ = small
    nodes = torch.tensor([0, 0, 0, -1, 0])
    toks = torch.tensor([seqs[0][0], 49, EOS, seqs[0][0], V + seqs[0][0]])
    out = trie.child(nodes, toks)
    assert out[0] > 0
    assert out[1:].tolist() == [-1, -1, -1, -1]


def test_edges_and_csr_layout(small):
    trie, seqs, _, _ = small
    assert trie.row_ptr.numel() == trie.num_nodes + 1
    assert trie.num_edges == trie.num_nodes - 1
    assert torch.all(trie.edge_key[1:] > trie.edge_key[:-1])
    leaf = _walk(trie, seqs[0])[-1]
    nodes = torch.tensor([0, leaf, 0])
    rows, toks, kids = trie.edges(nodes)
    first = sorted({s[0] for s in seqs})
    assert rows.tolist() == [0] * len(first) + [2] * len(first)
    assert toks.tolist() == first + first
    assert torch.equal(trie.child(nodes[rows], toks), kids)
    # allowed mask agrees with edges
    mask = trie.allowed_mask(nodes)
    assert mask.sum().item() == rows.numel()


def test_subtree_sum(small):
    trie, seqs, titles, ids = small
    scores = torch.arange(1.0, 7.0).repeat(2, 1)  # (2, 6)
    scores[1] *= 10
    sums = trie.subtree_sum(scores)
    assert sums.shape == (2, trie.num_nodes)
    assert torch.allclose(sums[:, 0], scores.sum(1))
    leaf_g = _walk(trie, seqs[2])[-1]
    assert sums[0, leaf_g].item() == pytest.approx(3 + 4 + 5)
    hits_node = _walk(trie, seqs[0][:-1])[-1]
    assert sums[1, hits_node].item() == pytest.approx(10 + 20)
    assert torch.equal(trie.subtree_sum(torch.ones(6)).long(), trie.node_item_count)
    with pytest.raises(ValueError):
        trie.subtree_sum(torch.ones(5))


@pytest.mark.parametrize(
    "seqs,titles,match",
    [
        ([[1, 0], [2, 0]], ["A", "A"], "same title 'A'"),
        ([[1, 0], [1, 0]], ["A", "B"], "'A' and 'B'"),
        ([[1, 0], []], ["A", "B"], "empty"),
        ([[1, 0], [1, V]], ["A", "B"], "outside"),
        ([[1, 0], [1, -3]], ["A", "B"], "outside"),
        ([[1, 2], [1, 2, 0]], ["A", "B"], "prefix"),
    ],
)
def test_validation(seqs, titles, match):
    with pytest.raises(ValueError, match=match):
        ItemTrie.build(seqs, titles, list(range(len(seqs))), V)


def test_validation_lengths_and_empty():
    with pytest.raises(ValueError):
        ItemTrie.build([[1, 0]], ["A", "B"], [0, 1], V)
    with pytest.raises(ValueError):
        ItemTrie.build([], [], [], V)


def _naive(seqs):
    """prefix tuple -> set of next tokens, and the set of complete sequences."""
    nxt: dict[tuple, set] = {}
    for s in seqs:
        for d in range(len(s)):
            nxt.setdefault(tuple(s[:d]), set()).add(s[d])
    return nxt


@pytest.mark.parametrize("seed", range(5))
def test_random_against_naive_trie(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 12, 40])
    eos = vocab - 1
    unique: dict[tuple, str] = {}
    target = rng.randint(1, 60)
    while len(unique) < target:
        body = tuple(rng.randrange(0, eos) for _ in range(rng.randint(0, 6)))
        unique.setdefault(body + (eos,), f"title {len(unique)}")
    # items: every title 1-3 times, shuffled
    items = [(t, list(s)) for s, t in unique.items() for _ in range(rng.randint(1, 3))]
    rng.shuffle(items)
    titles = [t for t, _ in items]
    seqs = [s for _, s in items]
    ids = list(range(100, 100 + len(items)))
    trie = ItemTrie.build(seqs, titles, ids, vocab)

    nxt = _naive(seqs)
    prefix_node: dict[tuple, int] = {(): 0}
    # breadth-first: walk every prefix with one batched query per depth
    frontier = [()]
    while frontier:
        nodes = torch.tensor([prefix_node[p] for p in frontier])
        mask = trie.allowed_mask(nodes)
        for row, p in enumerate(frontier):
            assert set(mask[row].nonzero().flatten().tolist()) == nxt.get(p, set())
        # children: every allowed token exists, every other token is -1
        rows = torch.arange(len(frontier)).repeat_interleave(vocab)
        toks = torch.arange(vocab).repeat(len(frontier))
        kids = trie.child(nodes[rows], toks)
        assert torch.equal(kids >= 0, mask.flatten())
        new = []
        for r, t, k in zip(rows.tolist(), toks.tolist(), kids.tolist()):
            if k >= 0:
                q = frontier[r] + (t,)
                assert k not in prefix_node.values()
                prefix_node[q] = k
                new.append(q)
        frontier = new
    assert len(prefix_node) == trie.num_nodes
    for p, node in prefix_node.items():
        assert int(trie.depth[node]) == len(p)
        is_seq = p in unique
        assert bool(trie.is_leaf(torch.tensor([node]))) == is_seq
        if is_seq:
            assert trie.title_of(node) == unique[p]
            want = [i for i, (t, _) in zip(ids, items) if t == unique[p]]
            assert sorted(trie.items_of(node)) == want
        n_items = sum(1 for s in seqs if tuple(s[: len(p)]) == p)
        assert int(trie.node_item_count[node]) == n_items
    # subtree_sum against a direct sum
    scores = torch.rand(len(items), dtype=torch.float64)
    sums = trie.subtree_sum(scores)
    for p, node in prefix_node.items():
        want = sum(float(scores[i]) for i, s in enumerate(seqs) if tuple(s[: len(p)]) == p)
        assert sums[node].item() == pytest.approx(want)


def test_to_device_returns_copy(small):
    trie = small[0]
    moved = trie.to("cpu")
    assert moved is not trie
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.row_ptr, trie.row_ptr)


def test_build_speed_6k_items():
    rng = random.Random(0)
    n = 6000
    titles = [f"title {i}" for i in range(n)]
    # shared prefixes like real titles: first tokens from a small set
    seqs = [
        [rng.randrange(1, 50) for _ in range(3)] + [rng.randrange(1, 32000) for _ in range(17)] + [2]
        for _ in range(n)
    ]
    t0 = time.perf_counter()
    trie = ItemTrie.build(seqs, titles, list(range(n)), 32000)
    elapsed = time.perf_counter() - t0
    assert trie.num_items == n
    assert int(trie.node_item_count[0]) == n
    assert elapsed < 1.0, elapsed
    # all leaves reachable
    nodes = torch.zeros(n, dtype=torch.long)
    toks = torch.tensor(seqs)
    for d in range(toks.shape[1]):
        nodes = trie.child(nodes, toks[:, d])
    assert bool(trie.is_leaf(nodes).all())
    assert trie.titles_of(nodes) == titles
