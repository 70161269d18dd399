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

TEMPLATES = {"paper": PAPER_TEMPLATE, "short": SHORT_TEMPLATE}


def resolve_template(name_or_text: str) -> str:
    """A named template, or the given text when it has the {history} placeholder."""
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    if "{history}" not in name_or_text:
        raise ValueError(
            f"prompt.template {name_or_text!r} is neither one of {sorted(TEMPLATES)} nor a template "
            "with a {history} placeholder")
    return name_or_text


def quote_titles(titles: list[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def target_text(title: str) -> str:
    return f'"{title}"\n'


@dataclass
class PromptBuilder:
    """Renders and tokenizes prompts and targets for one tokenizer and template."""

    tokenizer: object
    template: str = "paper"
    item_noun: str = "items"
    cutoff_len: int = 512
    num_latent: int = 1

    def __post_init__(self) -> None:
        self.template = resolve_template(self.template)
        self._target_cache: dict[str, list[int]] = {}

    def prompt_text(self, history_titles: list[str]) -> str:
        return self.template.format(items=self.item_noun, history=quote_titles(history_titles))

    def prompt_ids(self, history_titles: list[str], reserve: int = 0) -> list[int]:
        """Token ids of the prompt; oldest history titles are dropped until prompt + `reserve` fits."""
        titles = list(history_titles)
        while True:
            ids = self.tokenizer(self.prompt_text(titles), add_special_tokens=True)["input_ids"]
            if len(ids) + reserve <= self.cutoff_len or not titles:
                return ids
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
        target = self.target_ids(target_title)
        prompt = self.prompt_ids(history_titles, reserve=len(target) + self.num_latent)
        return prompt, target

    def examples(self, pairs: list[tuple[list[str], str]]) -> list[tuple[list[int], list[int]]]:
        """`example` for many (history, target) pairs: one batched tokenizer call (the Rust tokenizer
        works through a batch in parallel, ~10x faster than a call per row); only the rare prompts that
        exceed cutoff_len go through the one-by-one truncation."""
        targets = [self.target_ids(t) for _, t in pairs]
        texts = [self.prompt_text(h) for h, _ in pairs]
        prompts = self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
        out = []
        for (history, _), prompt, target in zip(pairs, prompts, targets):
            if len(prompt) + len(target) + self.num_latent > self.cutoff_len:
                prompt = self.prompt_ids(history, reserve=len(target) + self.num_latent)
            out.append((list(prompt), target))
        return out
