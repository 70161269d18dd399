"""Catalogue-constrained beam search on the shared prompt KV cache.

Written by hand because no maintained decoder does this efficiently: Hugging Face `generate` with a
`prefix_allowed_tokens_fn` calls Python once per beam per step and the reference hashes token prefixes
into a dict.  Here every step is a handful of tensor operations over all beams of all users:

* the prompt is prefilled once per user and the latent thought(s) computed once; the beams share that
  prompt KV (kept once per user, never repeated K times): each step's attention (`_beam_attention`,
  registered with transformers' AttentionInterface for the beam steps only) scores the K beams of a
  user against it in one matmul and against their own generated KV, which sits in a preallocated
  buffer written in place (no torch.cat per step, and a beam reorder copies the generated part only);
* the trie (CSR tensors) gives each live beam's out-edges (a dead beam sits on a leaf: no edges); the
  candidates' scores, sum + logit - logsumexp, are ranked per user over the edges alone (no
  (beams, vocab) candidate matrix); the edge gives the child node directly (no trie look-up);
* step 1 scores the single root beam per user from the prefill's logits, so the beam cache is built
  from the chosen candidates' users rather than repeated and then reordered;
* a candidate that takes the EOS edge reaches a leaf = a finished title; finished titles go to a
  per-user pool of the best `top_k`, the others become the next beams;
* a user is finished when its pool is full and no live beam can still beat the pool's worst entry
  (exact: scores only fall as a title grows, see `_upper_bound`), or when it has no live beam; its
  rows then leave the batch and the KV cache, so the remaining steps only run unfinished users.

Scores are sum(log p) / length ** length_penalty, length = generated tokens including EOS
(length_penalty 1 = BIGRec / the paper, 0 = plain sum as in D3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..model.latent_lm import LatentR3Model
from .trie import ItemTrie

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    titles: list[list[str]]        # per user, best first, distinct catalogue titles
    scores: list[list[float]]      # matching normalised scores
    title_index: torch.Tensor      # (B, top_k) index into trie.titles_unique, -1 where fewer were found


def _normalise(sums: torch.Tensor, length: int | torch.Tensor, length_penalty: float) -> torch.Tensor:
    if length_penalty == 0:
        return sums
    return sums / (torch.as_tensor(length, dtype=sums.dtype, device=sums.device) ** length_penalty)


def _upper_bound(sums: torch.Tensor, max_final_len: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """The best normalised score any completion of a live beam can reach (exact, not a heuristic).

    Log-probs are <= 0, so a beam's sum s only falls; with a length penalty p > 0 a completion scores
    (s + x) / L**p with x <= 0 and L at most the deepest title below the beam's trie node, so at most
    s / max_final_len**p.
    """
    return _normalise(sums, max_final_len.to(sums.dtype), length_penalty)


class _BeamKV(DynamicLayer):
    """One layer's KV cache for the beams: the prompt part once per user, the generated part per beam.

    Rows are user-major (row u * K + k).  The prompt (+ latents) keys/values are kept once per user,
    (U, H, P, D), never repeated for the K beams; the generated tokens live in a per-beam buffer
    (U * K, H, capacity, D) written in place.  `update` returns the generated part only;
    `_beam_attention` attends over both (one softmax over prompt + generated positions).  A beam step
    permutes rows only inside a user, so it reorders the generated part alone; when users leave the
    batch, both parts are compacted.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prompt_mask: torch.Tensor,
                 users: torch.Tensor, beams: int, capacity: int):
        super().__init__()
        self.prompt_keys, self.prompt_values = keys[users], values[users]      # (U, H, P, D)
        self.prompt_mask = prompt_mask[users].bool()                          # (U, P)
        self.beams, self.t = beams, 0
        shape = (users.numel() * beams, keys.shape[1], capacity, keys.shape[-1])
        self.k_buf, self.v_buf = keys.new_empty(shape), values.new_empty(shape)
        self.is_initialized = True
        self.keys = self.values = None  # unused; the buffers are the storage

    def update(self, key_states, value_states, *args, **kwargs):
        s = key_states.shape[-2]
        self.k_buf[:, :, self.t: self.t + s] = key_states
        self.v_buf[:, :, self.t: self.t + s] = value_states
        self.t += s
        return self.k_buf[:, :, : self.t], self.v_buf[:, :, : self.t]

    def get_seq_length(self) -> int:
        return self.prompt_mask.shape[1] + self.t

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reorder_within_users(self, rows: torch.Tensor) -> None:
        if self.t:
            self.k_buf[:, :, : self.t] = self.k_buf[rows, :, : self.t]
            self.v_buf[:, :, : self.t] = self.v_buf[rows, :, : self.t]

    def select(self, users: torch.Tensor, rows: torch.Tensor) -> None:
        """Keep `users` (indices into the current users) and the beam rows `rows` (theirs)."""
        self.prompt_keys, self.prompt_values = self.prompt_keys[users], self.prompt_values[users]
        self.prompt_mask = self.prompt_mask[users]
        self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]


