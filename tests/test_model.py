"""Tests of LatentRATT, the single-pass LatentR3Model, the latent token, tokenization and checkpoints."""
from __future__ import annotations

import pytest
import torch

from latentr3.config import ModelConfig
from latentr3.data.prompts import PromptBuilder
from latentr3.model.backbones import (
    LATENT_TOKEN, add_latent_token, tiny_qwen2, tiny_tokenizer_corpus, train_tiny_tokenizer)
from latentr3.model.build import build_model
from latentr3.data.dataset import left_pad, right_pad
from latentr3.model.latent_lm import LatentR3Model, gather_logprobs, linear_logprobs
from latentr3.model.latent_ratt import LatentRATT

HIDDEN = 32


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_tokenizer(titles):
    return train_tiny_tokenizer(tiny_tokenizer_corpus(titles, "movies"), vocab_size=400)


def make_model(tokenizer, num_latent: int, seed: int = 0) -> LatentR3Model:
    """A tiny 2-layer Qwen2 + LatentRATT (eval mode, fp32); `tokenizer` gets the latent token."""
    backbone = tiny_qwen2(len(tokenizer), hidden=HIDDEN, layers=2, heads=2, seed=seed)
    latent_id = add_latent_token(backbone, tokenizer)
    torch.manual_seed(seed + 1)
    model = LatentR3Model(backbone, latent_id if num_latent else None, num_latent)
    # Non-trivial LatentRATT biases so that the latent is not ~0.
    with torch.no_grad():
        for lin in (model.latent_ratt.q_proj, model.latent_ratt.k_proj, model.latent_ratt.v_proj):
            lin.weight.mul_(3.0)
    return model.eval()


@pytest.fixture(scope="module")
def tok(base_tokenizer):
    import copy

    t = copy.deepcopy(base_tokenizer)
    return t


def examples(tok, titles, num_latent, ks=(1, 4, 8), check=True):
    """(prompt, target) id lists whose prompts and targets all differ in length."""
    b = PromptBuilder(tok, "short", "movies", 512, num_latent)
    out = [b.example(titles[:k], titles[k]) for k in ks]
    if check:
        assert len({len(p) for p, _ in out}) == len(out)
        assert len({len(t) for _, t in out}) > 1
    return out


def batch(exs, pad, extra_prompt_pad=0, extra_target_pad=0):
    pi, pm = left_pad([p for p, _ in exs], pad)
    ti, tm = right_pad([t for _, t in exs], pad)
    if extra_prompt_pad:
        B = pi.shape[0]
        pi = torch.cat([torch.full((B, extra_prompt_pad), pad), pi], 1)
        pm = torch.cat([torch.zeros(B, extra_prompt_pad, dtype=pm.dtype), pm], 1)
    if extra_target_pad:
        B = ti.shape[0]
        ti = torch.cat([ti, torch.full((B, extra_target_pad), pad)], 1)
        tm = torch.cat([tm, torch.zeros(B, extra_target_pad, dtype=tm.dtype)], 1)
    return pi, pm, ti, tm


# ----------------------------------------------------------------------------------------- LatentRATT
def _ratt_inputs(B=3, T=7, D=HIDDEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    pos = torch.arange(T).repeat(B, 1)
    mask = torch.ones(B, T, dtype=torch.bool)
    return h, pos, mask


def test_latent_ratt_shape_and_dtype():
    torch.manual_seed(0)
    ratt = LatentRATT(HIDDEN)
    h, pos, mask = _ratt_inputs()
    out = ratt(h.to(torch.bfloat16), pos, mask, h[:, -1].to(torch.bfloat16), pos[:, -1])
    assert out.shape == (3, HIDDEN)
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in ratt.parameters())
    with pytest.raises(ValueError, match="even"):
        LatentRATT(33)


def test_latent_ratt_ignores_masked_positions():
    torch.manual_seed(0)
    ratt = LatentRATT(HIDDEN)
    h, pos, mask = _ratt_inputs()
    mask[0, :3] = False
    mask[2, :1] = False
    ref = ratt(h, pos, mask, h[:, -1], pos[:, -1])
    h2 = h.clone()
    h2[0, :3] = torch.randn(3, HIDDEN) * 10
    h2[2, 0] = torch.randn(HIDDEN) * 10
    out = ratt(h2, pos, mask, h2[:, -1], pos[:, -1])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # ... while changing an attended position does change it (the test can see a difference).
    h2[0, 4] += 1.0
    assert not torch.allclose(ratt(h2, pos, mask, h2[:, -1], pos[:, -1])[0], ref[0], atol=1e-4)


