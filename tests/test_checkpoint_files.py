"""A missing or truncated file in a checkpoint (issue 13, item 5): LatentR3Model.from_pretrained names
the file and what to do, instead of failing deep inside safetensors / transformers."""
from __future__ import annotations

import json
import shutil

import pytest

from latentr3.config import ModelConfig
from latentr3.model.build import build_model
from latentr3.model.latent_lm import CONFIG_NAME, RATT_NAME, CheckpointError, LatentR3Model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, titles):
    cfg = ModelConfig(backbone="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_vocab=300, num_latent=1)
    model, tok = build_model(cfg, titles, "movies")
    out = tmp_path_factory.mktemp("ckpt") / "best"
    model.save_pretrained(out, tok, {"item_noun": "movies", "template": "short", "cutoff_len": 64})
    return out


@pytest.fixture
def ckpt(saved, tmp_path):
    copy = tmp_path / "best"
    shutil.copytree(saved, copy)
    return copy


def test_intact_copy_loads(ckpt):
    model, tok, meta = LatentR3Model.from_pretrained(ckpt)
    assert meta["num_latent"] == 1 and model.num_latent == 1


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("damage, bad, problem", [
    (lambda c: (c / RATT_NAME).unlink(), RATT_NAME, "missing"),
    (lambda c: truncate(c / RATT_NAME, lambda n: n - 10), RATT_NAME, "truncated"),
    (lambda c: truncate(c / RATT_NAME, lambda n: 5), RATT_NAME, "truncated"),
    (lambda c: truncate(c / "backbone" / "model.safetensors", lambda n: n // 2), "backbone/model.safetensors",
     "truncated"),
    (lambda c: (c / "backbone" / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json"),
     "backbone/model.safetensors", "header does not parse"),
    (lambda c: (c / "backbone" / "model.safetensors").unlink(), "backbone", "no weights file"),
    (lambda c: shutil.rmtree(c / "backbone"), "backbone", "missing"),
    (lambda c: (c / "backbone" / "config.json").unlink(), "backbone/config.json", "missing"),
    (lambda c: (c / "backbone" / "tokenizer.json").unlink() or (c / "backbone" / "tokenizer_config.json").unlink(),
     "backbone/tokenizer.json", "missing"),
    (lambda c: truncate(c / CONFIG_NAME, lambda n: n // 2), CONFIG_NAME, "not valid JSON (line"),
    (lambda c: (c / CONFIG_NAME).write_text("[1, 2]"), CONFIG_NAME, "expected a JSON object"),
    (lambda c: (c / CONFIG_NAME).write_text('{"num_latent": 1}'), CONFIG_NAME, "'latent_token_id' is missing"),
])
@pytest.mark.parametrize("manifest", ["as saved", "rewritten after the damage"])
def test_damaged_checkpoint_names_the_file(ckpt, damage, bad, problem, manifest):
    from latentr3.atomic import write_manifest

    damage(ckpt)
    if manifest != "as saved":
        write_manifest(ckpt)  # e.g. a damaged copy with its own manifest: the file checks still catch it
    with pytest.raises(CheckpointError) as e:
        LatentR3Model.from_pretrained(ckpt)
    text = str(e.value)
    if manifest == "as saved":  # the manifest check comes first and names the damaged file
        assert text.startswith(str(ckpt / bad)) and "MANIFEST.json" in text, text
    else:
        assert text.startswith(f"{ckpt / bad}: ") and problem in text, text
    assert "re-run the stage that wrote it" in text and "last/" in text


def test_no_latent_checkpoint_meta_has_a_null_token(ckpt):
    from latentr3.model.latent_lm import read_checkpoint_meta

    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    (ckpt / CONFIG_NAME).write_text(json.dumps({**meta, "num_latent": 0, "latent_token_id": None}))
    assert read_checkpoint_meta(ckpt)["latent_token_id"] is None
    (ckpt / CONFIG_NAME).write_text(json.dumps({**meta, "latent_token_id": None}))
    with pytest.raises(CheckpointError, match="'latent_token_id' is null but 'num_latent' is 1"):
        read_checkpoint_meta(ckpt)


def test_bad_meta_values_name_the_key(ckpt):
    from latentr3.atomic import write_manifest

    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    for key, value, what in [("num_latent", -1, "an integer >= 0"), ("latent_rope_base", "big", "a number > 0"),
                             ("lora", "no", "true or false"), ("template", 3, "a string")]:
        (ckpt / CONFIG_NAME).write_text(json.dumps({**meta, key: value}))
        write_manifest(ckpt)  # a hand-edited latentr3.json with a matching manifest: the schema check names the key
        with pytest.raises(CheckpointError, match=f"'{key}' must be {what}"):
            LatentR3Model.from_pretrained(ckpt)
