"""Building a LatentR3 model from a config: backbone, latent token, optional LoRA, LatentRATT."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .backbones import add_latent_token, load_backbone, trim_vocab
from .latent_lm import LatentR3Model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto`: bf16 on GPU, fp32 on CPU (this kind of CPU has no fast bf16 matmul)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_model(cfg: ModelConfig, titles: list[str], item_noun: str, dtype: torch.dtype = torch.float32,
                tokenizer=None):
    """A fresh (not yet fine-tuned) LatentR3 model and its tokenizer.

    `tokenizer`, when given, replaces the one the backbone spec would make (used on resume, so that a
    tiny backbone's trained tokenizer is the one saved at the start of the run).
    """
    shape = dict(hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads, vocab=cfg.tiny_vocab,
                 seed=cfg.init_seed)
    backbone, tok = load_backbone(cfg.backbone, dtype, titles=titles if tokenizer is None else titles,
                                  item_noun=item_noun, tiny_shape=shape)
    if tokenizer is not None:
        tok = tokenizer
    latent_id = add_latent_token(backbone, tok) if cfg.num_latent > 0 else None
    if cfg.trim_vocab:
        trim_vocab(backbone, tok)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
        backbone = get_peft_model(backbone, lora)
    return LatentR3Model(backbone, latent_id, cfg.num_latent, cfg.latent_rope_base, cfg.latent_init), tok
