"""LatentR3Model: a backbone causal LM plus LatentRATT, run in a single pass over the prompt.

Sequence layout for one example (prompts left-padded, targets right-padded within a batch):

    [pad .. pad p_1 .. p_P] [l_1 .. l_N] [t_1 .. t_T]      t_T = EOS

`prefill` runs the prompt once and keeps its KV cache; `think` computes each latent
r_i = LatentRATT(H(prompt, r_1..r_{i-1}))[last] and appends it to the cache; `target_logprobs`
runs the target on the cache.  The reference implementation instead runs the whole prompt twice (once
to get the latent, once with it inserted); `two_pass_target_logprobs` keeps that design as the
executable specification that tests and the benchmark compare against.

On a Llama-family backbone (`lean_family`) `prefill`, `append` and the training `forward` run through
`llama_family.packed_pass` (the backbone's own sub-modules, the real tokens only, no HF per-call
plumbing); elsewhere, and with `model.lean = False`, through the backbone's forward.  Both give the same
numbers up to float rounding (tests/test_model.py compares log-probs, gradients, hidden states and KV).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import CheckpointError
from .latent_ratt import LatentRATT
from .llama_family import LlamaFamily, PackedRows, packed_pass

CONFIG_NAME = "latentr3.json"
RATT_NAME = "latent_ratt.safetensors"


# latentr3.json: key -> (check, what it must be); absent optional keys get the loader's defaults.
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_META_REQUIRED = {
    "num_latent": (lambda v: _is_int(v) and 0 <= v < 2 ** 31, "an integer >= 0"),
    "latent_token_id": (lambda v: v is None or (_is_int(v) and 0 <= v < 2 ** 31),
                        "an integer token id >= 0 (null without latent tokens)"),
    "latent_rope_base": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                         and 0 < v < float("inf"), "a number > 0"),
}
_META_OPTIONAL = {
    "lora": (lambda v: isinstance(v, bool), "true or false"),
    "hidden_size": (lambda v: _is_int(v) and 0 < v < 2 ** 31, "an integer >= 1"),
    "template": (lambda v: isinstance(v, str), "a string"),
    "item_noun": (lambda v: isinstance(v, str), "a string"),
    "backbone": (lambda v: isinstance(v, str), "a string"),
    "base_model": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "cutoff_len": (lambda v: _is_int(v) and 0 < v < 2 ** 31, "an integer >= 1"),
}


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """The checked contents of a checkpoint's latentr3.json.

    FileNotFoundError when the file is missing (the directory is not a checkpoint); CheckpointError
    naming the file and the key when it is not a JSON object with the fields `save_pretrained` writes.
    """
    ckpt = Path(ckpt_dir)
    path = ckpt / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a latentr3 checkpoint: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"not UTF-8 text ({e.reason} at byte {e.start})", ckpt) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})", ckpt) from None
    except (ValueError, RecursionError) as e:  # e.g. int digits limit, nesting
        raise CheckpointError(path, f"not valid JSON ({type(e).__name__}: {str(e)[:100]})", ckpt) from None
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"expected a JSON object, found a {type(meta).__name__}", ckpt)
    for key, (ok, what) in _META_REQUIRED.items():
        if key not in meta:
            raise CheckpointError(path, f"the key {key!r} is missing", ckpt)
        if not ok(meta[key]):
            raise CheckpointError(path, f"{key!r} must be {what}, got {_short_repr(meta[key])}", ckpt)
    if meta["latent_token_id"] is None and meta["num_latent"] > 0:
        raise CheckpointError(path, f"'latent_token_id' is null but 'num_latent' is {meta['num_latent']}", ckpt)
    for key, (ok, what) in _META_OPTIONAL.items():
        if key in meta and meta[key] is not None and not ok(meta[key]):
            raise CheckpointError(path, f"{key!r} must be {what}, got {_short_repr(meta[key])}", ckpt)
    return meta


def _short_repr(value) -> str:
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    return r.repr(value)


def check_safetensors(path: Path, ckpt: Path | None = None) -> None:
    """A safetensors file that exists and is complete: its header parses and the file holds every byte
    the header's tensors need (a truncated copy fails here, not deep inside the loader)."""
    if not path.is_file():
        raise CheckpointError(path, "missing", ckpt)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"truncated ({size} bytes, not even a safetensors header)", ckpt)
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(path, f"truncated or not a safetensors file (header of {n} bytes, file of "
                                  f"{size})", ckpt)
        try:
            header = json.loads(handle.read(n).decode("utf-8"))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
            raise CheckpointError(path, "not a safetensors file (its header does not parse)", ckpt) from None
    if 8 + n + end > size:
        raise CheckpointError(path, f"truncated: {size} bytes, its tensors need {8 + n + end}", ckpt)


