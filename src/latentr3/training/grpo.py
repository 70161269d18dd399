"""Stage 2 of LatentR3: latent GRPO (backbone frozen, LatentRATT trained).

Launch: `latentr3 grpo --config configs/cds_qwen2.5-1.5b_grpo.yaml [grpo.lr=... ...]` on CPU or one GPU,
or `accelerate launch -m latentr3 grpo --config ...` on several (entry point: `train_grpo`).

Rollouts are samples of the latent thought, not of text.  For every prompt, G = `num_generations`
samples r_k = mu_theta + eps_k, eps_k ~ N(0, noise_std^2 I), are fed to the frozen LLM; sample 0 of every
prompt is noise-free.  The reward of a sample is minus the perplexity of the true target under
(prompt, r_k): ``-exp(mean token NLL)`` over the target tokens, EOS included.

The "policy log-probs" (following the paper's modified GRPO and the authors' code) are the frozen LLM's
per-token log-probs of the target given (prompt, mu_theta + eps_k), with eps_k the noise stored at
rollout time.  The loss is the PPO-clipped surrogate ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)``
with ``rho = exp(logp - logp_old)`` per token, averaged over each sequence's target tokens and then over
the sequences of the optimizer batch; gradients reach LatentRATT through the frozen LLM and the latent
embedding.  (A Gaussian-policy ratio over r_k would be the textbook alternative; it is not what the paper
trains.)  With ``num_iterations`` = 1 the old log-probs are the rollout's, so rho = 1 up to rounding and
clipping is inactive.  An optional k3 KL penalty (``beta`` > 0) to the SFT model compares against the
target log-probs under a frozen copy of the initial LatentRATT with the same noise.

One optimizer step ("step" in logs, `max_steps`, `eval_steps`, `save_steps`) is one rollout batch of
`batch_size` prompts over all processes: rollouts (no grad, micro-batches of `micro_batch_size` prompts),
rewards gathered over processes, advantages on the gathered batch, then `num_iterations` optimizer
updates, each a pass of loss micro-batches with gradient accumulation.  Gradients are averaged over
processes explicitly (the model is not DDP-wrapped: the single-pass methods are not `forward`).

Single pass: the frozen backbone runs each prompt once, under no_grad, and its KV cache is shared by the
prompt's G samples; each sample runs only its latent token(s) and target tokens on that cache
(`model/latent_rollout.py`: on Llama-family backbones with one latent, as one set of queries over the
prompt's KV, kept once).  The prompt's cache is kept from the rollout to the loss passes
(``grpo.prefix_cache: keep``: a cheap fork, the cache tensors are never written in place) or recomputed
(``recompute``).  The first latent is computed once per prompt (LatentRATT's keys/values over the prompt
are the same for all G samples).

The data order is drawn from (seed, epoch) and the noise from (seed, step) for the whole global batch,
so a resumed run and a run on any number of processes see the same batches and the same noise; an
incomplete last batch of an epoch is dropped.  The model stays in eval mode (no dropout): the loss
pass must reproduce the rollout.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..config import Config, GRPOConfig
from ..data.dataset import Example
from ..model.latent_lm import LatentR3Model, Prefix
from ..model.latent_rollout import draw_noise, fork_prefix, perplexity_reward, prompt_pass, sample_logprobs
from ..evaluation.diagnostics import DIAGNOSTICS_LOGGED, diagnose_records
from ..evaluation.evaluate import build_trie, evaluate_samples, output_vocab_size
from .advantages import (ADVANTAGE_RULES, ADVANTAGE_SCOPES, compute_advantages, item_frequencies,
                         popularity_groups, popularity_scores, popularity_thresholds)
from .common import (EpochShuffleSampler, MetricsLog, RunState, adamw, already_done, build_scheduler,
                     make_accelerator, warn_long_warmup)

NDCG_KEY = "legacy/NDCG@10"


# ============================================================================ rollouts and loss
@dataclass
class Rollout:
    """One micro-batch of prompts and their G latent samples each (rows prompt-major: p*G + k)."""

    batch: dict                    # prompt_ids, prompt_mask, target_ids, target_mask (P rows)
    noise: torch.Tensor            # (P*G, N, D) the noise each sample was drawn with
    old_logprobs: torch.Tensor     # (P*G, T) rollout target log-probs (no grad; pads unmasked)
    rewards: torch.Tensor          # (P, G)
    target_mask: torch.Tensor      # (P*G, T)
    prefix: Prefix | None = None   # the prompt pass, kept for the loss passes (prefix_cache=keep)
    ref_logprobs: torch.Tensor | None = None  # (P*G, T) under the frozen reference LatentRATT
    advantages: torch.Tensor | None = None    # (P*G,) set after the batch's rewards are gathered
    logprobs: torch.Tensor | None = None      # (P*G, T) with its graph: the rollout is the loss pass


@torch.no_grad()
def rollout(model: LatentR3Model, batch: dict, noise: torch.Tensor, G: int, keep_prefix: bool = True,
            ref_ratt=None, shared: Prefix | None = None) -> Rollout:
    """Prompt pass once per prompt, then G latent samples each: rewards and old log-probs (no grad).

    noise: (P*G, N, D) or (P, G, N, D); `shared`: the prefill of the token prefix every prompt of the
    batch starts with (the batch's prompt_ids then hold what follows it; see `model.prefill`).
    """
    noise = noise.reshape(-1, *noise.shape[-2:]).to(model.device)
    prefix = prompt_pass(model, batch, shared)
    tmask = batch["target_mask"].repeat_interleave(G, dim=0)
    logp = sample_logprobs(model, fork_prefix(prefix), G, noise, batch["target_ids"])
    ref = None
    if ref_ratt is not None:
        ref = sample_logprobs(model, fork_prefix(prefix), G, noise, batch["target_ids"], ratt=ref_ratt)
    rewards = perplexity_reward(logp, tmask).view(-1, G)
    return Rollout(batch, noise, logp, rewards, tmask, prefix if keep_prefix else None, ref)


def rollout_with_graph(model: LatentR3Model, batch: dict, noise: torch.Tensor, G: int,
                       shared: Prefix | None = None) -> Rollout:
    """A rollout whose target pass keeps its graph, so it is also the loss pass (grpo.single_pass).

    With one policy update per rollout (num_iterations 1) the PPO ratio is exp(logp - logp.detach()) = 1,
    so the loss needs the very log-probs the rollout computes: the second pass of the two-pass step
    recomputes them.  The prompt pass stays under no_grad (the backbone is frozen)."""
    noise = noise.reshape(-1, *noise.shape[-2:]).to(model.device)
    with torch.no_grad():
        prefix = prompt_pass(model, batch, shared)
    tmask = batch["target_mask"].repeat_interleave(G, dim=0)
    logp = sample_logprobs(model, prefix, G, noise, batch["target_ids"])
    old = logp.detach()
    return Rollout(batch, noise, old, perplexity_reward(old, tmask).view(-1, G), tmask, logprobs=logp)


def policy_loss(model: LatentR3Model, ro: Rollout, G: int, clip_low: float, clip_high: float,
                beta: float = 0.0, train_backbone: bool = False,
                shared: Prefix | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate of one rollout micro-batch (mean over its sequences) and token statistics.

    The prompt pass is the kept one (forked) or, without it, recomputed (under no_grad unless the
    backbone trains, i.e. LoRA).
    """
    if ro.logprobs is not None:
        logp, ro.logprobs = ro.logprobs, None  # the rollout's own pass (its graph is used once)
    else:
        if ro.prefix is not None and not train_backbone:
            prefix = fork_prefix(ro.prefix)
        else:
            with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
                prefix = model.prefill(ro.batch["prompt_ids"], ro.batch["prompt_mask"], shared)
        logp = sample_logprobs(model, prefix, G, ro.noise, ro.batch["target_ids"])
    mask = ro.target_mask.to(logp.dtype)
    adv = ro.advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - ro.old_logprobs)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if beta:
        d = (ro.ref_logprobs - logp) * mask
        per_token = per_token + beta * (torch.exp(d) - d - 1.0)
    ntok = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / ntok).mean()
    with torch.no_grad():   # 0-dim tensors: read back once per step, by grpo_step (no sync here)
        is_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        stats = {"clipped_tokens": (is_clipped * mask).sum(), "tokens": mask.sum()}
        if beta:
            stats["kl"] = (((torch.exp(d) - d - 1) * mask).sum(-1) / ntok).sum()
    return loss, stats


