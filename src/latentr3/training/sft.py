"""Stage 1 of LatentR3: supervised fine-tuning of backbone + LatentRATT.

Launch: `latentr3 sft --config configs/demo.yaml [sft.lr=1e-4 ...]` on CPU or one GPU, or
`accelerate launch -m latentr3 sft --config ...` on several GPUs / nodes.

Loss: mean token NLL of the target ("<title>", newline, EOS) after the latent token(s); the prompt is
run once and its KV cache reused for the latents and the target (LatentR3Model).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..atomic import atomic_write_json
from ..config import Config
from ..data.dataset import (collate, item_noun, load_catalogue, subsample, tokenize_samples,
                            train_and_valid)
from ..data.prompts import PromptBuilder
from ..model.build import build_model
from .common import (EpochShuffleSampler, MetricsLog, RunState, adamw, already_done, build_scheduler,
                     make_accelerator, warn_long_warmup)


def masked_nll(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token NLL, number of target tokens) for one batch."""
    logp = model(batch["prompt_ids"], batch["prompt_mask"], batch["target_ids"], batch["target_mask"])
    return -logp.sum(), batch["target_mask"].sum()


@torch.no_grad()
def validation_loss(model, loader, accelerator) -> float:
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for batch in loader:
        nll, n = masked_nll(model, batch)
        total += torch.stack([nll.double(), n.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1]).item()


def check_sft_config(cfg: Config) -> None:
    """Rejects values that would fail late (after loading data) or obscurely (division by zero): every
    field's allowed values and ranges (config.RULES, also checked when a config is loaded) and the ones
    that depend on SFT."""
    from ..config import ConfigError, config_problems
    from ..data.prompts import resolve_template

    s = cfg.sft
    problems = config_problems(cfg)
    if s.micro_batch_size >= 1 and s.batch_size % s.micro_batch_size:
        problems.append(f"sft.batch_size {s.batch_size} is not a multiple of sft.micro_batch_size "
                        f"{s.micro_batch_size}")
    try:
        resolve_template(cfg.prompt.template)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))