def test_latent_ratt_rope_is_relative_and_order_sensitive():
    torch.manual_seed(0)
    ratt = LatentRATT(HIDDEN)
    h, pos, mask = _ratt_inputs(T=9)
    ref = ratt(h, pos, mask, h[:, -1], pos[:, -1])
    # A constant shift of every position (keys and query) leaves the scores unchanged.
    shifted = ratt(h, pos + 13, mask, h[:, -1], pos[:, -1] + 13)
    torch.testing.assert_close(shifted, ref, rtol=1e-4, atol=1e-5)
    # Permuting the key contents over fixed positions changes the output: without RoPE attention
    # would be permutation invariant, so this checks the rotation is applied.
    perm = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4, 8])
    permuted = ratt(h[:, perm], pos, mask, h[:, -1], pos[:, -1])
    assert not torch.allclose(permuted, ref, atol=1e-4)
    # Moving only the query changes it too.
    moved = ratt(h, pos, mask, h[:, -1], pos[:, -1] + 5)
    assert not torch.allclose(moved, ref, atol=1e-4)


# ----------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("num_latent", [0, 1, 2])
def test_single_pass_equals_two_pass(tok, titles, num_latent):
    model = make_model(tok, num_latent)
    exs = examples(tok, titles, num_latent)
    pi, pm, ti, tm = batch(exs, tok.pad_token_id)
    with torch.no_grad():
        single = model(pi, pm, ti, tm)
        two = model.two_pass_target_logprobs(pi, pm, ti, tm)
    assert single.shape == ti.shape
    assert (single[tm == 0] == 0).all()
    assert (single[tm == 1] < 0).all()
    torch.testing.assert_close(single, two, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("num_latent", [1, 2])
def test_forward_runs_the_last_latent_with_the_target(tok, titles, num_latent):
    """forward's merged pass (last latent + target in one backbone call) equals think + target_logprobs,
    with noise on the latents, and makes one backbone call fewer."""
    model = make_model(tok, num_latent)
    model.lean = False            # the backbone-forward path (the lean one makes no backbone call)
    pi, pm, ti, tm = batch(examples(tok, titles, num_latent), tok.pad_token_id)
    noise = torch.randn(pi.shape[0], num_latent, model.latent_ratt.hidden_size) * 0.5
    calls = []
    hook = model.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        merged = model(pi, pm, ti, tm, noise)
        n_merged = len(calls)
        calls.clear()
        separate = model.target_logprobs(model.think(model.prefill(pi, pm), noise), ti) * tm
    hook.remove()
    torch.testing.assert_close(merged, separate, rtol=1e-5, atol=2e-5)
    assert n_merged == len(calls) - 1 == num_latent + 1


@pytest.mark.parametrize("num_latent", [1, 2])
def test_left_padding_matches_rows_alone(tok, titles, num_latent):
    model = make_model(tok, num_latent, seed=3)
    exs = examples(tok, titles, num_latent)
    pad = tok.pad_token_id
    with torch.no_grad():
        pi, pm, ti, tm = batch(exs, pad)
        lat = model.think(model.prefill(pi, pm)).latents
        lp = model(pi, pm, ti, tm)
        pi2, pm2, ti2, tm2 = batch(exs, pad, extra_prompt_pad=5, extra_target_pad=3)
        lat_pad = model.think(model.prefill(pi2, pm2)).latents
        lp_pad = model(pi2, pm2, ti2, tm2)
        assert lat.shape == (len(exs), num_latent, HIDDEN)
        torch.testing.assert_close(lat_pad, lat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp_pad[:, : lp.shape[1]], lp, rtol=1e-5, atol=2e-5)
        assert (lp_pad[:, lp.shape[1]:] == 0).all()
        for i, ex in enumerate(exs):
            a, am, b, bm = batch([ex], pad)
            assert am.all()  # alone: no padding at all
            lat_i = model.think(model.prefill(a, am)).latents
            lp_i = model(a, am, b, bm)
            torch.testing.assert_close(lat_i[0], lat[i], rtol=1e-5, atol=1e-5)
            T = b.shape[1]
            torch.testing.assert_close(lp_i[0], lp[i, :T], rtol=1e-5, atol=2e-5)
        # The latents depend on the row's content (not a constant vector).
        assert not torch.allclose(lat[0], lat[1], atol=1e-3)


def _forward_and_grads(model, pi, pm, ti, tm, noise, lean):
    model.lean = lean
    model.zero_grad(set_to_none=True)
    lp = model(pi, pm, ti, tm, noise)
    weights = torch.linspace(0.5, 2.0, lp.numel()).view_as(lp)   # every token's gradient counts differently
    (lp * weights).sum().backward()
    return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _other_backbone(tok, arch: str, num_latent: int) -> LatentR3Model:
    """A tiny Qwen2 with grouped-query attention, or a tiny Llama (no projection biases)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    tok = copy.deepcopy(tok)
    torch.manual_seed(11)
    if arch == "gqa":
        backbone = tiny_qwen2(len(tok), hidden=HIDDEN, layers=2, heads=4, kv_heads=2, seed=11)
    else:
        backbone = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                tie_word_embeddings=False))
    latent_id = add_latent_token(backbone, tok)
    return LatentR3Model(backbone, latent_id if num_latent else None, num_latent)


@pytest.mark.parametrize("num_latent", [0, 1])
@pytest.mark.parametrize("arch", ["qwen2", "qwen2+lora", "gqa", "llama"])
def test_packed_forward_equals_the_backbone_forward(tok, titles, num_latent, arch):
    """The padding-free training pass: same log-probs and the same gradient of every parameter as the
    backbone's forward, with extra left / right padding, a one-token-shorter prompt, noise on the latent,
    under LoRA, with grouped-query attention and on Llama; no backbone forward call."""
    model = (make_model(tok, num_latent, seed=5) if arch.startswith("qwen2") else
             _other_backbone(tok, arch, num_latent)).train()
    if arch == "qwen2+lora":
        from peft import LoraConfig, get_peft_model

        model.backbone = get_peft_model(model.backbone, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["q_proj", "v_proj", "up_proj"]))
    exs = examples(tok, titles, num_latent, ks=(1, 4, 8, 2), check=False)
    pi, pm, ti, tm = batch(exs, tok.pad_token_id, extra_prompt_pad=3, extra_target_pad=2)
    noise = torch.randn(pi.shape[0], 1, HIDDEN, generator=torch.Generator().manual_seed(0)) if num_latent else None
    assert model.lean_family() is not None
    calls = []
    hook = model.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    lp, grads = _forward_and_grads(model, pi, pm, ti, tm, noise, lean=True)
    assert not calls
    hook.remove()
    lp_ref, grads_ref = _forward_and_grads(model, pi, pm, ti, tm, noise, lean=False)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=2e-5)
    assert (lp[tm == 0] == 0).all() and (lp[tm == 1] < 0).all()
    assert grads.keys() == grads_ref.keys() and len(grads) > 4
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6 * max(1.0, float(g.abs().max())),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["qwen2", "gqa"])
def test_lean_prefill_and_append_equal_the_backbone_forward(tok, titles, arch):
    """prefill (alone and after a shared prefix, with and without the LM head) and append (the latent,
    then two tokens) through the lean path: the hidden states, last logits and KV cache at every real
    position equal the backbone forward's."""
    model = make_model(tok, 1, seed=4) if arch == "qwen2" else _other_backbone(tok, arch, 1)
    model.eval()
    exs = examples(tok, titles, 1, ks=(1, 4, 8), check=False)
    pi, pm, _, _ = batch(exs, tok.pad_token_id, extra_prompt_pad=2)
    shared_ids = pi[-1:, -6:-3]                                        # some tokens every prompt follows
    extra = torch.tensor([[5, 9], [7, 3], [11, 2]])

    def run(lean):
        model.lean = lean
        with torch.no_grad():
            shared = model.prefill(shared_ids, torch.ones_like(shared_ids))
            out = []
            for sh in (None, shared):
                for head in (True, False):
                    p = model.prefill(pi, pm, sh, last_logits=head)
                    out.append(p)
            p = model.think(model.prefill(pi, pm))       # (think extends the cache it is given)
            p2, logits = model.append(p, model.backbone.get_input_embeddings()(extra), logits_to_keep=0)
        return out, p2, logits

    lean, lean_p, lean_logits = run(True)
    ref, ref_p, ref_logits = run(False)
    for a, b in zip(lean + [lean_p], ref + [ref_p]):
        real = a.attention_mask.bool()
        torch.testing.assert_close(a.attention_mask, b.attention_mask)
        torch.testing.assert_close(a.positions[real], b.positions[real])
        torch.testing.assert_close(a.hidden[real], b.hidden[real], rtol=1e-5, atol=1e-5)
        assert (a.last_logits is None) == (b.last_logits is None)
        if a.last_logits is not None:
            torch.testing.assert_close(a.last_logits, b.last_logits, rtol=1e-5, atol=1e-5)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
                assert x.shape == y.shape
                torch.testing.assert_close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lean_p.latents, ref_p.latents, rtol=1e-5, atol=1e-5)