class TrainableState:
    """The trained parameters (LatentRATT, and LoRA when on) as an accelerate checkpointing object."""

    def __init__(self, model: torch.nn.Module):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(sd[n].to(p.device, p.dtype))


def share_template_prefix(model: LatentR3Model, prefix_ids: list[int] | None,
                          examples: list[Example]) -> tuple[Prefix | None, list[Example]]:
    """The prefill of the prefix every prompt starts with, and the examples with that prefix cut off.

    The backbone is frozen in GRPO, so the template's instruction (about half the tokens of a short
    history's prompt) is run once per run instead of once per prompt per step.  Nothing is shared, and the
    examples come back unchanged, when some prompt does not start with `prefix_ids` (or would be empty
    without it).
    """
    n = len(prefix_ids or [])
    if n == 0 or any(len(e.prompt) <= n or e.prompt[:n] != prefix_ids for e in examples):
        return None, examples
    ids = torch.tensor([prefix_ids], device=model.device)
    with torch.no_grad():
        shared = model.prefill(ids, torch.ones_like(ids))
    return shared, [dataclasses.replace(e, prompt=e.prompt[n:]) for e in examples]


def _all_reduce_mean_grads(params: list[torch.nn.Parameter], accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p))
        i += n


def scope_prompts(g: GRPOConfig) -> int:
    """Prompts per advantage computation: 0 = the whole batch (advantage_scope batch)."""
    if g.advantage_scope not in ADVANTAGE_SCOPES:
        raise ValueError(f"grpo.advantage_scope must be one of {ADVANTAGE_SCOPES}, got {g.advantage_scope!r}")
    if g.advantage_scope == "batch":
        return 0
    if g.micro_step_prompts < 1 or g.batch_size % g.micro_step_prompts:
        raise ValueError(f"grpo.micro_step_prompts must be >= 1 and divide grpo.batch_size {g.batch_size}, "
                         f"got {g.micro_step_prompts}")
    return g.micro_step_prompts


