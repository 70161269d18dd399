"""ItemTrie: the catalogue's title token sequences as a prefix tree stored in CSR tensors.

Every catalogue item is generated as the token-id sequence of its title (ending with EOS). The
trie holds one path per *distinct* title; the node after the final token (EOS) is a leaf that knows
the title and every item id that carries it. A title that is a prefix of another title is no
problem because EOS is an edge of its own: "Hits" + EOS ends at a leaf while "Hits 2" continues
from the node after "Hits".

All queries are vectorised over a 1-D LongTensor of node ids (one per beam, of any batch shape
flattened), so a beam search can step every beam of every user with a handful of tensor ops:

    nodes:  (B,) LongTensor, root = 0
    allowed = trie.allowed_mask(nodes)          # (B, vocab) bool
    nxt     = trie.child(nodes, tokens)         # (B,) long, -1 where (node, token) is no edge
    rows, toks, kids = trie.edges(nodes)        # flattened out-edges, rows index into `nodes`

Storage (all on one device, moved by `to`):
    row_ptr    (num_nodes + 1,)  CSR offsets of each node's out-edges
    edge_token (num_edges,)      token of each edge, sorted by token inside a node
    edge_child (num_edges,)      child node of each edge
    edge_key   (num_edges,)      node * vocab_size + token (int64), globally sorted -> searchsorted
    depth      (num_nodes,)      number of tokens from the root
    leaf_title_index (num_nodes,) index into `titles_unique`, -1 for inner nodes
    node_item_count  (num_nodes,) number of catalogue items (not titles) below each node
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Sequence

import numpy as np
import torch

__all__ = ["ItemTrie"]


class ItemTrie:
    """Prefix tree over catalogue title token sequences; build with `ItemTrie.build`."""

    def __init__(
        self,
        *,
        vocab_size: int,
        row_ptr: torch.Tensor,
        edge_token: torch.Tensor,
        edge_child: torch.Tensor,
        edge_key: torch.Tensor,
        depth: torch.Tensor,
        leaf_title_index: torch.Tensor,
        leaf_node_of_title: torch.Tensor,
        incidence_item: torch.Tensor,
        incidence_node: torch.Tensor,
        titles_unique: list[str],
        title_items: list[list[int]],
        title_sequences: list[list[int]],
        item_ids: list[int],
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.row_ptr = row_ptr
        self.edge_token = edge_token
        self.edge_child = edge_child
        self.edge_key = edge_key
        self.depth = depth
        self.leaf_title_index = leaf_title_index
        self.leaf_node_of_title = leaf_node_of_title
        # (item position, node) pairs: node lies on the path root -> leaf of that item
        self.incidence_item = incidence_item
        self.incidence_node = incidence_node
        self.titles_unique = titles_unique
        self.title_items = title_items
        self.title_sequences = title_sequences
        self.item_ids = item_ids
        self.title_to_index = {t: i for i, t in enumerate(titles_unique)}
        self.num_nodes = int(depth.numel())
        self.num_edges = int(edge_token.numel())
        self.num_items = len(item_ids)
        self.max_depth = int(depth.max().item()) if self.num_nodes else 0
        self.node_item_count = torch.zeros(
            self.num_nodes, dtype=torch.long, device=depth.device
        ).index_add_(0, incidence_node, torch.ones_like(incidence_node))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        sequences: Sequence[Sequence[int]],
        titles: Sequence[str],
        item_ids: Sequence[int],
        vocab_size: int,
    ) -> "ItemTrie":
        """Build the trie.

        sequences[i] is the exact token-id sequence (ending with EOS) generated for the item with
        title titles[i] and id item_ids[i]. Items sharing a title must share the sequence and end
        at one leaf; different titles must have different sequences, and no sequence may be a
        proper prefix of another (EOS at the end guarantees that for ordinary tokenizations).
        """
        n = len(sequences)
        if len(titles) != n or len(item_ids) != n:
            raise ValueError(
                f"sequences, titles and item_ids must have equal lengths, got "
                f"{n}, {len(titles)}, {len(item_ids)}"
            )
        if n == 0:
            raise ValueError("cannot build an ItemTrie from an empty catalogue")
        vocab_size = int(vocab_size)
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")

        # --- group items by title, validate the title <-> sequence bijection
        title_to_index: dict[str, int] = {}
        titles_unique: list[str] = []
        title_sequences: list[tuple[int, ...]] = []
        title_items: list[list[int]] = []
        item_title_index: list[int] = []
        seq_to_title: dict[tuple[int, ...], str] = {}
        for i in range(n):
            title = titles[i]
            seq = tuple(map(int, sequences[i]))
            if not seq:
                raise ValueError(f"empty token sequence for item {item_ids[i]} (title {title!r})")
            ti = title_to_index.get(title)
            if ti is None:
                other = seq_to_title.get(seq)
                if other is not None:
                    raise ValueError(
                        f"different titles {other!r} and {title!r} have the same token sequence"
                    )
                ti = len(titles_unique)
                title_to_index[title] = ti
                titles_unique.append(title)
                title_sequences.append(seq)
                title_items.append([])
                seq_to_title[seq] = title
            elif title_sequences[ti] != seq:
                raise ValueError(
                    f"items with the same title {title!r} have different token sequences "
                    f"(item {item_ids[i]}: {list(seq)} vs {list(title_sequences[ti])})"
                )
            title_items[ti].append(int(item_ids[i]))
            item_title_index.append(ti)

        # --- distinct sequences in lexicographic order, as a padded (T, L) matrix (pad = -1).
        # Built with numpy (cheap single-threaded ops on ~1e5 elements), converted at the end.
        num_titles = len(titles_unique)
        order = np.array(sorted(range(num_titles), key=title_sequences.__getitem__), dtype=np.int64)
        lengths = np.fromiter((len(title_sequences[j]) for j in order), np.int64, num_titles)
        flat = np.fromiter(
            chain.from_iterable(title_sequences[j] for j in order), np.int64, int(lengths.sum())
        )
        bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
        if bad.size:
            pos = int(bad[0])
            j = int(order[np.searchsorted(np.cumsum(lengths), pos, side="right")])
            raise ValueError(
                f"token id {int(flat[pos])} of title {titles_unique[j]!r} "
                f"(items {title_items[j]}) is outside [0, {vocab_size})"
            )
        max_len = int(lengths.max())
        cols = np.arange(max_len, dtype=np.int64)
        valid = cols[None, :] < lengths[:, None]  # (T, L)
        padded = np.full((num_titles, max_len), -1, dtype=np.int64)
        padded[valid] = flat  # row-major fill matches the concatenation order

        # --- longest common prefix with the previous sequence; a sequence adds the nodes below
        # it, so numbering created positions row-major gives node ids in DFS pre-order.
        lcp = np.zeros(num_titles, dtype=np.int64)
        if num_titles > 1:
            same = (padded[1:] == padded[:-1]) & valid[1:] & valid[:-1]
            lcp[1:] = np.cumprod(same, axis=1).sum(1)
            is_prefix = np.flatnonzero(lcp[1:] == lengths[:-1])
            if is_prefix.size:
                r = int(is_prefix[0])
                raise ValueError(
                    f"the token sequence of title {titles_unique[order[r]]!r} is a proper prefix "
                    f"of that of {titles_unique[order[r + 1]]!r} (sequences must end with EOS)"
                )
        created = valid & (cols[None, :] >= lcp[:, None])
        num_nodes = int(created.sum()) + 1
        ids = np.zeros((num_titles, max_len), dtype=np.int64)
        ids[created] = np.arange(1, num_nodes, dtype=np.int64)
        # shared-prefix positions reuse the node of the row above; ids grow row by row, so a
        # running max down each column forward-fills them
        ids = np.maximum.accumulate(ids, axis=0)
        ids[~valid] = -1

        parent_ids = np.zeros_like(ids)
        parent_ids[:, 1:] = ids[:, :-1]
        node_parent = np.full(num_nodes, -1, dtype=np.int64)
        node_token = np.full(num_nodes, -1, dtype=np.int64)
        depth = np.zeros(num_nodes, dtype=np.int64)
        new_ids = ids[created]
        node_parent[new_ids] = parent_ids[created]
        node_token[new_ids] = padded[created]
        depth[new_ids] = np.broadcast_to(cols[None, :], ids.shape)[created] + 1

        leaf_sorted = ids[np.arange(num_titles), lengths - 1]
        leaf_node_of_title = np.empty(num_titles, dtype=np.int64)
        leaf_node_of_title[order] = leaf_sorted
        leaf_title = np.full(num_nodes, -1, dtype=np.int64)
        leaf_title[leaf_sorted] = order

        # --- CSR over edges parent -> child (one per non-root node), sorted by (parent, token)
        keys = node_parent[1:] * vocab_size + node_token[1:]
        perm = np.argsort(keys, kind="stable")
        keys = keys[perm]
        edge_child = perm + 1
        edge_token = node_token[1:][perm]
        counts = np.bincount(node_parent[1:], minlength=num_nodes)
        row_ptr = np.zeros(num_nodes + 1, dtype=np.int64)
        row_ptr[1:] = np.cumsum(counts)

        # --- (item, node) incidence: every node on the path root -> leaf of each item
        paths = np.concatenate([np.zeros((num_titles, 1), dtype=np.int64), ids], 1)
        row_of_title = np.empty(num_titles, dtype=np.int64)
        row_of_title[order] = np.arange(num_titles)
        item_paths = paths[row_of_title[np.asarray(item_title_index, dtype=np.int64)]]
        inc_item, col = np.nonzero(item_paths >= 0)
        inc_node = item_paths[inc_item, col]

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

        return cls(
            vocab_size=vocab_size,
            row_ptr=t(row_ptr),
            edge_token=t(edge_token),
            edge_child=t(edge_child),
            edge_key=t(keys),
            depth=t(depth),
            leaf_title_index=t(leaf_title),
            leaf_node_of_title=t(leaf_node_of_title),
            incidence_item=t(inc_item),
            incidence_node=t(inc_node),
            titles_unique=titles_unique,
            title_items=title_items,
            title_sequences=[list(s) for s in title_sequences],
            item_ids=[int(x) for x in item_ids],
        )

    # ------------------------------------------------------------------ device
    _TENSORS = (
        "row_ptr",
        "edge_token",
        "edge_child",
        "edge_key",
        "depth",
        "leaf_title_index",
        "leaf_node_of_title",
        "incidence_item",
        "incidence_node",
        "node_item_count",
    )

    @property
    def device(self) -> torch.device:
        return self.row_ptr.device

    def to(self, device: torch.device | str) -> "ItemTrie":
        """A shallow copy whose tensors live on `device` (Python lists are shared)."""
        out = copy.copy(self)
        for name in self._TENSORS:
            setattr(out, name, getattr(self, name).to(device))
        return out

    # ------------------------------------------------------------------ queries
    @staticmethod
    def _as_nodes(nodes: torch.Tensor) -> torch.Tensor:
        if nodes.dim() != 1:
            raise ValueError(f"nodes must be a 1-D LongTensor, got shape {tuple(nodes.shape)}")
        return nodes.long()

    def edges(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All out-edges of `nodes`, flattened: (row_index, token, child), each (num_out,).

        row_index[e] is the position in `nodes` whose node owns edge e; edges of one row are
        contiguous and sorted by token.
        """
        nodes = self._as_nodes(nodes).to(self.row_ptr.device)
        start = self.row_ptr[nodes]
        count = self.row_ptr[nodes + 1] - start
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), count)
        first = torch.cumsum(count, 0) - count  # offset of each row's first edge in the output
        offset = torch.arange(rows.numel(), device=nodes.device) - first[rows]
        idx = start[rows] + offset
        return rows, self.edge_token[idx], self.edge_child[idx]

    def allowed_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """(len(nodes), vocab_size) bool, True at the tokens that continue a catalogue title."""
        nodes = self._as_nodes(nodes)
        rows, tokens, _ = self.edges(nodes)
        mask = torch.zeros(nodes.numel(), self.vocab_size, dtype=torch.bool, device=rows.device)
        mask[rows, tokens] = True
        return mask

    def child(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child reached from nodes[i] by tokens[i]; -1 where that edge does not exist."""
        nodes = self._as_nodes(nodes).to(self.edge_key.device)
        tokens = tokens.long().to(nodes.device)
        if tokens.shape != nodes.shape:
            raise ValueError(
                f"nodes and tokens must have the same shape, got {tuple(nodes.shape)} "
                f"and {tuple(tokens.shape)}"
            )
        valid = (nodes >= 0) & (tokens >= 0) & (tokens < self.vocab_size)
        key = nodes * self.vocab_size + tokens
        idx = torch.searchsorted(self.edge_key, key).clamp_(max=max(self.num_edges - 1, 0))
        found = valid & (self.edge_key[idx] == key)
        return torch.where(found, self.edge_child[idx], torch.full_like(key, -1))

    @property
    def subtree_max_depth(self) -> torch.Tensor:
        """(num_nodes,) depth of the deepest leaf below each node: the longest completion it allows."""
        cached = getattr(self, "_subtree_max_depth", None)
        if cached is None or cached.device != self.depth.device:
            node_depth = self.depth[self.incidence_node]
            item_depth = torch.zeros(self.num_items, dtype=self.depth.dtype, device=self.depth.device)
            item_depth = item_depth.scatter_reduce(0, self.incidence_item, node_depth, "amax")
            cached = torch.zeros_like(self.depth).scatter_reduce(
                0, self.incidence_node, item_depth[self.incidence_item], "amax")
            self._subtree_max_depth = cached
        return cached

    def is_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        """True where the node ends a title (the node after EOS)."""
        nodes = self._as_nodes(nodes).to(self.leaf_title_index.device)
        return self.leaf_title_index[nodes] >= 0

    def subtree_sum(self, item_scores: torch.Tensor) -> torch.Tensor:
        """Sum item scores over every node's subtree.

        item_scores: (..., num_items), items in the order given to `build`.
        Returns (..., num_nodes); the root holds the total, a leaf the sum over its title's items.
        """
        if item_scores.shape[-1] != self.num_items:
            raise ValueError(
                f"item_scores last dim must be num_items={self.num_items}, "
                f"got {tuple(item_scores.shape)}"
            )
        inc_item = self.incidence_item.to(item_scores.device)
        inc_node = self.incidence_node.to(item_scores.device)
        out = item_scores.new_zeros(*item_scores.shape[:-1], self.num_nodes)
        return out.index_add_(-1, inc_node, item_scores.index_select(-1, inc_item))

    # ------------------------------------------------------------------ conveniences
    def title_of(self, node: int) -> str:
        """Title of a leaf node."""
        ti = int(self.leaf_title_index[node])
        if ti < 0:
            raise ValueError(f"node {node} is not a leaf")
        return self.titles_unique[ti]

    def titles_of(self, nodes: torch.Tensor) -> list[str | None]:
        """Title of each node, None for inner nodes."""
        idx = self.leaf_title_index[self._as_nodes(nodes).to(self.leaf_title_index.device)]
        return [self.titles_unique[i] if i >= 0 else None for i in idx.tolist()]

    def items_of(self, node: int) -> list[int]:
        """Catalogue item ids ending at a leaf node."""
        ti = int(self.leaf_title_index[node])
        if ti < 0:
            raise ValueError(f"node {node} is not a leaf")
        return list(self.title_items[ti])

    def sequences_of(self, titles: Sequence[str]) -> list[list[int]]:
        """Token sequence of each title (KeyError naming an unknown title)."""
        out = []
        for t in titles:
            ti = self.title_to_index.get(t)
            if ti is None:
                raise KeyError(f"title {t!r} is not in the catalogue trie")
            out.append(list(self.title_sequences[ti]))
        return out

    def __repr__(self) -> str:
        return (
            f"ItemTrie(items={self.num_items}, titles={len(self.titles_unique)}, "
            f"nodes={self.num_nodes}, edges={self.num_edges}, max_depth={self.max_depth}, "
            f"vocab_size={self.vocab_size}, device={self.device})"
        )