def test_lean_paths_apply_only_where_they_are_exact(tok):
    model = make_model(tok, 1).train()
    assert model.lean_family() is not None
    model.lean = False
    assert model.lean_family() is None
    model.lean = True
    model.backbone.config.attention_dropout = 0.1       # dropout in training: the backbone's own forward
    assert model.lean_family() is None
    assert model.eval().lean_family() is not None        # no dropout at evaluation
    model.backbone.config.attention_dropout = 0.0
    next(model.backbone.parameters()).ds_id = 0          # a DeepSpeed ZeRO-3 parameter
    assert model.lean_family() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_head", [False, True])
def test_linear_logprobs_equal_the_head_then_log_softmax(dtype, train_head):
    """The fused LM head + target log-prob gives the log-probs and the gradients (hidden states; the
    head's weight when it trains) of `gather_logprobs(head(h))`, repeated labels included."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(dtype).requires_grad_(train_head)
    h = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(50, (3, 7))
    labels[0, :3] = 5                                        # one token several times in a row
    grad = torch.randn(3, 7)
    wants = [h] + ([head.weight] if train_head else [])
    ref = gather_logprobs(head(h), labels)
    got = linear_logprobs(h, head, labels)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    for a, b in zip(torch.autograd.grad(got, wants, grad), torch.autograd.grad(ref, wants, grad)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    biased = torch.nn.Linear(16, 50)                         # not fused: the same numbers through the head
    torch.testing.assert_close(linear_logprobs(h.float(), biased, labels), gather_logprobs(biased(h.float()), labels))


def test_hand_written_layer_pieces_match_their_tensor_op_definitions():
    """The rotary embedding, the fp32 RMSNorm and the pack / unpack of `llama_family` are autograd
    Functions with hand-written backwards: their outputs equal the tensor-op definitions and their
    gradients pass `gradcheck` (float64; rotary angles whose two halves differ, so the backward must be the
    transposed rotation, not the inverse angle)."""
    from latentr3.model.llama_family import PackedRows, _RMSNorm, rotary

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q, k = torch.randn(5, 3, 8, **f64), torch.randn(5, 1, 8, **f64)
    cos, sin = torch.randn(5, 1, 8, dtype=torch.float64), torch.randn(5, 1, 8, dtype=torch.float64)
    half = lambda x: torch.cat((-x[..., 4:], x[..., :4]), -1)           # noqa: E731  HF's rotate_half
    for got, x in zip(rotary(q, k, cos, sin), (q, k)):
        torch.testing.assert_close(got, x * cos + half(x) * sin)
    assert torch.autograd.gradcheck(lambda a, b: rotary(a, b, cos, sin), (q, k))

    x, w = torch.randn(2, 5, 16, **f64), torch.randn(16, **f64)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(_RMSNorm.apply(x, w, 1e-6), ref)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w))
    assert torch.autograd.gradcheck(lambda a: _RMSNorm.apply(a, w.detach(), 1e-6), (x,))

    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]]).bool()
    rows = PackedRows(mask)
    t = torch.randn(3, 4, 2, **f64)
    packed = rows.pack(t)
    torch.testing.assert_close(packed, t[mask])
    unpacked = rows.unpack(packed)
    torch.testing.assert_close(unpacked, t * mask[..., None])
    assert torch.autograd.gradcheck(lambda a: rows.unpack(rows.pack(a) * 2), (t,))
    full = PackedRows(torch.ones(2, 3).bool())                             # no padding at all
    torch.testing.assert_close(full.unpack(full.pack(t[:2, :3])), t[:2, :3])


def test_projections_sum_their_gradients_like_separate_linears():
    """`_Projections` (several linear maps of one input as one node) gives the outputs and gradients of
    separate linear maps (gradcheck, float64, with and without biases), and inside `one_weight_grad` the
    uses of one weight in several passes add up to the same gradient as autograd's sum: a use whose
    output the loss ignores (never reached in the backward), repeated backward calls accumulating into
    `.grad` (micro-batches of one optimizer step), and a later block starting afresh."""
    from latentr3.model.llama_family import LlamaFamily, _Projections, _WeightGrads

    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, w1, w2, b1 = torch.randn(5, 4, **f64), torch.randn(3, 4, **f64), torch.randn(6, 4, **f64), torch.randn(3, **f64)
    outs = _Projections.apply(x, None, 2, w1, w2, b1, None)
    torch.testing.assert_close(outs[0], torch.nn.functional.linear(x, w1, b1))
    torch.testing.assert_close(outs[1], torch.nn.functional.linear(x, w2))
    assert torch.autograd.gradcheck(lambda *a: _Projections.apply(a[0], None, 2, *a[1:], None), (x, w1, w2, b1))

    lin = torch.nn.Linear(4, 3).double()
    fam = LlamaFamily.__new__(LlamaFamily)
    fam.fp32, fam._grad_sums = True, None
    xs = [torch.randn(5, 4, **f64) for _ in range(3)]

    def loss(project, step):
        a, b, c = (project(t) for t in xs)            # c: computed, never reaching the loss
        return (a * step).sum() + (b.sin() * (b + a)).sum()

    def grads(project, blocks):
        lin.zero_grad(set_to_none=True)
        for t in xs:
            t.grad = None
        for step in range(1, blocks + 1):
            loss(project, step).backward()
        return [t.grad.clone() for t in (lin.weight, lin.bias, *xs[:2])]

    def fused(t):
        return _Projections.apply(t, fam._grad_sums, 1, lin.weight, lin.bias)[0]

    ref = grads(lin, 2)
    for got, want in zip(grads(fused, 2), ref):                    # outside a block: no summing
        torch.testing.assert_close(got, want)
    lin.zero_grad(set_to_none=True)
    for step in (1, 2):
        with fam.one_weight_grad():
            assert isinstance(fam._grad_sums, _WeightGrads)
            out = loss(fused, step)
        assert fam._grad_sums is None
        out.backward()                               # the backward runs after the block has closed
    for got, want in zip((lin.weight.grad, lin.bias.grad), ref[:2]):
        torch.testing.assert_close(got, want)


def test_gradients_reach_latent_ratt_and_backbone(tok, titles):
    model = make_model(tok, 1).train()
    pi, pm, ti, tm = batch(examples(tok, titles, 1), tok.pad_token_id)
    (-model(pi, pm, ti, tm).sum()).backward()
    for lin in (model.latent_ratt.q_proj, model.latent_ratt.k_proj, model.latent_ratt.v_proj):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    layer = model.backbone.model.layers[0]
    assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layer.mlp.down_proj.weight.grad.abs().sum() > 0


def test_no_latent_means_no_latent_ratt_gradient(tok, titles):
    model = make_model(tok, 0).train()
    pi, pm, ti, tm = batch(examples(tok, titles, 0), tok.pad_token_id)
    (-model(pi, pm, ti, tm).sum()).backward()
    for p in model.latent_ratt.parameters():
        assert p.grad is None or not p.grad.any()
    assert model.backbone.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # Frozen: a trainable parameter without gradient makes DDP fail (tests/test_sft_distributed.py).
    assert not any(p.requires_grad for p in model.latent_ratt.parameters())
    assert make_model(tok, 1).latent_ratt.q_proj.weight.requires_grad


def test_bad_model_arguments(tok):
    backbone = tiny_qwen2(len(tok), hidden=HIDDEN, layers=1, heads=2)
    with pytest.raises(ValueError, match="num_latent"):
        LatentR3Model(backbone, 5, num_latent=-1)
    with pytest.raises(ValueError, match="latent token"):
        LatentR3Model(backbone, None, num_latent=1)


# ----------------------------------------------------------------------------------------- tokens
def test_latent_token_is_special_and_read_from_tokenizer(base_tokenizer):
    import copy

    tk = copy.deepcopy(base_tokenizer)
    n = len(tk)
    backbone = tiny_qwen2(n, hidden=HIDDEN, layers=1, heads=2)
    latent_id = add_latent_token(backbone, tk)
    assert latent_id == tk.convert_tokens_to_ids(LATENT_TOKEN) == n  # a new id, not an existing token
    assert len(tk) == n + 1
    assert backbone.get_input_embeddings().num_embeddings >= n + 1
    assert tk.added_tokens_decoder[latent_id].special
    assert tk.added_tokens_decoder[latent_id].content == LATENT_TOKEN
    # Text containing the marker tokenizes it as one id; decoding with skip_special_tokens drops it.
    ids = tk("a " + LATENT_TOKEN + " b", add_special_tokens=False)["input_ids"]
    assert ids.count(latent_id) == 1
    assert LATENT_TOKEN not in tk.decode(ids, skip_special_tokens=True)
    # Adding it again is a no-op returning the same id.
    assert add_latent_token(backbone, tk) == latent_id and len(tk) == n + 1


def test_target_ids_end_with_eos(tok, titles):
    b = PromptBuilder(tok, "paper", "movies", 512, 1)
    for title in titles[:4] + ['A "quoted", odd title: été']:
        ids = b.target_ids(title)
        expected = tok(f'"{title}"\n', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == expected
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == f'"{title}"\n'


def test_prompt_truncation_drops_oldest_titles(tok, titles):
    history = titles[:10]
    full = PromptBuilder(tok, "short", "movies", 10_000, 1)
    full_len = len(full.prompt_ids(history))
    cutoff = full_len // 2 + 1
    b = PromptBuilder(tok, "short", "movies", cutoff, 1)
    prompt, tgt = b.example(history, titles[10])
    assert tgt == full.target_ids(titles[10])
    assert len(prompt) + 1 <= cutoff  # prompt + latent slot
    text = tok.decode(prompt)
    kept = [t for t in history if f'"{t}"' in text]
    assert 0 < len(kept) < len(history)
    assert kept == history[len(history) - len(kept):]  # a suffix: the newest titles are kept
    assert prompt == tok(b.prompt_text(kept))["input_ids"]
    # Nothing dropped when it fits.
    assert PromptBuilder(tok, "short", "movies", 10_000, 1).example(history, titles[10])[0] == \
        full.prompt_ids(history)


def test_truncation_is_the_same_in_training_and_evaluation(tok, titles):
    """One rule: a history gives the same prompt for training (tokenize_samples, whatever the target)
    and for evaluation (prompt_ids, as evaluate_samples and Recommender call it)."""
    from latentr3.data.dataset import tokenize_samples
    from latentr3.data.splits import Sample

    history = titles[:10]
    full_len = len(PromptBuilder(tok, "short", "movies", 10_000, 1).prompt_ids(history))
    long_title = " ".join(titles)  # a long target: reserving it would cut more history in training
    for num_latent in (0, 1, 2):
        b = PromptBuilder(tok, "short", "movies", full_len // 2 + num_latent, num_latent)
        at_eval = b.prompt_ids(history)
        assert len(at_eval) + num_latent <= b.cutoff_len < full_len
        samples = [Sample(history, list(range(10)), t, 0, i + 2, {}) for i, t in
                   enumerate([titles[10], long_title])]
        for ex in tokenize_samples(samples, b):
            assert ex.prompt == at_eval, num_latent
        for target in (titles[10], long_title):
            assert b.example(history, target)[0] == at_eval


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_round_trip(tmp_path, titles, tok, lora):
    cfg = ModelConfig(backbone="tiny", tiny_hidden=HIDDEN, tiny_layers=1, tiny_heads=2, tiny_vocab=500,
                      num_latent=1, lora=lora)
    model, tk = build_model(cfg, titles, "movies")
    # Move every trainable weight away from its initialisation (LoRA B starts at zero).
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    if lora:
        assert any("lora_B" in n for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    exs = examples(tk, titles, 1, ks=(1, 3, 6), check=False)
    pi, pm, ti, tm = batch(exs, tk.pad_token_id)
    with torch.no_grad():
        ref = model(pi, pm, ti, tm)
    model.save_pretrained(tmp_path / "ckpt", tk, {"note": "x"})
    loaded, tk2, meta = LatentR3Model.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    assert meta["lora"] is lora and meta["note"] == "x" and meta["num_latent"] == 1
    assert loaded.latent_token_id == model.latent_token_id == tk2.convert_tokens_to_ids(LATENT_TOKEN)
    # The reloaded tokenizer splits text exactly as the one trained with (digits included).
    b1, b2 = PromptBuilder(tk, "paper", "movies", 512, 1), PromptBuilder(tk2, "paper", "movies", 512, 1)
    assert b2.example(titles, titles[0]) == b1.example(titles, titles[0])
    assert tk2.added_tokens_decoder[loaded.latent_token_id].special  # still special after reload
    with torch.no_grad():
        out = loaded(pi, pm, ti, tm)
    assert torch.equal(out, ref)


def test_from_pretrained_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="latentr3.json"):
        LatentR3Model.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------ latent diagnostics
def test_spearman_hand_computed():
    from latentr3.evaluation.diagnostics import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: a = ranks (0, 1.5, 1.5, 3), b = (0, 1, 2, 3) -> rho = 0.9486833
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_latent_diagnostics(tok, titles):
    from latentr3.evaluation.diagnostics import latent_diagnostics

    model = make_model(tok, 1)
    builder = PromptBuilder(tok, "short", "movies", 512, 1)
    hist = [titles[:k] for k in (1, 3, 5, 7)]
    targets = [titles[k] for k in (1, 3, 5, 7)]
    ndcg = [1.0, 0.0, 0.5, 0.0]
    d = latent_diagnostics(model, builder, hist, targets, ndcg, noise_std=1.5, batch_size=3)
    assert d["noise_norm"] == pytest.approx(1.5 * HIDDEN ** 0.5)
    assert d["latent_norm"] > 0 and 0 < d["attention_entropy_ratio"] <= 1.0 + 1e-6
    assert d["logprob_gain"] != 0.0
    # the gain is the target log-prob with the latent minus with a zero vector in the latent slot
    exs = [builder.example(h, t) for h, t in zip(hist, targets)]
    pi, pm, ti, tm = batch(exs, tok.pad_token_id)
    with torch.no_grad():
        full = model(pi, pm, ti, tm).sum(-1)
        prefix = model.prefill(pi, pm)
        r = model.compute_latent(prefix)
        zero = model.target_logprobs(model.think(model.prefill(pi, pm), noise=-r[:, None]), ti)
        zero = (zero * tm).sum(-1)
    assert d["logprob_gain"] == pytest.approx(float((full - zero).mean()), abs=1e-4)
    # a LatentRATT that writes the zero vector: the model cannot use it
    with torch.no_grad():
        model.latent_ratt.v_proj.weight.zero_()
        model.latent_ratt.v_proj.bias.zero_()
    z = latent_diagnostics(model, builder, hist, targets, ndcg, noise_std=1.5)
    assert z["latent_norm"] == 0.0 and z["logprob_gain"] == pytest.approx(0.0, abs=1e-6)
    assert latent_diagnostics(make_model(tok, 0), PromptBuilder(tok, "short", "movies", 512, 0), hist, targets,
                              ndcg, 1.5).keys() == {"users", "num_latent", "hidden", "noise_std", "noise_norm"}

def test_latent_init_hf_and_torch(tok, titles):
    """hf: normal(0, backbone initializer_range), zero bias (the authors' layer); torch: nn.Linear's."""
    backbone = tiny_qwen2(len(tok), hidden=64, layers=1, heads=2)
    backbone.config.initializer_range = 0.05
    torch.manual_seed(0)
    hf = LatentR3Model(backbone, 5, 1, latent_init="hf").latent_ratt
    for lin in (hf.q_proj, hf.k_proj, hf.v_proj):
        assert not lin.bias.any()
        assert abs(lin.weight.std().item() - 0.05) < 0.005 and abs(lin.weight.mean().item()) < 0.005
    th = LatentR3Model(backbone, 5, 1, latent_init="torch").latent_ratt
    for lin in (th.q_proj, th.k_proj, th.v_proj):
        bound = 1 / 64 ** 0.5
        assert lin.bias.abs().max() <= bound and lin.bias.any()
        assert lin.weight.abs().max() <= bound and lin.weight.std() > 0.5 * bound / 3 ** 0.5
    with pytest.raises(ValueError, match="model.latent_init"):
        LatentR3Model(backbone, 5, 1, latent_init="xavier")
    # The config default is the authors' init, with the std of the backbone config.
    cfg = ModelConfig(backbone="tiny", tiny_hidden=HIDDEN, tiny_layers=1, tiny_heads=2, tiny_vocab=500)
    assert cfg.latent_init == "hf"
    model, _ = build_model(cfg, titles, "movies")
    std = model.backbone.config.initializer_range
    assert not model.latent_ratt.q_proj.bias.any()
    assert abs(model.latent_ratt.q_proj.weight.std().item() - std) < 0.25 * std


def test_trim_vocab_drops_unused_rows(tok, titles, tmp_path):
    """model.trim_vocab: embedding and LM head cut to len(tokenizer), as the authors' resize does."""
    import copy

    from latentr3.model.backbones import trim_vocab

    tk = copy.deepcopy(tok)
    backbone = tiny_qwen2(len(tk) + 10, hidden=HIDDEN, layers=1, heads=2)  # padding rows, as Qwen2.5's
    latent_id = add_latent_token(backbone, tk)
    assert backbone.get_input_embeddings().num_embeddings > len(tk)  # (tk may have had the token already)
    keep = backbone.get_input_embeddings().weight[: len(tk)].detach().clone()
    assert trim_vocab(backbone, tk) == len(tk)
    assert backbone.get_input_embeddings().num_embeddings == len(tk)
    assert backbone.get_output_embeddings().weight.shape[0] == len(tk)
    assert torch.equal(backbone.get_input_embeddings().weight, keep)
    model = LatentR3Model(backbone, latent_id, 1).eval()
    pi, pm, ti, tm = batch(examples(tk, titles, 1), tk.pad_token_id)
    with torch.no_grad():
        ref = model(pi, pm, ti, tm)
    model.save_pretrained(tmp_path / "ckpt", tk)
    loaded, _, _ = LatentR3Model.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pi, pm, ti, tm), ref)
    with pytest.raises(ValueError, match="embedding rows"):
        trim_vocab(tiny_qwen2(len(tk) - 1, hidden=HIDDEN, layers=1, heads=2), tk)
    cfg = ModelConfig(backbone="tiny", tiny_hidden=HIDDEN, tiny_layers=1, tiny_heads=2, tiny_vocab=500,
                      trim_vocab=True)
    m, t = build_model(cfg, titles, "movies")
    assert m.backbone.get_input_embeddings().num_embeddings == len(t)


def test_shown_prompt_is_what_the_model_gets_and_says_what_was_dropped(tok, titles):
    full = PromptBuilder(tok, "short", "movies", 512, 1)
    hist = titles[:8]
    assert full.shown_prompt(hist) == full.prompt_text(hist)          # nothing dropped: no note
    short = PromptBuilder(tok, "short", "movies", len(full.prompt_ids(hist)) // 2, 1)
    kept = short.kept_titles(hist)
    assert 0 < len(kept) < len(hist)
    text = short.shown_prompt(hist)
    assert text.startswith(short.prompt_text(kept) + "\n")
    assert f"the oldest {len(hist) - len(kept)} of {len(hist)} history titles are dropped" in text
    assert hist[0] not in text.split("\n(")[0]