def grpo_step(model: LatentR3Model, optimizer, scheduler, micro_batches: list[dict], noise: torch.Tensor,
              g: GRPOConfig, accelerator, groups: torch.Tensor | None = None, ref_ratt=None,
              train_backbone: bool = False, shared: Prefix | None = None) -> dict:
    """One rollout batch: rollouts, gathered rewards, advantages, `num_iterations` optimizer updates.

    micro_batches: this process's share of the global batch (equal-sized, collated, on device);
    noise: (P_local, G, N, D) this process's rows of `draw_noise`; groups: (P_global,) popularity groups
    of the whole global batch (rule popularity_group); `shared`: the prefill of the prefix every prompt
    starts with (`share_template_prefix`; only with a frozen backbone).  Returns the step's statistics,
    with the gathered
    ``rewards`` and ``advantages`` tensors (P_global, G).
    """
    if shared is not None and train_backbone:
        raise ValueError("a shared prompt prefix is prefilled once, without gradients: not with a trained backbone")
    G = g.num_generations
    params = [p for p in model.parameters() if p.requires_grad]
    keep = g.prefix_cache == "keep" and not train_backbone
    single = g.single_pass and g.num_iterations == 1 and not g.beta and not train_backbone
    # --- rollouts for the whole batch (no grad, or with the graph kept when they are the loss pass)
    rollouts, k = [], 0
    for mb in micro_batches:
        P = mb["prompt_ids"].shape[0]
        rollouts.append(rollout_with_graph(model, mb, noise[k:k + P], G, shared) if single
                        else rollout(model, mb, noise[k:k + P], G, keep, ref_ratt, shared))
        k += P
    local_rewards = torch.cat([ro.rewards for ro in rollouts])
    rewards = accelerator.gather(local_rewards.contiguous())
    adv = compute_advantages(g.advantage, rewards.float(), None if groups is None else groups.to(rewards.device),
                             g.popularity_weight, scope_prompts(g))
    start = accelerator.process_index * local_rewards.shape[0]
    local_adv = adv[start:start + local_rewards.shape[0]]
    k = 0
    for ro in rollouts:
        P = ro.rewards.shape[0]
        ro.advantages = local_adv[k:k + P].reshape(-1)
        k += P
    # --- policy updates (the statistics stay on the device: one read back for the whole step, below)
    n_micro = len(rollouts)
    losses, clipped, tokens, kl = [], 0.0, 0.0, 0.0
    for _ in range(g.num_iterations):
        for ro in rollouts:
            loss, st = policy_loss(model, ro, G, g.clip_eps_low, g.clip_eps_high, g.beta, train_backbone,
                                   shared)
            (loss / n_micro).backward()
            losses.append(loss.detach())
            clipped = clipped + st["clipped_tokens"]
            tokens = tokens + st["tokens"]
            kl = kl + st.get("kl", 0.0)
        _all_reduce_mean_grads(params, accelerator)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, g.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    dev = local_rewards.device
    f64 = lambda x: torch.as_tensor(x, device=dev).to(torch.float64).reshape(())  # noqa: E731
    totals = torch.stack([torch.stack(losses).double().mean(), f64(clipped), f64(tokens), f64(kl)])
    totals = accelerator.reduce(totals, reduction="sum")
    r, a = rewards.double(), adv.double()
    names = ("reward_mean", "reward_std", "reward_noise_free", "adv_mean", "adv_std", "adv_min", "adv_max",
             "adv_zero_share", "loss", "clip_fraction", "grad_norm", "kl")
    values = torch.stack([r.mean(), r.std(unbiased=False), r[:, 0].mean(), a.mean(), a.std(unbiased=False),
                          a.min(), a.max(), (a.abs() < 1e-8).double().mean(), totals[0] / accelerator.num_processes,
                          totals[1] / totals[2].clamp(min=1), f64(grad_norm),
                          totals[3] / (rewards.numel() * g.num_iterations)]).tolist()
    stats = dict(zip(names, values))
    if not g.beta:
        del stats["kl"]
    stats.update(lr=scheduler.get_last_lr()[0], rewards=rewards.detach().cpu(), advantages=adv.detach().cpu())
    return stats


