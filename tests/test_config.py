"""Tests of latentr3.config: YAML loading, dotted overrides, type checks, the shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from latentr3.config import Config, ConfigError, load_config, save_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_empty_file(tmp_path):
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n")) == Config()


def test_yaml_values_are_loaded(tmp_path):
    cfg = load_config(write(tmp_path, """
data: {dir: /some/where, item_noun: music albums}
model: {num_latent: 2, lora: true, lora_target_modules: [q_proj, v_proj], latent_rope_base: 500}
sft: {lr: 1.0e-4, epochs: 5}
eval: {ks: [1, 10]}
"""))
    assert cfg.data.dir == "/some/where" and cfg.data.item_noun == "music albums"
    assert cfg.model.num_latent == 2 and cfg.model.lora is True
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.model.latent_rope_base == 500.0 and isinstance(cfg.model.latent_rope_base, float)
    assert cfg.sft.lr == 1e-4 and cfg.sft.epochs == 5
    assert cfg.eval.ks == [1, 10]
    assert cfg.sft.batch_size == Config().sft.batch_size  # untouched defaults stay


def test_dotted_overrides_win_over_file(tmp_path):
    path = write(tmp_path, "sft: {lr: 1.0e-4, epochs: 5}\n")
    cfg = load_config(path, ["sft.lr=3e-5", "sft.epochs=2", "data.dir=../data", "model.lora=true",
                             "eval.ks=[5, 20]", "sft.output_dir=", "prompt.template=short"])
    assert cfg.sft.lr == 3e-5 and isinstance(cfg.sft.lr, float)
    assert cfg.sft.epochs == 2
    assert cfg.data.dir == "../data"
    assert cfg.model.lora is True
    assert cfg.eval.ks == [5, 20]
    assert cfg.sft.output_dir == ""
    assert cfg.prompt.template == "short"
    # A number given to a string field is kept as text; an int is accepted for a float.
    cfg = load_config(None, ["data.item_noun=123", "sft.lr=1"])
    assert cfg.data.item_noun == "123" and cfg.sft.lr == 1.0


@pytest.mark.parametrize("override, key", [
    ("sft.lrr=1e-4", "lrr"),
    ("modle.num_latent=2", "modle"),
    ("data.dirr=/x", "dirr"),
])
def test_unknown_key_error_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path, "sft:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "learning_rate" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("sft.epochs=three", "sft.epochs"),
    ("sft.epochs=1.5", "sft.epochs"),
    ("sft.epochs=true", "sft.epochs"),
    ("sft.lr=fast", "sft.lr"),
    ("model.lora=1", "model.lora"),
    ("model.lora=yes please", "model.lora"),
    ("data.dir=[a, b]", "data.dir"),
    ("eval.ks=[1, x]", "eval.ks"),
    ("sft=3", "sft"),
])
def test_wrong_type_error_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_inputs(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["sft.lr"])
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="YAML"):
        load_config(write(tmp_path, "sft: {lr: [\n"))
    with pytest.raises(ConfigError, match="model"):
        load_config(write(tmp_path, "model: 3\n"))


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["sft.lr=2e-4", "model.lora_target_modules=[q_proj]", "data.dir=/d"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_repo_configs_load():
    paths = sorted((REPO_ROOT / "configs").glob("*.yaml"))
    assert paths, "configs/*.yaml is empty"
    from latentr3.decoding.assistant import resolve_decoding
    from latentr3.training.grpo import scope_prompts
    from latentr3.training.sft import check_sft_config

    assert REPO_ROOT / "configs" / "cds_qwen2.5-1.5b_official.yaml" in paths
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, Config), path
        # the checks the recipes run first (model, prompt, sft, grpo scope, decoding)
        check_sft_config(cfg)
        scope_prompts(cfg.grpo)
        if cfg.eval.decoding != "d3" or cfg.eval.assistant:
            resolve_decoding(cfg.eval)


def test_exponent_floats_without_dot(tmp_path):
    # PyYAML parses 1e-4 as a string; the docs use exactly this form.
    assert load_config(None, ["sft.lr=1e-4"]).sft.lr == 1e-4
    assert load_config(write(tmp_path, "sft:\n  lr: 5e-5\n")).sft.lr == 5e-5