def _check_weights_dir(directory: Path, ckpt: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(directory, "missing (the backbone weights and tokenizer)", ckpt)
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("*.bin")):
        raise CheckpointError(directory, "holds no weights file (*.safetensors)", ckpt)
    for f in files:
        check_safetensors(f, ckpt)
    if not (directory / "config.json").is_file() and not (directory / "adapter_config.json").is_file():
        raise CheckpointError(directory / "config.json", "missing (the model's configuration)", ckpt)


@dataclass
class Prefix:
    """Everything the model knows after the prompt (and latents, once `think` has run).

    The KV cache is extended in place by every call that runs tokens on it: a Prefix is consumed by use.
    """

    cache: object                 # transformers Cache holding every position so far
    attention_mask: torch.Tensor  # (B, L) 1 for real positions so far
    hidden: torch.Tensor | None   # (B, L, D) final-layer hidden states of those positions
    positions: torch.Tensor       # (B, L) position ids given to those positions
    last_logits: torch.Tensor | None  # (B, V) logits at the last position: the first target token's scores
    latents: torch.Tensor | None = None  # (B, N, D) latent thoughts, after `think`

    @property
    def next_position(self) -> torch.Tensor:
        return self.positions[:, -1] + 1

    def repeat_interleave(self, repeats: int) -> "Prefix":
        """Each row repeated `repeats` times (G rollouts or beams sharing one prompt pass)."""
        self.cache.batch_repeat_interleave(repeats)
        rep = lambda t: None if t is None else t.repeat_interleave(repeats, dim=0)  # noqa: E731
        return Prefix(self.cache, rep(self.attention_mask), rep(self.hidden), rep(self.positions),
                      rep(self.last_logits), rep(self.latents))


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (keys, values) of a layered KV cache (transformers' DynamicCache), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are sharded by FSDP (1 or 2) or DeepSpeed ZeRO-3."""
    if any(type(m).__name__.startswith("FullyShardedDataParallel") or type(m).__name__.startswith("FSDP")
           for m in module.modules()):
        return True
    return any(hasattr(p, "ds_id") or type(p).__name__ in ("FlatParameter", "DTensor") for p in module.parameters())


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[labels] with the softmax kept from the forward for the backward.

    Written by hand because autograd's route (linear, log-softmax, gather) makes three more passes over
    the (rows, vocab) logits in the backward (a zero-filled gradient for the gather, its scatter, the
    log-softmax backward with its exp), where d logp / d logits = onehot - p needs only p.  No well-kept CPU
    library fuses it (Liger's fused linear cross-entropy is Triton, GPU only).  fp32 softmax, logits
    in the weight's dtype as `lm_head(h).float()`.
    """

    # the backward runs under the forward's autocast state (bf16 matmuls in GPU training), as autograd's
    # own backward of an autocast linear would
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h, weight, labels):
        logits = F.linear(h, weight).float()
        target = logits.gather(1, labels[:, None]).squeeze(1)
        top = logits.amax(1, keepdim=True)
        e = logits.sub_(top).exp_()              # in place: the (rows, vocab) buffer becomes exp(logit - max)
        total = e.sum(1)
        ctx.save_for_backward(h, weight, labels, e, total)
        return target - top.squeeze(1) - total.log()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, weight, labels, e, total = ctx.saved_tensors
        grad_h = grad_w = None
        scale = (grad / total)[:, None]                              # p = e / total
        if ctx.needs_input_grad[0]:
            grad_h = (grad[:, None] * weight[labels].float() - (e.to(weight.dtype) @ weight).float() * scale
                      ).to(h.dtype)
        if ctx.needs_input_grad[1]:
            g = e.mul_(-scale)                                       # d/d logits = grad * (onehot - p)
            g[torch.arange(len(labels), device=g.device), labels] += grad
            grad_w = (g.to(h.dtype).t() @ h).to(weight.dtype)
        return grad_h, grad_w, None


def linear_logprobs(h: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(head(h))[labels] in fp32, h (..., D), labels (...): `gather_logprobs(head(h), labels)`
    without the (rows, vocab) log-softmax and its gradient (see `_LinearLogprobs`).  Any head other than
    a bias-free nn.Linear goes through `gather_logprobs`."""
    if type(head) is not nn.Linear or head.bias is not None:
        return gather_logprobs(head(h), labels)
    out = _LinearLogprobs.apply(h.reshape(-1, h.shape[-1]), head.weight, labels.reshape(-1))
    return out.view(labels.shape)


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels], in fp32.

    Through cross-entropy: its fused log-softmax kernels (forward and backward) are 2.5-5x faster on CPU
    than gather - logsumexp, whose max / sub / exp / sum and their backward each pass over the
    (rows, vocab) logits (measured at GRPO's 144 x 4097 shape, 1 thread)."""
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), reduction="none")
    return -nll.view(labels.shape)