# ============================================================================ the recipe
def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _freeze_for_grpo(model: LatentR3Model, cfg: Config) -> bool:
    """Freezes the backbone; LatentRATT (and a LoRA adapter with grpo.lora) train.  True if LoRA trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.latent_ratt.parameters():
        p.requires_grad_(True)
    if not cfg.grpo.lora:
        return False
    if not hasattr(model.backbone, "peft_config"):
        from peft import LoraConfig, get_peft_model

        m = cfg.model
        lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=0.0,
                          target_modules=m.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
        model.backbone = get_peft_model(model.backbone, lora)
    for n, p in model.backbone.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    return True


def train_grpo(cfg: Config) -> Path:
    """Runs (or resumes) latent GRPO from the SFT checkpoint `cfg.grpo.init`; returns the best checkpoint.

    Writes output_dir/{config.yaml, metrics.jsonl, state/, best/, last/, done.json}.
    """
    from accelerate.utils import set_seed

    from ..data.dataset import (collate, item_noun, load_catalogue, subsample, tokenize_samples,
                                train_and_valid)
    from ..data.prompts import PromptBuilder
    from ..model.build import resolve_dtype

    g = cfg.grpo
    if not g.init:
        raise ValueError("grpo.init must name the SFT checkpoint to start from")
    if g.advantage not in ADVANTAGE_RULES:
        raise ValueError(f"grpo.advantage must be one of {ADVANTAGE_RULES}, got {g.advantage!r}")
    scope_prompts(g)
    if g.prefix_cache not in ("keep", "recompute"):
        raise ValueError(f"grpo.prefix_cache must be keep or recompute, got {g.prefix_cache!r}")
    if g.num_generations < 1 or g.num_iterations < 1:
        raise ValueError("grpo.num_generations and grpo.num_iterations must be >= 1")
    if 10 not in cfg.eval.ks or cfg.eval.top_k < 10:
        raise ValueError(f"GRPO picks its checkpoint by validation {NDCG_KEY}: eval.top_k must be >= 10 and "
                         f"eval.ks must hold 10 (got top_k {cfg.eval.top_k}, ks {cfg.eval.ks})")
    from ..decoding.assistant import resolve_decoding

    resolve_decoding(cfg.eval)  # the validation's decoding settings fail now, not after the first steps
    out = Path(g.output_dir)
    best_dir, last_dir = out / "best", out / "last"
    accelerator = make_accelerator(g.batch_size, g.micro_batch_size, mixed_precision="no")
    set_seed(g.seed)
    state = RunState(out)
    if already_done(out, cfg, accelerator, "GRPO"):
        return best_dir

    # --- model
    dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    model, tokenizer, meta = LatentR3Model.from_pretrained(g.init, dtype=dtype, device=accelerator.device)
    if model.num_latent < 1:
        raise ValueError(f"{g.init} has no latent token: GRPO trains the latent thought")
    model.eval()  # no dropout: the loss pass must reproduce the rollout
    ref_ratt = None
    if g.beta:
        ref_ratt = copy.deepcopy(model.latent_ratt).requires_grad_(False)
    train_backbone = _freeze_for_grpo(model, cfg)
    model.to(accelerator.device)
    save_meta = {k: v for k, v in meta.items()
                 if k not in ("num_latent", "latent_token_id", "latent_rope_base", "hidden_size", "lora")}
    if train_backbone and not meta.get("lora"):
        save_meta["base_model"] = str(Path(g.init).resolve() / "backbone")
    save_meta["grpo_init"] = str(g.init)
    builder = PromptBuilder(tokenizer, meta.get("template", cfg.prompt.template),
                            meta.get("item_noun") or item_noun(cfg.data),
                            meta.get("cutoff_len", cfg.prompt.cutoff_len), model.num_latent)

    # --- data
    catalogue = load_catalogue(cfg.data)
    all_train, all_valid = train_and_valid(cfg.data, catalogue)
    train_rows = subsample(all_train, g.sample, g.seed)
    train_set = tokenize_samples(train_rows, builder)
    shared = None
    if g.share_prompt_prefix and not train_backbone:
        shared, train_set = share_template_prefix(model, builder.template_prefix(), train_set)
        if shared is not None:
            accelerator.print(f"the {shared.attention_mask.shape[1]}-token instruction every prompt starts "
                              f"with is prefilled once (grpo.share_prompt_prefix)")
    groups_all = None
    if g.advantage == "popularity_group":
        freq = item_frequencies([s.history_ids for s in all_train], [s.target_id for s in all_train])
        thr = popularity_thresholds(popularity_scores([s.history_ids for s in all_train], freq),
                                    g.popularity_groups)
        groups_all = popularity_groups(popularity_scores([s.history_ids for s in train_rows], freq), thr)
    valid_rows = valid_trie = None
    pad = tokenizer.pad_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    B, mb, G = g.batch_size, g.micro_batch_size, g.num_generations
    local = B // world
    steps_per_epoch = len(train_set) // B
    if steps_per_epoch == 0:
        raise ValueError(f"grpo.batch_size {B} exceeds the {len(train_set)} training rows")
    total_steps = g.max_steps or steps_per_epoch * g.epochs
    if accelerator.is_main_process:
        warn_long_warmup("grpo", g.warmup_steps, total_steps * g.num_iterations)
        accelerator.print(f"prompt of the first training row ({cfg.data.train_split} line {train_rows[0].line}):\n"
                          f"{builder.shown_prompt(train_rows[0].history_titles)}")

    # --- optimisation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, g.lr, g.weight_decay)
    updates = total_steps * g.num_iterations
    # A prepared scheduler steps once per process per update (as in SFT): lay it out in process-steps.
    scheduler = build_scheduler(optimizer, g.scheduler, g.warmup_steps * world, updates * world)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    trainable = TrainableState(model)
    accelerator.register_for_checkpointing(trainable)
    if g.resume and state.exists():
        state.load(accelerator)
        accelerator.print(f"resuming GRPO at step {state.step} (epoch {state.epoch})")
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)
    sampler = EpochShuffleSampler(len(train_set), g.seed)

    def evaluate_and_keep_best() -> None:
        """Validation NDCG@10 (legacy protocol) by beam search; the rows and the trie are built once."""
        nonlocal valid_rows, valid_trie
        if valid_rows is None:
            valid_rows = subsample(all_valid, g.eval_sample, g.seed)
            valid_trie = build_trie(catalogue, builder, output_vocab_size(model))
        res = evaluate_samples(model, tokenizer, builder, valid_rows, catalogue, cfg.eval,
                               accelerator=accelerator, trie=valid_trie)
        ndcg = float(res.metrics[NDCG_KEY])
        if -ndcg < state.best:  # RunState keeps "lower is better"
            state.best, state.bad_evals = -ndcg, 0
            if accelerator.is_main_process:
                model.save_pretrained(best_dir, tokenizer, {**save_meta, "grpo_step": state.step,
                                                            "valid_ndcg10": ndcg}, catalogue=catalogue)
        else:
            state.bad_evals += 1
        diag = diagnose_records(model, builder, res.records, catalogue, cfg.eval, g.noise_std,
                                cfg.eval.diagnostics_sample)
        log.write(step=state.step, valid_ndcg10=ndcg, best_ndcg10=-state.best,
                  **{f"valid_{k}": v for k, v in diag.items() if k in DIAGNOSTICS_LOGGED})
        accelerator.print(f"step {state.step}: validation NDCG@10 {ndcg:.4f} (best {-state.best:.4f}); "
                          f"|r| {diag.get('latent_norm', 0):.2f} vs noise {diag['noise_norm']:.2f}, "
                          f"rank corr(reward, NDCG) {_fmt(diag.get('reward_ndcg_spearman'))}")

    # --- the loop
    from tqdm.auto import tqdm

    start = time.time()
    bar = tqdm(total=total_steps, initial=state.step, desc="grpo", disable=not accelerator.is_main_process)
    perm_epoch, perm = None, None
    while state.step < total_steps:
        if state.batches_in_epoch >= steps_per_epoch:
            state.epoch += 1
            state.batches_in_epoch = 0
        if perm_epoch != state.epoch:
            sampler.epoch = state.epoch
            perm, perm_epoch = list(iter(sampler)), state.epoch
        j = state.batches_in_epoch
        global_idx = perm[j * B:(j + 1) * B]
        mine = global_idx[rank * local:(rank + 1) * local]
        micro = []
        for s0 in range(0, local, mb):
            b = collate([train_set[i] for i in mine[s0:s0 + mb]], pad)
            micro.append({k: v.to(accelerator.device) for k, v in b.items()})
        noise = draw_noise(g.seed, state.step, B, G, model.num_latent, model.latent_ratt.hidden_size,
                           g.noise_std)[rank * local:(rank + 1) * local]
        groups = groups_all[global_idx] if groups_all is not None else None
        stats = grpo_step(model, optimizer, scheduler, micro, noise, g, accelerator, groups, ref_ratt,
                          train_backbone, shared)
        stats.pop("rewards"), stats.pop("advantages")
        state.step += 1
        state.batches_in_epoch += 1
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward_mean']:.4f}", nf=f"{stats['reward_noise_free']:.4f}",
                        clip=f"{stats['clip_fraction']:.3f}")
        if state.step % g.log_steps == 0 or state.step == 1:
            log.write(step=state.step, epoch=state.epoch, **stats, elapsed=state.elapsed + time.time() - start)
        if g.eval_steps and state.step % g.eval_steps == 0:
            evaluate_and_keep_best()
        final = state.step >= total_steps
        if final or state.step % g.save_steps == 0 or state.step == g.halt_after_steps:
            state.elapsed += time.time() - start
            start = time.time()
            state.save(accelerator)
        if g.halt_after_steps and state.step == g.halt_after_steps and not final:
            bar.close()
            accelerator.print(f"halting after step {state.step} (grpo.halt_after_steps)")
            return best_dir
    bar.close()
    if not g.eval_steps or state.step % g.eval_steps:
        evaluate_and_keep_best()
    state.elapsed += time.time() - start
    if accelerator.is_main_process:
        model.save_pretrained(last_dir, tokenizer, {**save_meta, "grpo_step": state.step}, catalogue=catalogue)
        if not (best_dir / "latentr3.json").exists():
            model.save_pretrained(best_dir, tokenizer, {**save_meta, "grpo_step": state.step}, catalogue=catalogue)
        # epochs done, counting a partial last one (a max_steps stop mid-epoch)
        epochs = round(state.epoch + state.batches_in_epoch / max(steps_per_epoch, 1), 3)
        summary = {"steps": state.step, "epochs": epochs, "train_rows": len(train_set),
                   "best_valid_ndcg10": None if math.isinf(state.best) else -state.best,
                   "train_seconds": state.elapsed, "processes": world}
        atomic_write_json(out / "done.json", summary)
    accelerator.wait_for_everyone()
    return best_dir
