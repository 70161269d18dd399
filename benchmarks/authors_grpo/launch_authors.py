"""Runs the authors' RL stage (R3/src/grpo_attention_tuning/train_noise_grpo.py) unchanged, under torchrun,
($R3_DIR: a checkout of github.com/xuwenxinedu/R3 at 8c390b5), with three outside adjustments made
by monkeypatching before their script runs:

  1. fp32: their script hard-codes LatentModel.from_pretrained(..., torch_dtype=torch.bfloat16) and
     GRPOConfig(bf16=True); this CPU has no fast bf16, so torch_dtype is forced to float32 and bf16 to False.
  2. max_steps: GRPOConfig(max_steps=$AUTHORS_MAX_STEPS) so a run can be shorter/longer than one epoch
     (with 64 rows, 2 prompts/step, one epoch is exactly 32 steps, so 32 changes nothing).
  3. timing: a TrainerCallback (added after their trainer's __init__) records perf_counter at
     on_step_begin / on_step_end and train_runtime, and writes them to $AUTHORS_TIMING_DIR/timing_rank{R}.json.

Their noisy_layer module (imported by model.py, absent from the public repository, never called by the RL
stage) comes from shim/noisy_layer.py.  Every other argument goes to their fire CLI as given.
"""
import hashlib
import resource
import json
import os
import runpy
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from launch_paths import r3_source  # noqa: E402

SRC = r3_source()
SCRIPT = os.path.join(SRC, "train_noise_grpo.py")
sys.path.insert(0, os.path.join(HERE, "shim"))
sys.path.insert(0, SRC)

import torch  # noqa: E402
import trl  # noqa: E402
from transformers import PreTrainedModel, TrainerCallback  # noqa: E402

import model as their_model  # noqa: E402  (same module object their script imports as `model`)
import grpo_trainer as their_trainer  # noqa: E402

MAX_STEPS = int(os.environ.get("AUTHORS_MAX_STEPS", "32"))
TIMING_DIR = os.environ.get("AUTHORS_TIMING_DIR", ".")
RANK = int(os.environ.get("RANK", "0"))

# 1. fp32 weights
_orig_fp = PreTrainedModel.from_pretrained.__func__


def _fp32_from_pretrained(cls, *args, **kwargs):
    kwargs["torch_dtype"] = torch.float32
    return _orig_fp(cls, *args, **kwargs)


their_model.LatentModel.from_pretrained = classmethod(_fp32_from_pretrained)

# 1+2. GRPOConfig: bf16 off, max_steps
_OrigGRPOConfig = trl.GRPOConfig


def _GRPOConfig(*args, **kwargs):
    kwargs["bf16"] = False
    kwargs["max_steps"] = MAX_STEPS
    cfg = _OrigGRPOConfig(*args, **kwargs)
    if RANK == 0:
        keys = ["per_device_train_batch_size", "gradient_accumulation_steps", "num_generations", "num_iterations",
                "beta", "epsilon", "epsilon_high", "learning_rate", "max_steps", "bf16", "fp16", "seed",
                "logging_steps", "save_steps", "eval_strategy", "max_completion_length", "temperature"]
        print("AUTHORS_CONFIG " + json.dumps({k: str(getattr(cfg, k)) for k in keys}), flush=True)
    return cfg


trl.GRPOConfig = _GRPOConfig


# 3. timing
class StepTimer(TrainerCallback):
    def __init__(self):
        self.begin, self.end, self.train_runtime = [], [], None
        self.t_train_begin = None
        self.trainer = None

    def on_train_begin(self, args, state, control, **kw):
        self.t_train_begin = time.perf_counter()

    def on_step_begin(self, args, state, control, **kw):
        self.begin.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.end.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "train_runtime" in logs:
            self.train_runtime = logs["train_runtime"]

    def on_train_end(self, args, state, control, model=None, **kw):
        m = model.module if hasattr(model, "module") else model
        h = hashlib.sha256()
        for k, v in sorted(m.attention.state_dict().items()):
            h.update(v.detach().float().contiguous().numpy().tobytes())
        out = {"rank": RANK, "threads": torch.get_num_threads(), "global_step": state.global_step,
               "step_begin": self.begin, "step_end": self.end, "train_begin": self.t_train_begin,
               "train_end": time.perf_counter(), "train_runtime": self.train_runtime,
               "attention_sha256": h.hexdigest(), "dtype": str(next(m.parameters()).dtype),
               "device": str(next(m.parameters()).device),
               "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
               "wrapped": type(self.trainer.model_wrapped).__name__ if self.trainer is not None else None,
               "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        os.makedirs(TIMING_DIR, exist_ok=True)
        with open(os.path.join(TIMING_DIR, f"timing_rank{RANK}.json"), "w") as f:
            json.dump(out, f)


_orig_init = their_trainer.NoiseGRPORecTrainer.__init__


def _init_with_timer(self, *args, **kwargs):
    _orig_init(self, *args, **kwargs)
    self._authors_timer = StepTimer()
    self._authors_timer.trainer = self
    self.add_callback(self._authors_timer)


their_trainer.NoiseGRPORecTrainer.__init__ = _init_with_timer

sys.argv = [SCRIPT] + sys.argv[1:]
runpy.run_path(SCRIPT, run_name="__main__")