def train_sft(cfg: Config) -> Path:
    """Runs (or resumes) SFT; returns the directory of the best checkpoint."""
    check_sft_config(cfg)
    s = cfg.sft
    out = Path(s.output_dir)
    best_dir = out / "best"
    accelerator = make_accelerator(s.batch_size, s.micro_batch_size)
    from accelerate.utils import set_seed

    set_seed(s.seed)
    state = RunState(out)
    if already_done(out, cfg, accelerator, "SFT"):
        return best_dir

    # --- data
    catalogue = load_catalogue(cfg.data)
    noun = item_noun(cfg.data)
    all_train, all_valid = train_and_valid(cfg.data, catalogue)
    train_rows = subsample(all_train, s.sample, s.seed)
    valid_rows = subsample(all_valid, s.valid_sample, s.seed)

    # --- model (a resumed tiny backbone reuses the tokenizer saved at the start)
    tok_dir = out / "tokenizer"
    tokenizer = None
    if tok_dir.exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    model, tokenizer = build_model(cfg.model, catalogue.titles, noun, tokenizer=tokenizer)
    if accelerator.is_main_process and not tok_dir.exists():
        tokenizer.save_pretrained(tok_dir)
    builder = PromptBuilder(tokenizer, cfg.prompt.template, noun, cfg.prompt.cutoff_len,
                            cfg.model.num_latent)
    if train_rows:
        accelerator.print(f"prompt of the first training row ({cfg.data.train_split} line {train_rows[0].line}):\n"
                          f"{builder.shown_prompt(train_rows[0].history_titles)}")
    meta = {"backbone": cfg.model.backbone, "item_noun": noun,
            "template": cfg.prompt.template, "cutoff_len": cfg.prompt.cutoff_len}

    if s.sample == 0:  # the paper's "0 rows" point: the model before any fine-tuning
        if accelerator.is_main_process:
            model.save_pretrained(best_dir, tokenizer, meta, catalogue=catalogue)
            atomic_write_json(out / "done.json", {"train_rows": 0})
        return best_dir

    train_set = tokenize_samples(train_rows, builder)
    valid_set = tokenize_samples(valid_rows, builder)
    pad = tokenizer.pad_token_id
    sampler = EpochShuffleSampler(len(train_set), s.seed, lengths=[len(e.prompt) + len(e.target) for e in train_set],
                                  batch=s.micro_batch_size, window=s.group_by_length)
    train_loader = DataLoader(train_set, batch_size=s.micro_batch_size, sampler=sampler,
                              collate_fn=lambda b: collate(b, pad))
    valid_loader = DataLoader(valid_set, batch_size=s.micro_batch_size, collate_fn=lambda b: collate(b, pad))

    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes
                                / accelerator.gradient_accumulation_steps)
    total_steps = s.max_steps or steps_per_epoch * s.epochs
    if accelerator.is_main_process:
        warn_long_warmup("sft", s.warmup_steps, total_steps)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], s.lr, s.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step, so the schedule is
    # laid out in process-steps.
    world = accelerator.num_processes
    scheduler = build_scheduler(optimizer, s.scheduler, s.warmup_steps * world, total_steps * world)
    model, optimizer, train_loader, valid_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, valid_loader, scheduler)

    if s.resume and state.exists():
        state.load(accelerator)
        accelerator.print(f"resuming SFT at step {state.step} (epoch {state.epoch})")
    log = MetricsLog(out / "metrics.jsonl", accelerator.is_main_process)

    def evaluate_and_keep_best() -> bool:
        """Validation loss; saves the best model; True when patience is exhausted."""
        val = validation_loss(model, valid_loader, accelerator)
        improved = val < state.best
        if improved:
            state.best, state.bad_evals = val, 0
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(best_dir, tokenizer, meta, catalogue=catalogue)
        else:
            state.bad_evals += 1
        log.write(step=state.step, epoch=state.epoch, valid_loss=val, best=state.best)
        accelerator.print(f"step {state.step}: validation loss {val:.4f} (best {state.best:.4f})")
        return s.patience > 0 and state.bad_evals >= s.patience

    # --- the loop
    from tqdm.auto import tqdm

    start = time.time()
    bar = tqdm(total=total_steps, initial=state.step, desc="sft", disable=not accelerator.is_main_process)
    model.train()
    stop = state.step >= total_steps
    while not stop and state.epoch < s.epochs:
        sampler.epoch = state.epoch
        batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        running = []
        for batch in batches:
            with accelerator.accumulate(model):
                nll, n = masked_nll(model, batch)
                loss = nll / n.clamp(min=1)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            running.append(loss.detach())   # read back only at a log step: no per-step device sync
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            if state.step % s.log_steps == 0 or state.step == 1:
                step_loss = float(torch.stack(running).mean())
                bar.set_postfix(loss=f"{step_loss:.4f}")
                log.write(step=state.step, epoch=state.epoch, loss=step_loss,
                          lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                          elapsed=state.elapsed + time.time() - start)
            running = []
            if s.eval_steps and state.step % s.eval_steps == 0 and evaluate_and_keep_best():
                stop = True
            if state.step >= total_steps:
                stop = True
            if stop or state.step % s.save_steps == 0 or state.step == s.halt_after_steps:
                state.elapsed += time.time() - start
                start = time.time()
                state.save(accelerator)
            if s.halt_after_steps and state.step == s.halt_after_steps:
                bar.close()
                accelerator.print(f"halting after step {state.step} (sft.halt_after_steps)")
                return best_dir
            if stop:
                break
        if not stop:  # end of epoch
            state.epoch += 1
            state.batches_in_epoch = 0
            stop = evaluate_and_keep_best()
            state.elapsed += time.time() - start
            start = time.time()
            state.save(accelerator)
    bar.close()
    if not s.eval_steps or state.step % s.eval_steps:
        if state.batches_in_epoch:  # stopped mid-epoch by max_steps: evaluate the last weights too
            evaluate_and_keep_best()
    state.elapsed += time.time() - start
    if accelerator.is_main_process:
        # epochs done, counting a partial last one (a max_steps stop mid-epoch)
        epochs = round(state.epoch + state.batches_in_epoch / max(len(train_loader), 1), 3)
        summary = {"steps": state.step, "epochs": epochs, "best_valid_loss": state.best,
                   "train_seconds": state.elapsed, "train_rows": len(train_set),
                   "processes": accelerator.num_processes}
        atomic_write_json(out / "done.json", summary)
    accelerator.wait_for_everyone()
    return best_dir
