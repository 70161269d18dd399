"""Converts the authors'-format tiny checkpoint (make_ckpt.py) into latentr3's checkpoint format, same weights.

    .venv/bin/python benchmarks/authors_grpo/to_latentr3.py --src DIR --out DIR
(latentr3's venv; with R3_DIR set, the latent layer's output is also checked against theirs)

Authors' format: one HF dir, model.safetensors = Qwen2 weights (tied embeddings) + the latent layer as
attention.{query,key,value}.{weight,bias}; tokenizer with "<|Thought|>" as its last token (= the latent id).
latentr3 format (LatentR3Model.save_pretrained): backbone/ (HF Qwen2ForCausalLM + tokenizer),
latent_ratt.safetensors ({q,k,v}_proj.{weight,bias}), latentr3.json, MANIFEST.json.
Mapping: attention.query -> q_proj, attention.key -> k_proj, attention.value -> v_proj (same nn.Linear(D, D,
bias) layout, same RoPE: base 1000 over the full width, rotate_half, scale 1/sqrt(D)); latent_token_id =
the id of "<|Thought|>" (len(tokenizer) - 1); num_latent 1.  Written through LatentR3Model.save_pretrained
and checked by reloading with LatentR3Model.from_pretrained (every backbone tensor and the latent layer
equal), and by comparing the latent layer's output with the authors' SelfAttentionLayer on random hidden
states (no padding, positions 0..T-1, where both define the same function).
"""
import argparse
import os
import sys

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))

from latentr3.model.latent_lm import LatentR3Model, load_tokenizer  # noqa: E402
from transformers import Qwen2ForCausalLM  # noqa: E402

MAP = {"attention.query.": "q_proj.", "attention.key.": "k_proj.", "attention.value.": "v_proj."}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    sd = load_file(os.path.join(args.src, "model.safetensors"))
    ratt_sd = {}
    for k, v in sd.items():
        for a, b in MAP.items():
            if k.startswith(a):
                ratt_sd[b + k[len(a):]] = v
    assert len(ratt_sd) == 6, sorted(ratt_sd)
    tok = load_tokenizer(args.src)
    latent_id = tok.convert_tokens_to_ids("<|Thought|>")
    assert latent_id == len(tok) - 1, (latent_id, len(tok))

    backbone = Qwen2ForCausalLM.from_pretrained(args.src, dtype=torch.float32)  # drops attention.* (unexpected)
    assert backbone.get_input_embeddings().num_embeddings == len(tok)
    model = LatentR3Model(backbone, latent_id, num_latent=1, rope_base=1000.0)
    model.latent_ratt.load_state_dict(ratt_sd)
    model.save_pretrained(args.out, tok, extra={"converted_from": os.path.abspath(args.src)})

    # --- checks
    m2, tok2, meta = LatentR3Model.from_pretrained(args.out)
    bsd = m2.backbone.state_dict()
    n = 0
    for k, v in sd.items():
        if k.startswith("attention."):
            continue
        assert torch.equal(bsd[k], v), k
        n += 1
    if "lm_head.weight" in bsd:
        assert torch.equal(bsd["lm_head.weight"], sd["model.embed_tokens.weight"])  # tied
    for k, v in ratt_sd.items():
        assert torch.equal(m2.latent_ratt.state_dict()[k], v), k
    assert meta["latent_token_id"] == latent_id and tok2.convert_tokens_to_ids("<|Thought|>") == latent_id
    assert tok2("The user has palyed")["input_ids"] == tok("The user has palyed")["input_ids"]
    print(f"backbone tensors equal: {n}; latent layer tensors equal: {len(ratt_sd)}; latent_token_id {latent_id}")

    try:  # the authors' layer vs ours, same weights
        sys.path.insert(0, HERE)
        sys.path.insert(0, os.path.join(HERE, "shim"))
        from launch_paths import r3_source
        sys.path.insert(0, r3_source())
        from model import SelfAttentionLayer
    except (Exception, SystemExit) as e:  # noqa: BLE001
        print(f"output check skipped (authors' model.py does not import here: {type(e).__name__}: {e})")
        return
    D = m2.latent_ratt.hidden_size
    theirs = SelfAttentionLayer(D)
    theirs.load_state_dict({k[len("attention."):]: v for k, v in sd.items() if k.startswith("attention.")})
    g = torch.Generator().manual_seed(0)
    B, T = 3, 17
    h = torch.randn(B, T + 1, D, generator=g)          # T real tokens, then the latent slot at index T
    with torch.no_grad():
        a = theirs(h, torch.ones(B, T + 1, dtype=torch.long), thought_id_idx=torch.full((B,), T))
        pos = torch.arange(T).expand(B, T)
        b = m2.latent_ratt(h[:, :T], pos, torch.ones(B, T, dtype=torch.bool), h[:, T - 1], torch.full((B,), T - 1))
    err = (a - b).abs().max().item()
    print(f"latent layer output, authors' SelfAttentionLayer vs LatentRATT: max abs diff {err:.2e}")
    assert err < 1e-5


if __name__ == "__main__":
    main()
