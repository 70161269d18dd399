"""Prompt text and tokenization of LatentR3 examples.

An example is ``prompt ids | latent slot(s) | target ids``.  The target, ``"<title>"`` + newline, is
tokenized on its own and EOS appended, and the two id lists are concatenated rather than the texts:
byte-level BPE merges across a text boundary, so tokenizing the joined string would make the training
targets differ from the sequences that the decoding trie allows.  `target_ids` is therefore the single
definition of "what the model produces for a title", used by training, the trie and the GRPO reward.
"""
from __future__ import annotations

from dataclasses import dataclass

PAPER_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n"
    "Given a list of {items} the user has interacted with before, please recommend a new item that "
    "the user likes to the user.\n\n"
    "### Input:\n"
    "The user has interacted with the following {items} before: {history}\n\n"
    "### Response:\n"
)
SHORT_TEMPLATE = "{items}: {history}\nnext:"

# The authors' released prompt (BIGRec/D3 lineage), typos, trailing spaces and the doubled plural
# ("{items}s") included, as two segments that are tokenized separately and whose ids are concatenated
# (instruction, then user input); the latent slot follows.  {items} is the category noun of
# OFFICIAL_ITEM_NOUNS ("musics" for CDs).  Its last prompt token, LatentRATT's query, is " \n".
OFFICIAL_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n"
    "Given a list of {items} the user recetenly enjoy, please write a new {items} that the user may bought\n",
    "### User Input: \n"
    "The user has palyed the following {items}s before: {history}\n\n"
    "### Response: \n",
)
# The category nouns of the authors' code (data.item_noun for the official template).
OFFICIAL_ITEM_NOUNS = {
    "CDs_and_Vinyl": "musics",
    "Toys_and_Games": "toys and games",
    "Video_Games": "video games",
    "Musical_Instruments": "music instruments",
}

TEMPLATES: dict[str, str | tuple[str, ...]] = {
    "paper": PAPER_TEMPLATE, "short": SHORT_TEMPLATE, "official": OFFICIAL_TEMPLATE}


def resolve_template(name_or_text: str) -> tuple[str, ...]:
    """The segments of a named template, or the given text (one segment) when it has {history}.

    Segments are tokenized one by one and their ids concatenated; only the last may hold {history}.
    """
    if name_or_text in TEMPLATES:
        t = TEMPLATES[name_or_text]
        return (t,) if isinstance(t, str) else tuple(t)
    if "{history}" not in name_or_text:
        raise ValueError(
            f"prompt.template {name_or_text!r} is neither one of {sorted(TEMPLATES)} nor a template "
            "with a {history} placeholder")
    return (name_or_text,)