class LatentR3Model(nn.Module):
    def __init__(self, backbone, latent_token_id: int | None, num_latent: int = 1,
                 rope_base: float = 1000.0, latent_init: str = "torch"):
        """`latent_init`: LatentRATT's initialisation (see LatentRATT); "hf" takes its std from the
        backbone config's `initializer_range`.  `build_model` passes `model.latent_init` (default hf);
        `from_pretrained` loads the saved weights over it."""
        super().__init__()
        if num_latent < 0:
            raise ValueError(f"num_latent must be >= 0, got {num_latent}")
        if num_latent > 0 and latent_token_id is None:
            raise ValueError("a latent model needs the latent token's id")
        self.backbone = backbone
        self.num_latent = num_latent
        self.latent_token_id = latent_token_id
        hidden = backbone.get_input_embeddings().embedding_dim
        std = 0.02
        if latent_init == "hf":
            std = getattr(getattr(backbone, "config", None), "initializer_range", None)
            if std is None:
                raise ValueError("model.latent_init=hf needs the backbone config's initializer_range; "
                                 "this backbone has none (use model.latent_init=torch)")
        self.latent_ratt = LatentRATT(hidden, rope_base, latent_init, std).float()
        if num_latent == 0:
            # Never called without a latent slot: trainable but gradient-free parameters would make
            # DistributedDataParallel fail on the second step (it waits for their gradients).  Kept,
            # frozen, so that every checkpoint has the same files.
            self.latent_ratt.requires_grad_(False)
        # prefill / append / forward run through the backbone's own sub-modules, without the padding and
        # HF's per-call plumbing, where the backbone allows (lean_family); False: always its forward
        self.lean = True
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        params = inspect.signature(type(base).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    def _run(self, inputs_embeds, attention_mask, position_ids, cache, logits_to_keep=0, hidden=True):
        # transformers >= 5.2x names the KV cache argument `cache`; earlier releases `past_key_values`.
        # The cache object is extended in place, so it is not read back from the output.
        out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=True, output_hidden_states=hidden,
                            logits_to_keep=logits_to_keep, **{self._cache_kw: cache})
        return out.logits, (out.hidden_states[-1] if hidden else None), cache

    # ------------------------------------------------------------------ single pass
    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, shared: Prefix | None = None,
                last_logits: bool = True) -> Prefix:
        """Runs the (left-padded) prompts once; logits only at the last position.

        `shared`: the prefill of one row of tokens that every prompt starts with (e.g. the template's
        instruction); `prompt_ids` then hold only what follows it.  Its KV and hidden states are reused
        for every row instead of being recomputed (its KV is copied: `think` extends the cache).
        `last_logits=False`: no LM head at all (the Prefix's last_logits is then None), for callers whose
        first scored token comes after a latent (SFT's latent + target pass, GRPO's grouped samples).
        """
        from transformers import DynamicCache

        fam = self.lean_family()
        if fam is not None and (shared is None or layer_kv(shared.cache) is not None):
            return self._lean_prefill(fam, prompt_ids, prompt_mask, shared, last_logits)
        embeds = self.backbone.get_input_embeddings()(prompt_ids)
        # an empty index tensor: the LM head runs on no position (an int 0 would mean every position)
        keep = 1 if last_logits else torch.empty(0, dtype=torch.long, device=embeds.device)
        if shared is None:
            positions = positions_from_mask(prompt_mask)
            logits, hidden, cache = self._run(embeds, prompt_mask, positions, DynamicCache(), logits_to_keep=keep)
            return Prefix(cache, prompt_mask, hidden, positions, logits[:, -1] if last_logits else None)
        B = prompt_ids.shape[0]
        cache = DynamicCache()
        for i, layer in enumerate(shared.cache.layers):
            cache.update(layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1), i)
        positions = positions_from_mask(prompt_mask) + shared.next_position[:, None]
        mask = torch.cat([shared.attention_mask.expand(B, -1), prompt_mask], 1)
        logits, hidden, cache = self._run(embeds, mask, positions, cache, logits_to_keep=keep)
        return Prefix(cache, mask, torch.cat([shared.hidden.expand(B, -1, -1), hidden], 1),
                      torch.cat([shared.positions.expand(B, -1), positions], 1),
                      logits[:, -1] if last_logits else None)

    def compute_latent(self, prefix: Prefix) -> torch.Tensor:
        """The next latent from everything in `prefix` (query = its last position). fp32 (B, D)."""
        return self.latent_ratt(prefix.hidden, prefix.positions, prefix.attention_mask.bool(),
                                prefix.hidden[:, -1], prefix.positions[:, -1])

    def latent_attention(self, prefix: Prefix) -> torch.Tensor:
        """LatentRATT's attention (B, L) over the positions of `prefix` for its next latent."""
        return self.latent_ratt.attention_weights(prefix.hidden, prefix.positions, prefix.attention_mask.bool(),
                                                  prefix.hidden[:, -1], prefix.positions[:, -1])

    def append(self, prefix: Prefix, embeds: torch.Tensor, logits_to_keep: int = 0,
               keep_hidden: bool = True) -> tuple[Prefix, torch.Tensor]:
        """Runs `embeds` (B, S, D) after `prefix` (all real positions); returns (new prefix, logits).

        `keep_hidden=False` (decoding) skips collecting hidden states; the new prefix then cannot
        compute further latents.
        """
        B, S, _ = embeds.shape
        mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(B, S)], dim=1)
        pos = prefix.next_position[:, None] + torch.arange(S, device=embeds.device)
        fam = self.lean_family() if isinstance(logits_to_keep, int) else None
        past = layer_kv(prefix.cache) if fam is not None else None
        if past is not None:
            h, _, kv = packed_pass(fam, embeds.to(self.embed_dtype), mask.new_ones(B, S), pos, past,
                                   prefix.attention_mask)
            for i, (k, v) in enumerate(kv):
                prefix.cache.update(k, v, i)          # extends the cache in place, as the backbone does
            hidden = h.view(B, S, -1)
            logits = fam.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        else:
            logits, hidden, _ = self._run(embeds.to(self.embed_dtype), mask, pos, prefix.cache, logits_to_keep,
                                          hidden=keep_hidden)
        hidden = torch.cat([prefix.hidden, hidden], 1) if keep_hidden else None
        new = Prefix(prefix.cache, mask, hidden, torch.cat([prefix.positions, pos], 1), logits[:, -1],
                     prefix.latents)
        return new, logits

    def think(self, prefix: Prefix, noise: torch.Tensor | None = None, hold_last: bool = False) -> Prefix:
        """Computes the N latent thoughts and appends them to the cache.

        `noise` (B, N, D), when given, is added to each latent before it is fed (GRPO rollouts).
        `hold_last`: the last latent is computed (in `latents`) but not appended, for a caller that runs
        it in one pass with what follows (`forward`).
        """
        latents = []
        for i in range(self.num_latent):
            r = self.compute_latent(prefix)
            if noise is not None:
                r = r + noise[:, i].to(r.dtype)
            latents.append(r)
            if not (hold_last and i == self.num_latent - 1):
                prefix, _ = self.append(prefix, r[:, None, :], logits_to_keep=1)
        if latents:
            prefix.latents = torch.stack(latents, 1)
        return prefix

    def target_logprobs(self, prefix: Prefix, target_ids: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs (B, T) of right-padded targets after `prefix` (pads give garbage: mask them).

        Only t_1..t_{T-1} are run; t_1 is scored by the prefix's last logits.
        """
        logits = prefix.last_logits[:, None, :]
        if target_ids.shape[1] > 1:
            embeds = self.backbone.get_input_embeddings()(target_ids[:, :-1])
            _, step_logits = self.append(prefix, embeds, keep_hidden=False)
            logits = torch.cat([logits, step_logits], dim=1)
        return gather_logprobs(logits, target_ids)

    def forward(self, prompt_ids, prompt_mask, target_ids, target_mask, noise=None) -> torch.Tensor:
        """Per-token target log-probs (B, T) of the single-pass model; padding positions are zeroed.

        The last latent is run in the same backbone pass as the target (its logits score t_1), so a
        training step makes one pass for the prompt and one for latent + target (with N latents, N - 1
        one-token passes before it): `think` + `target_logprobs` would add a one-token pass of every
        layer, forward and backward (on a GPU some hundreds of kernel launches per step).  The prompt pass
        then needs no LM head.  Same numbers as `think` + `target_logprobs` up to float rounding.
        """
        fam = self.lean_family() if self.num_latent <= 1 else None
        if fam is not None:
            with fam.one_weight_grad():
                return self._packed_forward(fam, prompt_ids, prompt_mask, target_ids, target_mask, noise)
        if self.num_latent == 0:
            return self.target_logprobs(self.prefill(prompt_ids, prompt_mask), target_ids) * target_mask
        prefix = self.think(self.prefill(prompt_ids, prompt_mask, last_logits=False), noise, hold_last=True)
        embeds = prefix.latents[:, -1:].to(self.embed_dtype)
        if target_ids.shape[1] > 1:
            embeds = torch.cat([embeds, self.backbone.get_input_embeddings()(target_ids[:, :-1])], dim=1)
        _, logits = self.append(prefix, embeds, keep_hidden=False)
        return gather_logprobs(logits, target_ids) * target_mask

    # ------------------------------------------------------------------ padding-free training pass
    def lean_family(self):
        """The backbone's layer loop (`llama_family.LlamaFamily`, memoised) when prefill / append / forward
        may run through it, else None: a Llama-family backbone, no attention dropout while training,
        parameters not sharded (FSDP / DeepSpeed ZeRO-3 gather a layer's weights in its forward, which
        this path bypasses) and `self.lean` (True; False forces the backbone's own forward)."""
        if not self.lean:
            return None
        fam = self.__dict__.get("_llama_family", False)
        if fam is False:
            fam = LlamaFamily(self.backbone) if LlamaFamily.supports(self.backbone) else None
            self.__dict__["_llama_family"] = fam
        if fam is None or (self.training and getattr(self.backbone.config, "attention_dropout", 0.0)):
            return None
        return None if _sharded(self.backbone) else fam

    def _lean_prefill(self, fam, prompt_ids, prompt_mask, shared: Prefix | None, last_logits: bool,
                      embeds: torch.Tensor | None = None) -> Prefix:
        """`prefill` through `packed_pass`: the real prompt tokens only, no HF plumbing (same numbers up
        to float rounding; the KV and hidden states at padding are zeros, masked everywhere).  `embeds`:
        the prompt's input embeddings when the caller has looked them up."""
        from transformers import DynamicCache

        B = prompt_ids.shape[0]
        if embeds is None:
            embeds = self.backbone.get_input_embeddings()(prompt_ids)
        positions = positions_from_mask(prompt_mask)
        past = past_mask = None
        if shared is not None:
            positions = positions + shared.next_position[:, None]
            past, past_mask = layer_kv(shared.cache), shared.attention_mask
        h, rows, kv = packed_pass(fam, embeds, prompt_mask, positions, past, past_mask)
        hidden = rows.unpack(h)
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            if past is not None:
                k = torch.cat([past[i][0].expand(B, -1, -1, -1), k], 2)
                v = torch.cat([past[i][1].expand(B, -1, -1, -1), v], 2)
            cache.update(k, v, i)
        logits = fam.lm_head(hidden[:, -1]) if last_logits else None
        if shared is None:
            return Prefix(cache, prompt_mask, hidden, positions, logits)
        return Prefix(cache, torch.cat([shared.attention_mask.expand(B, -1), prompt_mask], 1),
                      torch.cat([shared.hidden.expand(B, -1, -1), hidden], 1),
                      torch.cat([shared.positions.expand(B, -1), positions], 1), logits)

    def _packed_forward(self, fam, prompt_ids, prompt_mask, target_ids, target_mask, noise=None):
        """`forward` with the projections, MLP and LM head on the real tokens only.

        Measured on SmolLM2-135M (short template, micro-batch 16, CDs): 60 % of the positions of a
        prompt + target batch were real.  With a latent, two passes, as `forward`: the prompt, then one
        continuation row per target token, [latent, t_1 .. t_{T-1}], reading the prompt's KV; without one,
        a single pass (`_packed_no_latent`).  Same numbers as the backbone's forward up to float rounding.
        """
        # One embedding lookup for the prompt and the target tokens: with a trained embedding each lookup's
        # backward writes a dense (vocab, width) gradient, which autograd then adds to the others.
        T, Lp = target_ids.shape[1], prompt_ids.shape[1]
        embeds = self.backbone.get_input_embeddings()(torch.cat([prompt_ids, target_ids[:, :-1]], 1))
        if self.num_latent == 0:
            return self._packed_no_latent(fam, embeds, prompt_mask, target_ids, target_mask)
        prefix = self._lean_prefill(fam, prompt_ids, prompt_mask, None, False, embeds[:, :Lp])
        r = self.compute_latent(prefix)
        if noise is not None:
            r = r + noise[:, 0].to(r.dtype)
        cont = torch.cat([r[:, None].to(self.embed_dtype), embeds[:, Lp:]], 1)
        start = prefix.next_position
        h, rows, _ = packed_pass(fam, cont, target_mask, start[:, None] + torch.arange(T, device=start.device),
                                 layer_kv(prefix.cache), prefix.attention_mask)
        logp = linear_logprobs(h, fam.lm_head, rows.pack(target_ids))
        return rows.unpack(logp)

    @staticmethod
    def _packed_no_latent(fam, embeds, prompt_mask, target_ids, target_mask):
        """Without a latent nothing waits for the prompt's output, so prompt and target inputs run as one
        packed causal pass (no past, no mask tensor; one set of per-layer ops instead of two, and the
        continuation's small matmuls join the prompt's).  Row b's inputs are its real prompt tokens and
        target tokens t_1 .. t_{T_b - 1} (input j is kept where target j + 1 is real); its last T_b real
        tokens, the last prompt token first, score t_1 .. t_{T_b}."""
        mask = torch.cat([prompt_mask, target_mask[:, 1:]], 1).bool()
        h, rows, _ = packed_pass(fam, embeds, mask, positions_from_mask(mask))
        # the scoring rows sit where `target_mask` does, shifted one column left onto the last prompt token
        scoring = torch.cat([torch.zeros_like(prompt_mask[:, 1:]), target_mask], 1).bool().reshape(-1)
        targets = PackedRows(target_mask.bool())
        logp = linear_logprobs(h[scoring[rows.index]], fam.lm_head, targets.pack(target_ids))
        return targets.unpack(logp)

    # ------------------------------------------------------------------ reference two-pass design
    def two_pass_target_logprobs(self, prompt_ids, prompt_mask, target_ids, target_mask,
                                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """The reference design: a full forward per latent, then one more over prompt+latents+target.

        Kept as the specification the single-pass path must match (tests) and as the benchmark baseline.
        """
        seq, mask = self.two_pass_inputs(prompt_ids, prompt_mask, noise)
        return self.two_pass_score(seq, mask, target_ids, target_mask)

    def two_pass_inputs(self, prompt_ids, prompt_mask, noise: torch.Tensor | None = None):
        """Reference pass 1: a full forward over the prompt (and earlier latents) per latent ->
        (prompt + latent embeddings, mask).  `noise` (B, N, D) is added to each latent as in `think`."""
        B = prompt_ids.shape[0]
        seq = self.backbone.get_input_embeddings()(prompt_ids)
        mask = prompt_mask
        for i in range(self.num_latent):
            pos = positions_from_mask(mask)
            out = self.backbone(inputs_embeds=seq, attention_mask=mask, position_ids=pos,
                                output_hidden_states=True, use_cache=False)
            h = out.hidden_states[-1]
            r = self.latent_ratt(h, pos, mask.bool(), h[:, -1], pos[:, -1])
            if noise is not None:
                r = r + noise[:, i].to(r.dtype)
            seq = torch.cat([seq, r[:, None].to(seq.dtype)], 1)
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        return seq, mask

    def two_pass_score(self, seq, mask, target_ids, target_mask) -> torch.Tensor:
        """Reference pass 2: a full forward over `seq` (prompt + latents) + target -> per-token target
        log-probs (B, T), padding zeroed."""
        L = seq.shape[1]
        full = torch.cat([seq, self.backbone.get_input_embeddings()(target_ids)], 1)
        full_mask = torch.cat([mask, target_mask], 1)
        out = self.backbone(inputs_embeds=full, attention_mask=full_mask,
                            position_ids=positions_from_mask(full_mask), use_cache=False)
        logits = out.logits[:, L - 1: L - 1 + target_ids.shape[1]]
        return gather_logprobs(logits, target_ids) * target_mask

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, out_dir: str | Path, tokenizer, extra: dict | None = None, catalogue=None) -> None:
        """backbone/ (full weights or LoRA adapter, safetensors, + tokenizer), LatentRATT, latentr3.json,
        catalogue.txt (when `catalogue` is given: a checkpoint then recommends without the data
        directory), MANIFEST.json (written last; see latentr3.atomic)."""
        from ..atomic import atomic_directory

        with atomic_directory(out_dir) as out:  # complete with its MANIFEST.json, or not there at all
            self._save_files(out, tokenizer, extra)
            if catalogue is not None:
                from ..data.dataset import save_catalogue_copy

                save_catalogue_copy(out, catalogue)

    def _save_files(self, out: Path, tokenizer, extra: dict | None) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(out / "backbone", safe_serialization=True)
        if _is_peft(self.backbone):
            # The adapter alone cannot be reloaded: the base may be a from-config (tiny) model and its
            # embeddings were resized for the latent token with a random row.  Save the base weights
            # (without the LoRA layers) under base/, where from_pretrained looks first.
            base = self.backbone.get_base_model()
            base_sd = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
            base.save_pretrained(out / "base", state_dict=base_sd, safe_serialization=True)
        tokenizer.save_pretrained(out / "backbone")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.latent_ratt.state_dict().items()},
                  str(out / RATT_NAME))
        meta = {"num_latent": self.num_latent, "latent_token_id": self.latent_token_id,
                "latent_rope_base": self.latent_ratt.rope_base,
                "hidden_size": self.latent_ratt.hidden_size,
                "lora": _is_peft(self.backbone), **(extra or {})}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))  # inside the atomic directory

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu"):
        """Loads a checkpoint written by `save_pretrained`; returns (model, tokenizer, meta)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        from ..atomic import recover_directory, verify_manifest

        ckpt = Path(ckpt_dir)
        recover_directory(ckpt)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
        if not (ckpt / CONFIG_NAME).exists() and not (ckpt / "MANIFEST.json").exists():
            raise FileNotFoundError(f"{ckpt} is not a latentr3 checkpoint: {CONFIG_NAME} is missing")
        verify_manifest(ckpt)  # names a missing, truncated or corrupt file (CheckpointError)
        meta = read_checkpoint_meta(ckpt)
        _check_weights_dir(ckpt / "backbone", ckpt)
        if (ckpt / "base").exists():
            _check_weights_dir(ckpt / "base", ckpt)
        check_safetensors(ckpt / RATT_NAME, ckpt)
        if not any((ckpt / "backbone" / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            raise CheckpointError(ckpt / "backbone" / "tokenizer.json", "missing (the tokenizer)", ckpt)
        tok = load_tokenizer(ckpt / "backbone")
        if meta.get("lora"):
            from peft import PeftModel

            if not (ckpt / "base").exists() and not meta.get("base_model"):
                raise CheckpointError(ckpt / CONFIG_NAME, "a LoRA checkpoint without base/ must name its "
                                      "'base_model'", ckpt)
            base_dir = ckpt / "base" if (ckpt / "base").exists() else meta["base_model"]
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
            if base.get_input_embeddings().num_embeddings < len(tok):
                base.resize_token_embeddings(len(tok), mean_resizing=False)
            backbone = PeftModel.from_pretrained(base, ckpt / "backbone")
        else:
            backbone = AutoModelForCausalLM.from_pretrained(ckpt / "backbone", dtype=dtype)
        model = cls(backbone, meta["latent_token_id"], meta["num_latent"], meta["latent_rope_base"])
        model.latent_ratt.load_state_dict(load_file(str(ckpt / RATT_NAME)))
        return model.to(device), tok, meta


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in `directory`, as the class it was saved as.

    AutoTokenizer picks the class from the model config next to it (Qwen2Tokenizer for the tiny Qwen2
    backbone), and that class rebuilds its own pre-tokenizer instead of the saved tokenizer.json's: the
    dataset-trained tiny tokenizer would then split text differently (digits one by one) than in training.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = Path(directory) / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if tok_cfg.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")
