"""One beam-search step (one new token per beam) through a Llama-family decoder, without HF's model wrapper.

Why by hand: a step should run only the beam rows that are alive (right after a user starts, 9 of its 10
beams are empty; a third of all rows at the CDs benchmark shape), while the attention needs every row in
the user-major layout of `BeamKV`.  The backbone's forward runs whatever rows it is given, so this step
runs the backbone's own sub-modules on the live rows through `model.llama_family.LlamaFamily` (the layer
loop: projections, rotary embedding, norms, MLP, LM head, under peft their LoRA layers) and supplies
only the attention:

* the attention of the new token over its user's prompt KV and its beam's own generated KV
  (`attend_beams`, one fused SDPA call per layer, no key/value heads repeated for grouped-query
  attention), with the dead rows' queries set to zero;
* the K/V written straight into the `BeamKV` buffers.

It also skips HF's per-call plumbing (output capturing, mask construction, attention dispatch): 143k ->
63k Python calls per benchmark round, a small share of the time at the tiny CPU shape.

`LlamaFamilyStep.supports(backbone)` says whether a backbone qualifies (see `LlamaFamily`); beam search
falls back to the backbone's own forward for anything else.  tests/test_decoding.py checks this step's
logits against the backbone's forward and the beam search results of both paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.llama_family import LlamaFamily


def attend_beams(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """Attention of one new token per beam over its user's prompt and its own generated tokens.

    query (R, Hq, D), R = U * K beam rows, user-major; keys/values (U, Hk, S, D): each user's prompt KV
    (once, shared by its K beams) followed by the generated KV of all its beams (`BeamKV`); mask
    (U, 1, K, S) additive, 0 where beam k may read.  One fused SDPA call: the K beams of a user are its
    K queries, grouped-query heads are left to SDPA (no repeated keys).  Returns (R, Hq * D).
    """
    R, Hq, D = query.shape
    U = keys.shape[0]
    q = query.view(U, R // U, Hq, D).transpose(1, 2)                                      # (U, Hq, K, D)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype), scale=scaling,
                                         enable_gqa=Hq != keys.shape[1])
    return out.transpose(1, 2).reshape(R, Hq * D)


class LlamaFamilyStep(LlamaFamily):
    """Logits of one new token per beam row, given the beam KV cache (`beam_search.BeamKV` per layer)."""

    runs_row_subset = True   # the driver may pass only the live beam rows

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, num_rows: int,
                 cache) -> torch.Tensor:
        """Logits (L, V) of `tokens` (L,) at `positions` (L,), fed to the beam rows `rows` (L,) of `num_rows`.

        Only those rows run the projections, MLP and LM head (dead beams are skipped: right after a user is
        admitted all but one of its beams are); each writes its K/V at its slot in `cache.layers`.
        """
        L, R = tokens.shape[0], num_rows

        def attend(i, q, k, v):
            kv = cache.layers[i]
            keys, values = kv.update(k[:, :, None], v[:, :, None])                           # (U, Hk, S, Dh)
            # attention runs on the user-major layout of all R rows (a dead row's query is 0, its output unused)
            q_all = q if L == R else q.new_zeros(R, *q.shape[1:]).index_copy_(0, rows, q)
            a = attend_beams(q_all, keys, values, kv.mask, self.scaling)
            return a if L == R else a[rows]

        return self.run(self.model.embed_tokens(tokens), positions, attend)
