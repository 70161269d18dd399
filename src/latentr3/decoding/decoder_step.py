"""One beam-search step (one new token per beam) through a Llama-family decoder, without HF's model wrapper.

Why by hand: a step should run only the beam rows that are alive (right after a user starts, 9 of its 10
beams are empty; a third of all rows at the CDs benchmark shape), while the attention needs every row in
the user-major layout of `BeamKV`.  The backbone's forward runs whatever rows it is given, so this step
calls the backbone's own sub-modules (projections, MLP, rotary embedding, norms, LM head: the
checkpoint's weights and, under peft, its LoRA layers) on the live rows and does only the glue itself:

* the attention of the new token over its user's prompt KV and its beam's own generated KV
  (`attend_beams`, one fused SDPA call per layer, no key/value heads repeated for grouped-query
  attention), with the dead rows' queries set to zero;
* the K/V written straight into the `BeamKV` buffers;
* RMSNorm through `torch.nn.functional.rms_norm` for fp32 models (other dtypes call the backbone's own
  norm module so the rounding matches training).

It also skips HF's per-call plumbing (output capturing, mask construction, attention dispatch): 143k ->
63k Python calls per benchmark round, a small share of the time at the tiny CPU shape.

Supported: decoders laid out as Llama (Llama, Mistral without sliding window, Qwen2/Qwen2.5, Qwen3 with
its q/k norms, SmolLM).  `LlamaFamilyStep.supports(backbone)` says whether a backbone qualifies; beam
search falls back to the backbone's own forward for anything else.  tests/test_decoding.py checks this
step's logits against the backbone's forward and the beam search results of both paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def _base_model(backbone):
    """The HF *ForCausalLM under a peft wrapper (if any)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaFamilyStep:
    """Logits of one new token per beam row, given the beam KV cache (`beam_search.BeamKV` per layer)."""

    def __init__(self, backbone):
        base = _base_model(backbone)
        self.model = base.model
        self.lm_head = base.get_output_embeddings()
        self.layers = list(self.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.fp32 = self.lm_head.weight.dtype == torch.float32

    @staticmethod
    def supports(backbone) -> bool:
        base = _base_model(backbone)
        model = getattr(base, "model", None)
        config = getattr(base, "config", None)
        if config is None or model is None or getattr(config, "model_type", None) not in _SUPPORTED_MODEL_TYPES:
            return False
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]):
            return False   # sliding-window layers
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if not all(hasattr(model, n) for n in needed) or base.get_output_embeddings() is None:
            return False
        for layer in model.layers:
            attn = layer.self_attn
            if getattr(attn, "sliding_window", None) or not all(
                    hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                return False
            if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
                return False
        return True

    def _norm(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module(x)

    runs_row_subset = True   # the driver may pass only the live beam rows

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, num_rows: int,
                 cache) -> torch.Tensor:
        """Logits (L, V) of `tokens` (L,) at `positions` (L,), fed to the beam rows `rows` (L,) of `num_rows`.

        Only those rows run the projections, MLP and LM head (dead beams are skipped: right after a user is
        admitted all but one of its beams are); each writes its K/V at its slot in `cache.layers`.
        """
        L, R, Dh = tokens.shape[0], num_rows, self.head_dim
        x = self.model.embed_tokens(tokens)                                                   # (L, D)
        cos, sin = self.model.rotary_emb(x, positions[:, None])                               # (L, 1, Dh)
        for layer, kv in zip(self.layers, cache.layers):
            attn = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = attn.q_proj(h).view(L, -1, Dh)
            k = attn.k_proj(h).view(L, -1, Dh)
            v = attn.v_proj(h).view(L, -1, Dh)
            if hasattr(attn, "q_norm"):   # Qwen3: per-head RMSNorm before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            qk = torch.cat([q, k], 1)     # one rotation for both
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk[:, : q.shape[1]], qk[:, q.shape[1]:]
            keys, values = kv.update(k[:, :, None], v[:, :, None])                           # (U, Hk, S, Dh)
            # attention runs on the user-major layout of all R rows (a dead row's query is 0, its output unused)
            q_all = q if L == R else q.new_zeros(R, *q.shape[1:]).index_copy_(0, rows, q)
            a = attend_beams(q_all, keys, values, kv.mask, self.scaling)
            x = x + attn.o_proj((a if L == R else a[rows]).to(x.dtype))
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return self.lm_head(self._norm(self.model.norm, x))
