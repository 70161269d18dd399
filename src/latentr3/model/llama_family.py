"""A Llama-family decoder run through its own sub-modules, with the attention supplied by the caller.

Why by hand: the hot paths need an attention that a backbone's forward cannot express without repeating
KV or computing the padding, and all are cheaper without HF's per-call plumbing (output capturing, mask
construction, attention dispatch):

* training, prefill and append without the padding (`packed_pass`, used by `LatentR3Model.forward`,
  `prefill`, `append`): projections, MLP, norms and LM head run on the real tokens only, the attention
  on the padded layout.  A batch is padded to its longest prompt and longest target: on SmolLM2-135M
  (short template, micro-batch 16, CDs rows, random batches) 60 % of the positions were real, and a full
  fine-tuning step went from 0.78 to 1.30 samples/s (bench_sft.py, 2 threads; 1.3x on length-grouped
  batches);

* a beam-search step (`decoding.decoder_step.LlamaFamilyStep`, eager and static-shape): one new token per live beam row,
  attending to its user's prompt KV (kept once) and its own beam's generated KV;
* the G latent samples of a GRPO prompt (`grouped_continuations`): each sample's latent + target tokens
  attend to the prompt's KV (kept once, never repeated G times) and to its own earlier tokens.

`LlamaFamily.run` does the layer loop with the checkpoint's projections, MLP, rotary embedding, norms and
LM head (under peft, their LoRA layers); the caller's `attend(layer_index, q, k, v)` returns the attention
output.  RMSNorm goes through `torch.nn.functional.rms_norm` for fp32 models (other dtypes call the
backbone's own norm module so the rounding matches training).

Supported: decoders laid out as Llama (Llama, Mistral without sliding window, Qwen2/Qwen2.5, Qwen3 with
its q/k norms, SmolLM).  `LlamaFamily.supports(backbone)` says whether a backbone qualifies; callers fall
back to the backbone's own forward for anything else.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

_SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def base_model(backbone):
    """The HF *ForCausalLM under a peft wrapper (if any)."""
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (inverse: its transpose, for the backward) without the concatenations:
    (x1, x2) -> (x1 c1 - x2 s1, x2 c2 + x1 s2), or for the transpose (x1 c1 + x2 s2, x2 c2 - x1 s1)."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., h:] if inverse else sin[..., :h], value=1 if inverse else -1)
    out[..., h:].addcmul_(x[..., :h], sin[..., :h] if inverse else sin[..., h:], value=-1 if inverse else 1)
    return out


class _Rotary(torch.autograd.Function):
    """The rotary embedding of queries and keys as one autograd node.

    Why by hand: as tensor ops (a cat for q and k, rotate_half's negation and cat, two products and a sum)
    autograd saves and replays every step, and each slice's backward zero-fills a full-size gradient.
    The rotation is linear in x, so its backward is the transposed rotation of the incoming gradient:
    three passes per tensor each way.  Measured on SmolLM2-135M SFT: see benchmarks/bench_sft.py.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        return (None if gq is None else _rotate(gq, cos, sin, True),
                None if gk is None else _rotate(gk, cos, sin, True), None, None)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated queries (L, Hq, Dh) and keys (L, Hk, Dh) at the angles cos / sin (L, 1, Dh) of HF's rotary
    embedding: each is x * cos + rotate_half(x) * sin."""
    return _Rotary.apply(q, k, cos, sin)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm y = x / rms(x) * w (fp32) as one autograd node.

    Why by hand: with gradients on, `F.rms_norm` on the CPU records its pieces (square, mean, add, rsqrt,
    two products) and autograd replays them one by one, about ten full-size passes and their buffers per
    backward.  With x^ = x / rms(x) saved, the backward is gx = (g w - x^ mean(g w x^)) / rms(x) and
    gw = sum(g x^): seven passes, and the forward three.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, weight = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * xhat).reshape(-1, g.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gxhat = g * weight
            m = (gxhat * xhat).mean(-1, keepdim=True)
            gx = gxhat.addcmul_(xhat, m, value=-1).mul_(rstd)
        return gx, gw, None


class _Projections(torch.autograd.Function):
    """Linear maps (W_i, b_i) of one input x as one autograd node: y_i = x W_i^T + b_i.

    Why by hand: autograd gives each projection its own node, so the input's gradient is the sum of
    separate products (q, k and v; gate and up), added in further full-size passes, and a weight used by
    two passes of one step (prompt, then latent + target) gets two full-size gradients that the engine
    adds.  Here gx = g_1 W_1 + g_2 W_2 + ... accumulates in the matrix products (`addmm_`, beta 1), and
    within `LlamaFamily.one_weight_grad()` the weight gradients of all its passes are summed the same way
    (`_WeightGrads`).  Measured on SmolLM2-135M (full fine-tuning, micro-batch 16, short template, CDs rows,
    2 threads): 1.012x the separate modules over 16 paired steps (median 1.02x, 0.97-1.06x by step).
    """

    @staticmethod
    def forward(ctx, x, sums, n, *params):
        ws, bs = params[:n], params[n:]
        ctx.sums, ctx.n = sums, n
        ctx.keys = [None if p is None else id(p) for p in params]
        ctx.save_for_backward(x, *ws)
        if sums is not None:
            for p in params:
                if p is not None and p.requires_grad:
                    sums.expect(p)
        return tuple(F.linear(x, w, b) for w, b in zip(ws, bs))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gs):
        x, *ws = ctx.saved_tensors
        n, sums, need = ctx.n, ctx.sums, ctx.needs_input_grad
        gx = None
        if need[0]:
            for g, w in zip(gs, ws):
                gx = g @ w if gx is None else gx.addmm_(g, w)
        grads = [None] * (2 * n)
        for i, g in enumerate(gs):
            if need[3 + i]:
                grads[i] = _WeightGrads.add(sums, ctx.keys[i], lambda: g.t() @ x, lambda t: t.addmm_(g.t(), x))
            if ctx.keys[n + i] is not None and need[3 + n + i]:
                grads[n + i] = _WeightGrads.add(sums, ctx.keys[n + i], lambda: g.sum(0), lambda t: t.add_(g.sum(0)))
        return (gx, None, None, *grads)


class _WeightGrads:
    """One gradient tensor per parameter for all the passes of a `LlamaFamily.one_weight_grad()` block.

    The first reached use of a parameter returns a new gradient tensor; later uses add their products into
    it in place and return None.  Correct whichever uses are reached (a pass whose output the loss ignores
    never runs its backward): the engine hands a parameter's gradient to its AccumulateGrad only after
    every reached use has run, and nothing else in the block touches these parameters.  The count of uses
    made in the forward only decides when this object lets go of the tensor, so that AccumulateGrad can
    take it as .grad without a copy.
    """

    def __init__(self):
        self.uses: dict[int, int] = {}
        self.grads: dict[int, torch.Tensor] = {}

    def expect(self, p: torch.Tensor) -> None:
        self.uses[id(p)] = self.uses.get(id(p), 0) + 1

    @staticmethod
    def add(sums: "_WeightGrads | None", key: int, new, add_into):
        if sums is None:
            return new()
        sums.uses[key] -= 1
        last = sums.uses[key] == 0
        t = sums.grads.pop(key, None) if last else sums.grads.get(key)
        if t is not None:
            add_into(t)
            return None
        t = new()
        if not last:
            sums.grads[key] = t
        return t


class LlamaFamily:
    """The layer loop of a Llama-family backbone over a flat list of new tokens."""

    def __init__(self, backbone):
        base = base_model(backbone)
        self.model = base.model
        self.lm_head = base.get_output_embeddings()
        self.layers = list(self.model.layers)
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.fp32 = self.lm_head.weight.dtype == torch.float32
        self._grad_sums: _WeightGrads | None = None

    @contextlib.contextmanager
    def one_weight_grad(self):
        """Within the block, every pass's projections add into one gradient tensor per weight (see
        `_Projections`).  The passes' backward may run after the block has closed."""
        outer, self._grad_sums = self._grad_sums, _WeightGrads()
        try:
            yield
        finally:
            self._grad_sums = outer

    def project(self, x: torch.Tensor, modules) -> list[torch.Tensor]:
        """[m(x) for m in modules] for (L, D) inputs; one `_Projections` node when training plain fp32
        `nn.Linear`s (not under peft's LoRA layers, autocast or an inference pass, where the modules run).
        Frozen weights (GRPO) run the modules too: with no weight gradient the node saves only the input
        gradient's adds, and at GRPO's small shapes its Python cost outweighed that (0.98x, tiny model,
        2 prompts x 8 samples, 10 paired rounds)."""
        if not (self.fp32 and x.dtype == torch.float32 and x.dim() == 2 and torch.is_grad_enabled()
                and not torch.is_autocast_enabled(x.device.type)
                and all(type(m) is torch.nn.Linear for m in modules)
                and any(m.weight.requires_grad for m in modules)):
            return [m(x) for m in modules]
        params = [m.weight for m in modules] + [m.bias for m in modules]
        return list(_Projections.apply(x, self._grad_sums, len(modules), *params))

    def mlp(self, module, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP down(act(gate(x)) * up(x)), gate and up as one projection."""
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return module(x)
        g, u = self.project(x, (module.gate_proj, module.up_proj))
        return self.project(module.act_fn(g) * u, (module.down_proj,))[0]

    @staticmethod
    def supports(backbone) -> bool:
        base = base_model(backbone)
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

    def norm(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and x.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
                return _RMSNorm.apply(x, module.weight, module.variance_epsilon)
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module(x)

    def run(self, x: torch.Tensor, positions: torch.Tensor,
            attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Logits (L, V) of the new tokens' input embeddings `x` (L, D) at `positions` (L,).

        `attend(i, q, k, v)` gets layer i's rotated queries (L, Hq, Dh), keys and values (L, Hk, Dh) and
        returns the attention output (L, Hq * Dh).
        """
        return self.lm_head(self.hidden(x, positions, attend))

    def hidden(self, x: torch.Tensor, positions: torch.Tensor,
               attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The final (normed) hidden states (L, D) that `run` feeds the LM head; what HF returns as
        `hidden_states[-1]`."""
        L, Dh = x.shape[0], self.head_dim
        cos, sin = self.model.rotary_emb(x, positions[:, None])                               # (L, 1, Dh)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self.norm(layer.input_layernorm, x)
            q, k, v = (t.view(L, -1, Dh) for t in self.project(h, (attn.q_proj, attn.k_proj, attn.v_proj)))
            if hasattr(attn, "q_norm"):   # Qwen3: per-head RMSNorm before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rotary(q, k, cos, sin)
            x = x + self.project(attend(i, q, k, v).to(x.dtype), (attn.o_proj,))[0]
            x = x + self.mlp(layer.mlp, self.norm(layer.post_attention_layernorm, x))
        return self.norm(self.model.norm, x)


def grouped_continuations(family: LlamaFamily, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]],
                          prompt_mask: torch.Tensor, next_position: torch.Tensor,
                          embeds: torch.Tensor) -> torch.Tensor:
    """Final hidden states (P, G, S, D), the LM head's input, of G continuations of S tokens after each
    of P prompts, sharing its KV (the caller scores targets from them: `linear_logprobs`).

    prompt_kv: per layer the prompts' cached (rotated) keys and values (P, Hk, Lp, Dh); prompt_mask
    (P, Lp) 1 for real positions; next_position (P,) the first continuation token's position id; embeds
    (P, G, S, D) the continuations' input embeddings.  Continuation (p, g) attends to prompt p's real
    positions and to its own earlier tokens only.  One SDPA call per layer: the G*S tokens of a prompt are
    its queries over [prompt KV; the G continuations' KV] (no prompt KV repeated G times, no growing
    cache); grouped-query heads are left to SDPA.  Differentiable in `embeds` (and in the weights).
    """
    P, G, S, D = embeds.shape
    dev = embeds.device
    positions = (next_position[:, None, None] + torch.arange(S, device=dev)).expand(P, G, S).reshape(-1)
    seq = torch.arange(G * S, device=dev)
    own = (seq[:, None] // S == seq[None, :] // S) & (seq[None, :] <= seq[:, None])          # (GS, GS)
    allowed = torch.cat([prompt_mask.bool()[:, None, :].expand(P, G * S, -1),
                         own.expand(P, -1, -1)], dim=-1)[:, None]                          # (P, 1, GS, Lp+GS)
    # additive, in the tokens' dtype (the prompt KV, the queries and the new KV all share it)
    mask = _additive(allowed, embeds.dtype)

    def attend(i, q, k, v):
        pk, pv = prompt_kv[i]
        per_prompt = lambda t: t.view(P, G * S, t.shape[1], t.shape[2]).transpose(1, 2)  # noqa: E731
        keys = torch.cat([pk, per_prompt(k)], dim=2)
        values = torch.cat([pv, per_prompt(v)], dim=2)
        qh = per_prompt(q)
        out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=family.scaling,
                                             enable_gqa=qh.shape[1] != keys.shape[1])
        return out.transpose(1, 2).reshape(P * G * S, -1)

    return family.hidden(embeds.reshape(P * G * S, D), positions, attend).view(P, G, S, -1)


class PackedRows:
    """The real positions of a padded (B, S) batch, for running per-token work on them alone.

    Projections, MLP, norms and the LM head cost the same per token whether it is real or padding, so
    they run on `pack`ed rows (L = real tokens); only the attention needs the (B, S) layout, where it
    reads the rows `unpack`ed (zeros at padding).  Both directions are differentiable.
    """

    def __init__(self, mask: torch.Tensor):
        self.B, self.S = mask.shape
        flat = mask.reshape(-1)
        self.index = flat.nonzero().squeeze(1)        # (L,) into the flattened (B * S) layout
        self.padding = (~flat).nonzero().squeeze(1)   # the rest

    def __len__(self) -> int:
        return self.index.numel()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) -> (L, ...)."""
        return _Pack.apply(t.reshape(self.B * self.S, *t.shape[2:]), self)

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """(L, ...) -> (B, S, ...), zeros at padding."""
        return _Unpack.apply(t, self).view(self.B, self.S, *t.shape[1:])

    def _scatter(self, t: torch.Tensor) -> torch.Tensor:
        # written once per position: the real rows copied, the padding rows zeroed (no full zero-fill first)
        out = t.new_empty(self.B * self.S, *t.shape[1:])
        out.index_copy_(0, self.index, t)
        return out.index_fill_(0, self.padding, 0) if self.padding.numel() else out


class _Pack(torch.autograd.Function):
    """`PackedRows.pack` as one node.  Why by hand: index_select's backward zero-fills the whole (B * S)
    gradient and then scatter-adds into it; here each position is written once (the real rows copied,
    the padding zeroed), and the forward of `_Unpack` is the same scatter."""

    @staticmethod
    def forward(ctx, t, rows):
        ctx.rows = rows
        return t.index_select(0, rows.index)

    @staticmethod
    def backward(ctx, grad):
        return ctx.rows._scatter(grad), None


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, rows):
        ctx.rows = rows
        return rows._scatter(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.index_select(0, ctx.rows.index), None


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def packed_pass(family: LlamaFamily, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, past_mask: torch.Tensor | None = None):
    """The backbone over a padded block of new tokens, the per-token work on the real ones only.

    embeds (B, S, D), mask (B, S) 1 at real tokens (left padding: prompts; right padding: targets),
    positions (B, S).  Each real token reads the real positions of `past` (per layer (keys, values)
    (B or 1, Hk, Lp, Dh), rotated as a KV cache holds them; `past_mask` (B or 1, Lp)) and the real tokens
    of its row up to itself; nothing of a padding token reaches a real one (after a past a padding token
    reads itself only: it would otherwise have no key, NaN in the attention and in its backward).

    Returns (hidden, rows, kv): the final normed hidden states (L, D) of the L real tokens (what HF
    returns as hidden_states[-1]; `rows.unpack` gives (B, S, D)), their `PackedRows`, and per layer the
    block's keys and values (B, Hk, S, Dh) (zeros at padding).  Differentiable.
    """
    rows = PackedRows(mask.bool())
    B, S = mask.shape
    dev = mask.device
    kv = []
    heads_first = lambda layout, t: layout.unpack(t).transpose(1, 2)   # noqa: E731  (L, H, Dh) -> (B, H, S, Dh)
    if past is None:
        # Without a past the attention runs on each row's real tokens moved to its front: a causal mask
        # then hides every padding key from every real query, so SDPA needs no mask tensor (is_causal,
        # whose kernel also skips the blocks above the diagonal); a padding query reads real keys and
        # zeros, finite, and its output is dropped.
        front = PackedRows(torch.arange(S, device=dev) < mask.sum(1, keepdim=True))

        def attend(i, q, k, v):
            kv.append((heads_first(rows, k), heads_first(rows, v)))
            qh, kh, vh = (heads_first(front, t) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=family.scaling,
                                                 enable_gqa=qh.shape[1] != kh.shape[1])
            return front.pack(out.transpose(1, 2)).reshape(len(rows), -1)
    else:
        own = torch.ones(S, S, dtype=torch.bool, device=dev).tril() & mask.bool()[:, None, :]
        allowed = torch.cat([past_mask.bool()[:, None, :].expand(B, S, -1),
                             own | torch.eye(S, dtype=torch.bool, device=dev)], -1)            # (B, S, Lp + S)
        bias = _additive(allowed[:, None], embeds.dtype)

        def attend(i, q, k, v):
            qh, kh, vh = (heads_first(rows, t) for t in (q, k, v))
            kv.append((kh, vh))
            pk, pv = past[i]
            kh = torch.cat([pk.expand(B, -1, -1, -1), kh], 2)
            vh = torch.cat([pv.expand(B, -1, -1, -1), vh], 2)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias, scale=family.scaling,
                                                 enable_gqa=qh.shape[1] != kh.shape[1])
            return rows.pack(out.transpose(1, 2)).reshape(len(rows), -1)

    hidden = family.hidden(rows.pack(embeds), rows.pack(positions), attend)
    return hidden, rows, kv
