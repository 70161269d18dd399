"""A reference-style constrained decoder, written for the benchmark after the authors' design.

For each batch of users:

1. one full forward over the (left-padded) prompt, no cache, to get the final hidden states; the latent
   thought is LatentRATT over them (`LatentR3Model.two_pass_inputs`, as in `two_pass_target_logprobs`; repeated
   once per latent slot, each time over prompt + earlier latents);
2. Hugging Face `generate(inputs_embeds=prompt embeddings + latent(s), ...)` with beam search
   (num_beams = num_return_sequences = 10, length_penalty 1.0, max_new_tokens = trie depth), which runs
   the prompt a second time, and a `prefix_allowed_tokens_fn` that looks the allowed next ids of every
   beam up in a dict keyed by the tuple of ids generated so far (built from the same target sequences
   as our trie, `PromptBuilder.target_ids(title)`).

The generated ids are mapped back to titles through the same dict of full sequences.  Nothing here is
used by the package; `benchmarks/bench_eval.py` times it against `constrained_beam_search` and checks
that both return the same lists.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from latentr3.data.dataset import left_pad
from latentr3.model.latent_lm import LatentR3Model


def build_prefix_table(sequences: dict[str, list[int]]) -> tuple[dict[tuple, list[int]], dict[tuple, str]]:
    """(prefix tuple -> sorted allowed next ids, full sequence tuple -> title)."""
    allowed: dict[tuple, set] = defaultdict(set)
    full: dict[tuple, str] = {}
    for title, seq in sequences.items():
        seq = tuple(seq)
        full[seq] = title
        for i in range(len(seq)):
            allowed[seq[:i]].add(seq[i])
    return {k: sorted(v) for k, v in allowed.items()}, full


class ReferenceDecoder:
    def __init__(self, model: LatentR3Model, titles: list[str], builder, eos_id: int, pad_id: int,
                 num_beams: int = 10, top_k: int = 10, length_penalty: float = 1.0,
                 early_stopping: bool | str = False):
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        seqs = {t: builder.target_ids(t) for t in dict.fromkeys(titles)}
        self.allowed, self.full = build_prefix_table(seqs)
        self.max_new_tokens = max(len(s) for s in seqs.values())
        self.num_beams, self.top_k = num_beams, top_k
        self.length_penalty, self.early_stopping = length_penalty, early_stopping

    def _allowed_fn(self, batch_id: int, sent: torch.Tensor) -> list[int]:
        # `sent` holds only the generated ids (generation from inputs_embeds has no prompt ids).
        # A prefix outside the table can only belong to a beam already at -inf: give it EOS.
        return self.allowed.get(tuple(sent.tolist()), [self.eos_id])

    @torch.no_grad()
    def decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[tuple[list[str], list[float]]]:
        seq, mask = self.model.two_pass_inputs(prompt_ids, prompt_mask)   # pass 1: full forward(s)
        out = self.model.backbone.generate(
            inputs_embeds=seq, attention_mask=mask, num_beams=self.num_beams,
            num_return_sequences=self.num_beams, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping, max_new_tokens=self.max_new_tokens, do_sample=False,
            prefix_allowed_tokens_fn=self._allowed_fn, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            output_scores=True, return_dict_in_generate=True)
        B = prompt_ids.shape[0]
        ids = out.sequences.view(B, self.num_beams, -1).tolist()
        scores = out.sequences_scores.view(B, self.num_beams).tolist()
        results = []
        for b in range(B):
            titles, sc = [], []
            for s, score in zip(ids[b], scores[b]):
                seq_ids = tuple(s[: s.index(self.eos_id) + 1]) if self.eos_id in s else tuple(s)
                title = self.full.get(seq_ids)
                if title is None or score < -1e8 or title in titles:
                    continue  # padding hypotheses (the -1e9 initial beams) or an unconstrained leftover
                titles.append(title)
                sc.append(score)
            results.append((titles[: self.top_k], sc[: self.top_k]))
        return results

    def recommend(self, prompts: list[list[int]], batch_size: int) -> list[tuple[list[str], list[float]]]:
        """Same batching as `latentr3.evaluation.evaluate.recommend_prompts` (sorted by prompt length)."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], self.pad_id, self.model.device)
            for j, r in zip(idx, self.decode(ids, mask)):
                out[j] = r
        return out
