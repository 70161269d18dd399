"""Catalogue-constrained beam search on the shared prompt KV cache.

Written by hand because no maintained decoder does this efficiently: Hugging Face `generate` with a
`prefix_allowed_tokens_fn` calls Python once per beam per step and the reference hashes token prefixes
into a dict.  Here every step is a handful of tensor operations over all beams of all users:

* the prompt is prefilled once per user and the latent thought(s) computed once, then the cache is
  repeated for the beams;
* the trie (CSR tensors) gives each beam's allowed edges; candidate scores are scattered into a
  (users, beams x vocab) matrix whose size is bounded by the batch, not by the number of steps;
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


@torch.no_grad()
def constrained_beam_search(model: LatentR3Model, trie: ItemTrie, prompt_ids: torch.Tensor,
                            prompt_mask: torch.Tensor, num_beams: int = 10, top_k: int = 10,
                            length_penalty: float = 1.0) -> BeamResult:
    B, K, V = prompt_ids.shape[0], num_beams, trie.vocab_size
    device = prompt_ids.device
    prefix = model.think(model.prefill(prompt_ids, prompt_mask))
    prefix.hidden = None  # not needed past the latents; don't copy it per beam
    prefix = prefix.repeat_interleave(K)
    logits = prefix.last_logits                                            # (U*K, V')
    embed = model.backbone.get_input_embeddings()
    leaf_depth = trie.subtree_max_depth                                    # (num_nodes,)

    # Live users are compacted: rows of finished users leave the batch and the KV cache.
    users = torch.arange(B, device=device)                                 # (U,) original index
    nodes = torch.zeros(B * K, dtype=torch.long, device=device)            # root
    sums = torch.full((B, K), NEG_INF, device=device)
    sums[:, 0] = 0.0                                                       # one live beam to start
    pool_scores = torch.full((B, top_k), NEG_INF, device=device)
    pool_titles = torch.full((B, top_k), -1, dtype=torch.long, device=device)

    for step in range(1, trie.max_depth + 1):
        U = users.numel()
        logp = torch.log_softmax(logits[:, :V].float(), dim=-1)             # (U*K, V)
        rows, tokens, _ = trie.edges(nodes)
        cand = torch.full((U * K, V), NEG_INF, device=device)
        cand[rows, tokens] = sums.view(-1)[rows] + logp[rows, tokens]
        top_val, top_idx = cand.view(U, K * V).topk(min(2 * K, K * V), dim=1)  # (U, 2K)
        src = (top_idx // V + torch.arange(U, device=device)[:, None] * K)  # flat beam of each candidate
        token = top_idx % V
        child = trie.child(nodes[src.view(-1)], token.view(-1)).view(U, -1)
        alive = top_val > NEG_INF
        leaf = trie.is_leaf(child.clamp(min=0).view(-1)).view(U, -1) & alive

        # finished titles -> the user's pool of the best top_k
        fin_scores = torch.where(leaf, _normalise(top_val, step, length_penalty), NEG_INF)
        fin_titles = torch.where(leaf, trie.leaf_title_index[child.clamp(min=0)], -1)
        merged_s = torch.cat([pool_scores[users], fin_scores], 1)
        merged_t = torch.cat([pool_titles[users], fin_titles], 1)
        best_s, order = merged_s.topk(top_k, dim=1)
        pool_scores[users] = best_s
        pool_titles[users] = merged_t.gather(1, order)

        # unfinished candidates -> next beams
        sums, pick = torch.where(leaf | ~alive, NEG_INF, top_val).topk(K, dim=1)   # (U, K)
        live = sums > NEG_INF
        next_nodes = torch.where(live, child.gather(1, pick), 0)
        next_tokens = torch.where(live, token.gather(1, pick), 0)
        pick_src = src.gather(1, pick)

        # a user is done when its pool is full and no live beam can still enter it
        bound = _upper_bound(sums, leaf_depth[next_nodes], length_penalty).masked_fill(~live, NEG_INF)
        best_bound = bound.max(dim=1).values
        pool_full = best_s[:, -1] > NEG_INF
        keep = live.any(dim=1) & (~pool_full | (best_bound > best_s[:, -1]))
        if not bool(keep.any()):
            break
        users, sums = users[keep], sums[keep]
        nodes = next_nodes[keep].view(-1)
        flat = pick_src[keep].view(-1)
        prefix.cache.reorder_cache(flat)
        prefix.attention_mask, prefix.positions = prefix.attention_mask[flat], prefix.positions[flat]
        prefix, step_logits = model.append(prefix, embed(next_tokens[keep].view(-1, 1)), logits_to_keep=1,
                                           keep_hidden=False)
        logits = step_logits[:, -1]

    titles, scores = [], []
    for b in range(B):
        found = pool_titles[b] >= 0
        titles.append([trie.titles_unique[i] for i in pool_titles[b][found].tolist()])
        scores.append(pool_scores[b][found].tolist())
    return BeamResult(titles, scores, pool_titles)