_ACTIVE_LAYERS: list | None = None   # the _BeamKV layers of the search in progress (set around forwards)
_BEAM_ATTENTION = "latentr3_beam"


def _beam_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per beam row over its user's shared prompt KV + its own generated KV.

    query (R, Hq, 1, D), key/value (R, Hk, t, D) (the generated part from `_BeamKV.update`).  The
    prompt logits are computed once per user for all its K beams: (U, H, K, P) against (U, H, P, D).
    """
    layer = _ACTIVE_LAYERS[module.layer_idx]
    pk, pv, pmask, K = layer.prompt_keys, layer.prompt_values, layer.prompt_mask, layer.beams
    R, Hq, _, D = query.shape
    U, Hk = pk.shape[0], pk.shape[1]
    if Hq != Hk:  # grouped-query attention
        g = Hq // Hk
        pk, pv = pk.repeat_interleave(g, 1), pv.repeat_interleave(g, 1)
        key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scaling = D ** -0.5 if scaling is None else scaling
    q = query.view(U, K, Hq, D).transpose(1, 2)                                # (U, H, K, D)
    s_prompt = torch.matmul(q, pk.transpose(-1, -2)).mul_(scaling)              # (U, H, K, P)
    s_prompt.masked_fill_(~pmask[:, None, None, :], NEG_INF)
    s_gen = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)            # (R, H, 1, t)
    s_gen = s_gen.view(U, K, Hq, -1).transpose(1, 2)                            # (U, H, K, t)
    P = s_prompt.shape[-1]
    w = torch.cat([s_prompt, s_gen], -1).softmax(-1)
    out = torch.matmul(w[..., :P], pv)                                          # (U, H, K, D)
    w_gen = w[..., P:].transpose(1, 2).reshape(R, Hq, 1, -1)
    out = out.transpose(1, 2).reshape(R, Hq, 1, D) + torch.matmul(w_gen, value)  # (R, H, 1, D)
    return out.transpose(1, 2), None                                            # (R, 1, H, D)


def _register_beam_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_BEAM_ATTENTION, _beam_attention)
    AttentionMaskInterface.register(_BEAM_ATTENTION, lambda *args, **kwargs: None)  # the prompt mask is ours


def _user_topk(scores: torch.Tensor, user: torch.Tensor, num_users: int, k: int):
    """Per-user top-k over a flat list of candidates grouped by user (contiguous, user-sorted).

    Returns (values (U, k), candidate index (U, k)); -inf / an arbitrary index where a user has fewer.
    """
    counts = torch.bincount(user, minlength=num_users)
    first = torch.cumsum(counts, 0) - counts
    width = max(int(counts.max()) if user.numel() else 0, k)
    mat = scores.new_full((num_users, width), NEG_INF)
    col = torch.arange(user.numel(), device=user.device) - first[user]
    mat[user, col] = scores
    val, idx = mat.topk(k, dim=1)
    return val, (first[:, None] + idx).clamp_(max=max(user.numel() - 1, 0))


@torch.no_grad()
def constrained_beam_search(model: LatentR3Model, trie: ItemTrie, prompt_ids: torch.Tensor,
                            prompt_mask: torch.Tensor, num_beams: int = 10, top_k: int = 10,
                            length_penalty: float = 1.0, assistant=None) -> BeamResult:
    """Top-k distinct catalogue titles per user; `assistant` (decoding.assistant.AssistantScores, rows in
    prompt order) adds weight * log(subtree mass of child / of parent) to every candidate edge (D3)."""
    if assistant is not None and assistant.weight == 0:
        assistant = None
    B, K, V = prompt_ids.shape[0], num_beams, trie.vocab_size
    device = prompt_ids.device
    prefix = model.think(model.prefill(prompt_ids, prompt_mask))
    cache = prefix.cache
    logits = prefix.last_logits                                            # (U*k, V'), k = 1 at step 1
    embed = model.backbone.get_input_embeddings()
    leaf_depth = trie.subtree_max_depth                                    # (num_nodes,)
    # A beam with nothing left to extend sits on a leaf: a leaf has no out-edges, so no candidates.
    dead = int(trie.leaf_node_of_title[0])

    # Live users are compacted: rows of finished users leave the batch and the KV cache.
    users = torch.arange(B, device=device)                                 # (U,) original index
    nodes = torch.zeros(B, dtype=torch.long, device=device)                # step 1: one beam (root) per user
    sums = torch.zeros(B, 1, device=device)
    pool_scores = torch.full((B, top_k), NEG_INF, device=device)
    pool_titles = torch.full((B, top_k), -1, dtype=torch.long, device=device)
    prompt_attention = prefix.attention_mask
    _register_beam_attention()
    base_pos = prefix.next_position                                        # (U,) position of t_1
    prefix = None

    for step in range(1, trie.max_depth + 1):
        U, k_cur = sums.shape
        lse = torch.logsumexp(logits[:, :V].float(), dim=-1)               # (U*k,)
        rows, tokens, kids = trie.edges(nodes)                             # rows sorted: user-major
        cand = sums.view(-1)[rows] + (logits[rows, tokens].float() - lse[rows])
        if assistant is not None:   # text-free scores of the edges, gathered per (user, node)
            cand = cand + assistant.edge_scores(users[torch.div(rows, k_cur, rounding_mode="floor")],
                                                nodes[rows], kids)
        top_val, e = _user_topk(cand, torch.div(rows, k_cur, rounding_mode="floor"), U, 2 * K)  # (U, 2K)
        alive = top_val > NEG_INF
        src, token, child = rows[e], tokens[e], kids[e]                    # src: row in the current batch
        leaf = (trie.leaf_title_index[child] >= 0) & alive

        # finished titles -> the user's pool of the best top_k
        fin_scores = torch.where(leaf, _normalise(top_val, step, length_penalty), NEG_INF)
        fin_titles = torch.where(leaf, trie.leaf_title_index[child], -1)
        merged_s = torch.cat([pool_scores[users], fin_scores], 1)
        merged_t = torch.cat([pool_titles[users], fin_titles], 1)
        best_s, order = merged_s.topk(top_k, dim=1)
        pool_scores[users] = best_s
        pool_titles[users] = merged_t.gather(1, order)

        # unfinished candidates -> next beams
        sums, pick = torch.where(leaf | ~alive, NEG_INF, top_val).topk(K, dim=1)   # (U, K)
        live = sums > NEG_INF
        next_nodes = torch.where(live, child.gather(1, pick), dead)
        next_tokens = torch.where(live, token.gather(1, pick), 0)
        # a dead beam still needs a row of its own user: the prompt part of the cache is never re-copied
        pick_src = torch.where(live, src.gather(1, pick), torch.arange(U, device=device)[:, None] * k_cur)

        # a user is done when its pool is full and no live beam can still enter it
        bound = _upper_bound(sums, leaf_depth[next_nodes], length_penalty).masked_fill(~live, NEG_INF)
        best_bound = bound.max(dim=1).values
        pool_full = best_s[:, -1] > NEG_INF
        keep = live.any(dim=1) & (~pool_full | (best_bound > best_s[:, -1]))
        n_keep = int(keep.sum())
        if n_keep == 0:
            break
        all_kept = n_keep == U
        if not all_kept:
            users, sums, next_nodes, next_tokens, pick_src = (
                users[keep], sums[keep], next_nodes[keep], next_tokens[keep], pick_src[keep])
            base_pos = base_pos[keep]
        nodes, flat = next_nodes.view(-1), pick_src.view(-1)
        if step == 1:   # the beams' cache (rows of the prefix = users here)
            kept_users = torch.nonzero(keep).view(-1) if not all_kept else torch.arange(U, device=device)
            cache.layers = [_BeamKV(layer.keys, layer.values, prompt_attention, kept_users, K, trie.max_depth)
                            for layer in cache.layers]
        elif all_kept:
            for layer in cache.layers:
                layer.reorder_within_users(flat)
        else:
            kept_users = torch.nonzero(keep).view(-1)
            for layer in cache.layers:
                layer.select(kept_users, flat)
        R = flat.numel()
        pos = (base_pos + (step - 1)).repeat_interleave(K)[:, None]
        global _ACTIVE_LAYERS
        config = model.backbone.config
        saved, _ACTIVE_LAYERS = config._attn_implementation, cache.layers
        config._attn_implementation = _BEAM_ATTENTION
        try:
            step_logits, _, _ = model._run(embed(next_tokens.view(R, 1)).to(model.embed_dtype), None, pos, cache,
                                           logits_to_keep=1, hidden=False)
        finally:
            config._attn_implementation, _ACTIVE_LAYERS = saved, None
        logits = step_logits[:, -1]

    titles, scores = [], []
    for b in range(B):
        found = pool_titles[b] >= 0
        titles.append([trie.titles_unique[i] for i in pool_titles[b][found].tolist()])
        scores.append(pool_scores[b][found].tolist())
    return BeamResult(titles, scores, pool_titles)