def quote_titles(titles: list[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def target_text(title: str) -> str:
    return f'"{title}"\n'


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix common to all prompts."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


@dataclass
class PromptBuilder:
    """Renders and tokenizes prompts and targets for one tokenizer and template.

    Truncation, one rule for training, validation and evaluation: the oldest history titles are dropped
    until prompt + latent slot(s) fit in `cutoff_len` tokens.  The target does not count (it is unknown
    at evaluation), so the same history always gives the same prompt; a training sequence is at most
    cutoff_len + the target's length.
    """

    tokenizer: object
    template: str = "paper"
    item_noun: str = "items"
    cutoff_len: int = 512
    num_latent: int = 1

    def __post_init__(self) -> None:
        self.segments = resolve_template(self.template)
        if any("{history}" in seg for seg in self.segments[:-1]):
            raise ValueError("only the last segment of a prompt template may hold {history}")
        # The segments before the last do not depend on the history: tokenized once.
        self._head_ids: list[int] = []
        for i, seg in enumerate(self.segments[:-1]):
            self._head_ids += self._encode(seg.format(items=self.item_noun), first=i == 0)
        self._target_cache: dict[str, list[int]] = {}

    def _encode(self, text, first: bool):
        """Ids of one segment (or a list of them); special tokens (BOS) only for the prompt's start."""
        return self.tokenizer(text, add_special_tokens=first)["input_ids"]

    def _last_text(self, history_titles: list[str]) -> str:
        return self.segments[-1].format(items=self.item_noun, history=quote_titles(history_titles))

    def prompt_text(self, history_titles: list[str]) -> str:
        head = "".join(seg.format(items=self.item_noun) for seg in self.segments[:-1])
        return head + self._last_text(history_titles)

    @property
    def budget(self) -> int:
        """Most prompt tokens: cutoff_len less the latent slot(s)."""
        return self.cutoff_len - self.num_latent

    def _untruncated(self, history_titles: list[str]) -> list[int]:
        last = self._encode(self._last_text(history_titles), first=len(self.segments) == 1)
        return self._head_ids + list(last)

    def template_prefix(self) -> list[int] | None:
        """The token prefix every prompt starts with (the template's instruction), or None.

        Bounded by two prompts whose histories share no character; a prompt that does not start with it
        (a tokenizer merging across the boundary, truncation) must be run in full by the caller (the
        decoding engine does so; GRPO then shares nothing).
        """
        a, b = self.prompt_ids(["a"]), self.prompt_ids(["Zq 9"])
        n = shared_prefix_length([a, b])
        return a[:n] or None

    def prompt_ids(self, history_titles: list[str]) -> list[int]:
        """Token ids of the prompt; the oldest history titles are dropped until it fits `budget`."""
        return self._fit(history_titles)[1]

    def shown_prompt(self, history_titles: list[str]) -> str:
        """The prompt text the model is given for this history (after truncation), and what was dropped:
        printed for the first training row at the start of a run."""
        kept = self.kept_titles(history_titles)
        text = self.prompt_text(kept)
        dropped = len(history_titles) - len(kept)
        if dropped:
            text += (f"\n(the oldest {dropped} of {len(history_titles)} history titles are dropped to fit "
                     f"prompt.cutoff_len={self.cutoff_len})")
        return text

    def kept_titles(self, history_titles: list[str]) -> list[str]:
        """The history titles `prompt_ids` keeps (the oldest are dropped to fit `budget`)."""
        return self._fit(history_titles)[0]

    def _fit(self, history_titles: list[str]) -> tuple[list[str], list[int]]:
        titles = list(history_titles)
        while True:
            ids = self._untruncated(titles)
            if len(ids) <= self.budget or not titles:
                return titles, ids
            titles = titles[1:]

    def target_ids(self, title: str) -> list[int]:
        """The exact ids the model is trained to emit after the latent slot(s): "title", newline, EOS."""
        ids = self._target_cache.get(title)
        if ids is None:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise ValueError("the tokenizer has no EOS token; a target must end with one")
            ids = list(self.tokenizer(target_text(title), add_special_tokens=False)["input_ids"]) + [eos]
            self._target_cache[title] = ids
        return ids

    def example(self, history_titles: list[str], target_title: str) -> tuple[list[int], list[int]]:
        return self.prompt_ids(history_titles), self.target_ids(target_title)

    def examples(self, pairs: list[tuple[list[str], str]]) -> list[tuple[list[int], list[int]]]:
        """`example` for many (history, target) pairs: one batched tokenizer call (the Rust tokenizer
        works through a batch in parallel, ~10x faster than a call per row); only the rare prompts that
        exceed the budget go through the one-by-one truncation."""
        targets = [self.target_ids(t) for _, t in pairs]
        texts = [self._last_text(h) for h, _ in pairs]
        lasts = self._encode(texts, first=len(self.segments) == 1) if texts else []
        out = []
        for (history, _), last, target in zip(pairs, lasts, targets):
            prompt = self._head_ids + list(last)
            if len(prompt) > self.budget:
                prompt = self.prompt_ids(history)
            out.append((prompt, target))
        return out
