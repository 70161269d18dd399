"""Latent samples of a prompt: the model-level pieces of latent GRPO (`training/grpo.py` is the recipe).

For every prompt, G samples r_k = mu_theta + eps_k of the latent thought are fed to the LLM after the
prompt's single prefill, and the target's per-token log-probs are scored under each (sample 0 of a
batch's noise is zero: the noise-free sample).

Two ways to run the G samples on one prompt pass, same numbers up to float rounding:

* grouped (Llama-family backbones, one latent; the default where it applies): every sample's latent +
  target tokens are run as one flat set of queries over the prompt's KV, kept once
  (`llama_family.grouped_continuations`): no prompt KV repeated G times, no cache concatenation, one
  decoder pass for the latent and the target (the latent's logits score the first target token);
* generic (any backbone, any number of latents): the prompt's cache is repeated G times and the latents
  and then the target are appended to it through the backbone's forward (`expand_and_think`).
"""
from __future__ import annotations

import copy

import torch

from .latent_lm import LatentR3Model, Prefix, layer_kv, linear_logprobs
from .llama_family import grouped_continuations


def fork_prefix(prefix: Prefix) -> Prefix:
    """A Prefix that can be consumed without consuming `prefix`.

    Dynamic KV caches grow by concatenation and `batch_repeat_interleave` rebinds its tensors, so the
    fork only needs new cache/layer objects sharing the same tensors (no copy of the prompt's KV).
    Other cache types are deep-copied.
    """
    from transformers.cache_utils import DynamicLayer

    cache = prefix.cache
    layers = getattr(cache, "layers", None)
    if layers is not None and all(type(l) is DynamicLayer for l in layers):  # noqa: E741
        new = copy.copy(cache)
        new.layers = [copy.copy(l) for l in layers]  # noqa: E741
    else:
        new = copy.deepcopy(cache)
    return Prefix(new, prefix.attention_mask, prefix.hidden, prefix.positions, prefix.last_logits,
                  prefix.latents)


def latent_of(ratt, prefix: Prefix) -> torch.Tensor:
    """`ratt`'s next latent after `prefix` (query = its last position); fp32 (B, D)."""
    return ratt(prefix.hidden, prefix.positions, prefix.attention_mask.bool(), prefix.hidden[:, -1],
                prefix.positions[:, -1])


def expand_and_think(model: LatentR3Model, prefix: Prefix, G: int, noise: torch.Tensor,
                     ratt=None) -> Prefix:
    """`model.think(prefix.repeat_interleave(G), noise)`, with the first latent computed once per prompt.

    prefix: a prompt-only Prefix of P rows (consumed); noise (P*G, N, D); `ratt` replaces the model's
    LatentRATT (the frozen reference of the KL penalty).  Returns the P*G-row Prefix after the latents.
    """
    ratt = model.latent_ratt if ratt is None else ratt
    N = model.num_latent
    r = latent_of(ratt, prefix).repeat_interleave(G, dim=0)
    prefix.cache.batch_repeat_interleave(G)
    rep = lambda t: t.repeat_interleave(G, dim=0)  # noqa: E731
    # Later latents attend to the prompt's hidden states; with one latent they are not needed again
    # (an empty tensor saves the repeat and the concatenations of `append`).  The prompt's last logits
    # are replaced by the latent's before any target token is scored.
    hidden = rep(prefix.hidden) if N > 1 else prefix.hidden[:, :0].repeat_interleave(G, dim=0)
    p = Prefix(prefix.cache, rep(prefix.attention_mask), hidden, rep(prefix.positions),
               prefix.last_logits[:, :0].repeat_interleave(G, dim=0))
    latents = []
    for i in range(N):
        if i:
            r = latent_of(ratt, p)
        r = r + noise[:, i].to(r.dtype)
        latents.append(r)
        p, _ = model.append(p, r[:, None, :], logits_to_keep=1)
    p.latents = torch.stack(latents, 1)
    return p


def grouped_applies(model: LatentR3Model, prefix: Prefix | None = None) -> bool:
    """Whether `sample_logprobs` can run the grouped path on this model and prompt pass (None: on a
    prompt pass of `model.prefill`, whose cache is layered)."""
    return (model.num_latent == 1 and model.lean_family() is not None
            and (prefix is None or layer_kv(prefix.cache) is not None))


def prompt_pass(model: LatentR3Model, batch: dict, shared: Prefix | None = None) -> Prefix:
    """The prompts' prefill for `sample_logprobs`: without the LM head where the grouped path will run
    (the latent's own logits score the first target token there)."""
    return model.prefill(batch["prompt_ids"], batch["prompt_mask"], shared, last_logits=not grouped_applies(model))


def sample_logprobs(model: LatentR3Model, prefix: Prefix, G: int, noise: torch.Tensor,
                    target_ids: torch.Tensor, ratt=None, grouped: bool | None = None) -> torch.Tensor:
    """Per-token target log-probs (P*G, T) of the G latent samples of each prompt.

    prefix: the prompts' pass (P rows; consumed by the generic path, only read by the grouped one);
    noise (P*G, N, D); target_ids (P, T) right-padded (pads give garbage: mask them).  `grouped`: None =
    the grouped path where it applies, False = the generic path, True = the grouped path or an error.
    """
    if grouped is None:
        grouped = grouped_applies(model, prefix)
    elif grouped and not grouped_applies(model, prefix):
        raise ValueError("the grouped path needs one latent, a Llama-family backbone and a layered KV cache")
    if not grouped:
        p = expand_and_think(model, prefix, G, noise, ratt)
        return model.target_logprobs(p, target_ids.repeat_interleave(G, dim=0))
    ratt = model.latent_ratt if ratt is None else ratt
    P, T = target_ids.shape
    r = latent_of(ratt, prefix).repeat_interleave(G, dim=0) + noise[:, 0].to(torch.float32)     # (P*G, D)
    embeds = [r.to(model.embed_dtype).view(P, G, 1, -1)]
    if T > 1:
        tgt = model.backbone.get_input_embeddings()(target_ids[:, :-1])                      # (P, T-1, D)
        embeds.append(tgt[:, None].expand(P, G, T - 1, tgt.shape[-1]))
    fam = model.lean_family()
    hidden = grouped_continuations(fam, layer_kv(prefix.cache), prefix.attention_mask, prefix.next_position,
                                   torch.cat(embeds, dim=2))
    return linear_logprobs(hidden.reshape(P * G, T, -1), fam.lm_head, target_ids.repeat_interleave(G, dim=0))


def perplexity_reward(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's reward of a latent sample: minus the perplexity of each target: ``-exp(mean over its tokens of -log p)``.

    token_logprobs, mask: ``(..., T)``; the mask selects the target tokens (EOS included).  Returns ``(...)``.
    """
    mask = mask.to(token_logprobs.dtype)
    nll = -(token_logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return -torch.exp(nll)


def draw_noise(seed: int, step: int, prompts: int, G: int, num_latent: int, hidden: int,
               std: float) -> torch.Tensor:
    """Latent noise (prompts, G, N, D) of one global batch, from (seed, step) only; sample 0 is zero."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    noise = torch.randn(prompts, G, num_latent, hidden, generator=g) * std
    noise[:, 0] = 0.0
    return noise
