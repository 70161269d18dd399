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


# ------------------------------------------------------------------ allowed values (config.RULES)
import dataclasses  # noqa: E402
import math  # noqa: E402

from latentr3.config import FREE, RULES, Each, NonEmpty, OneOf, Range, check_config  # noqa: E402


def all_keys() -> set[str]:
    return {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.type
            if isinstance(s.type, type) else getattr(Config(), s.name))}


def test_every_field_has_a_rule_or_is_free():
    keys = all_keys()
    assert not (set(RULES) & FREE), "a key is both ruled and free"
    assert set(RULES) | FREE == keys, (f"unclassified: {sorted(keys - set(RULES) - FREE)}; "
                                       f"stale: {sorted((set(RULES) | FREE) - keys)}")


def test_enum_rules_match_the_modules_that_use_them():
    from latentr3.data.splits import CATALOGUE_FORMATS
    from latentr3.decoding.assistant import PRESETS
    from latentr3.model.build import DTYPES
    from latentr3.training.advantages import ADVANTAGE_RULES
    from latentr3.training.common import SCHEDULERS

    assert set(RULES["data.catalogue_format"].values) == set(CATALOGUE_FORMATS)
    assert set(RULES["eval.decoding"].values) == set(PRESETS)
    assert set(RULES["model.dtype"].values) == {"auto", *DTYPES} == set(RULES["eval.dtype"].values)
    assert set(RULES["grpo.advantage"].values) == set(ADVANTAGE_RULES)
    from latentr3.model.latent_ratt import LatentRATT
    from latentr3.training.advantages import ADVANTAGE_SCOPES

    assert set(RULES["grpo.advantage_scope"].values) == set(ADVANTAGE_SCOPES)
    assert set(RULES["model.latent_init"].values) == set(LatentRATT.INITS)
    assert set(RULES["sft.scheduler"].values) == set(SCHEDULERS) == set(RULES["grpo.scheduler"].values)


def _bad_value(rule):
    """A value the rule refuses (for the generic test below)."""
    if isinstance(rule, OneOf):
        return "no-such-choice"
    if isinstance(rule, NonEmpty):
        return ""
    if isinstance(rule, Each):
        return [_bad_value(rule.rule)]
    assert isinstance(rule, Range)
    if rule.lo is not None:
        value = rule.lo - 1 if not rule.lo_open else rule.lo
        while value in rule.also:
            value -= 1
        return value
    return rule.hi + 1


@pytest.mark.parametrize("key", sorted(RULES))
def test_every_rule_refuses_a_bad_value_naming_the_key(key):
    value = _bad_value(RULES[key])
    default = getattr(getattr(Config(), key.split(".")[0]), key.split(".")[1])
    if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
        value = math.floor(value)
    override = f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
    if value == "":
        override = f"{key}=''"
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and "must" in str(e.value), str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("data.catalogue_format=tsv", ["data.catalogue_format", "'auto'", "'title_id'", "'code_title_id'", "'tsv'"]),
    ("data.valid_holdout=1.5", ["data.valid_holdout", "in [0, 1)", "1.5"]),
    ("data.valid_holdout=-0.1", ["data.valid_holdout", "in [0, 1)"]),
    ("sft.scheduler=step", ["sft.scheduler", "'linear'", "'cosine'", "'constant'"]),
    ("grpo.scheduler=exp", ["grpo.scheduler", "'cosine'"]),
    ("grpo.advantage=ppo", ["grpo.advantage", "'batch'", "'group'", "'popularity_group'"]),
    ("grpo.prefix_cache=lazy", ["grpo.prefix_cache", "'keep'", "'recompute'"]),
    ("eval.decoding=beam", ["eval.decoding", "'bigrec'", "'d3'"]),
    ("sasrec.loss_positions=first", ["sasrec.loss_positions", "'all'", "'last'"]),
    ("sasrec.title_score=mean", ["sasrec.title_score", "'max'", "'sum'"]),
    ("sasrec.device=tpu", ["sasrec.device", "'auto'", "'cpu'", "'cuda'", "cuda:N"]),
    ("model.dtype=fp16", ["model.dtype", "'bfloat16'", "'float32'"]),
    ("eval.dtype=half", ["eval.dtype", "'auto'"]),
    ("sft.lr=-1e-4", ["sft.lr must be > 0", "-0.0001"]),
    ("grpo.lr=0", ["grpo.lr must be > 0"]),
    ("sasrec.lr=-1", ["sasrec.lr must be > 0"]),
    ("sft.lr=.nan", ["sft.lr must be > 0", "nan"]),
    ("sft.lr=.inf", ["sft.lr must be > 0", "inf"]),
    ("sft.batch_size=0", ["sft.batch_size must be >= 1"]),
    ("grpo.micro_batch_size=0", ["grpo.micro_batch_size must be >= 1"]),
    ("eval.batch_size=-3", ["eval.batch_size must be >= 1"]),
    ("sasrec.batch_size=0", ["sasrec.batch_size must be >= 1"]),
    ("eval.ci_level=1", ["eval.ci_level must be in (0, 1)"]),
    ("eval.ci_level=0", ["eval.ci_level must be in (0, 1)"]),
    ("eval.ci_level=95", ["eval.ci_level must be in (0, 1)"]),
    ("eval.bootstrap=0", ["eval.bootstrap must be >= 1"]),
    ("eval.ks=[10, 0]", ["eval.ks[1] must be >= 1"]),
    ("eval.sample=0", ["eval.sample must be -1 (all) or >= 1"]),
    ("sasrec.dropout=1.0", ["sasrec.dropout must be in [0, 1)"]),
    ("sft.seed=-1", ["sft.seed must be in [0, 4294967295]"]),
    ("run.seeds=[0, 0]", ["run.seeds repeats a value"]),
    ("sft.epochs=99999999999999999999999", ["sft.epochs does not fit a 64-bit integer"]),
    ("sft.lr=1e999999", ["sft.lr must be > 0"]),
    ("model.tiny_hidden=30", ["model.tiny_hidden 30 is not a multiple of model.tiny_heads 4"]),
    ("sasrec.heads=3", ["sasrec.hidden 64 is not a multiple of sasrec.heads 3"]),
])
def test_bad_values_are_config_errors_at_load_time(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for text in expected:
        assert text in str(e.value), (text, str(e.value))


def test_all_problems_are_reported_together_and_the_file_is_named(tmp_path):
    path = write(tmp_path, "sft: {lr: -1, scheduler: step}\ndata: {valid_holdout: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert str(path) in text and "sft.lr" in text and "sft.scheduler" in text and "data.valid_holdout" in text


@pytest.mark.parametrize("override", ["sasrec.device=cuda:1", "sasrec.device=cpu", "eval.decoding=d3",
                                      "eval.decoding=", "data.valid_holdout=0.1", "eval.ci_level=0.9",
                                      "sft.sample=0", "eval.diagnostics_sample=-1", "sft.warmup_steps=0",
                                      "model.backbone=/some/dir", "model.tiny_heads=3", ])
def test_good_values_pass(override):
    extra = ["model.backbone=x"] if override == "model.tiny_heads=3" else []
    load_config(None, [override, *extra])


def test_train_split_equal_to_valid_split_is_refused_unless_held_out_or_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.train_split=valid"])
    text = str(e.value)
    assert "data.train_split and data.valid_split are both 'valid'" in text
    assert "data.valid_holdout" in text and "data.allow_valid_on_train=true" in text
    assert load_config(None, ["data.train_split=valid", "data.valid_holdout=0.1"]).data.valid_holdout == 0.1
    assert load_config(None, ["data.train_split=valid", "data.allow_valid_on_train=true"]).data.allow_valid_on_train


def test_check_config_catches_values_set_in_code():
    cfg = Config()
    assert check_config(cfg) is cfg
    cfg.data.catalogue_format = "csv"
    with pytest.raises(ConfigError, match=r"data\.catalogue_format"):
        check_config(cfg)


def test_config_file_and_override_failures_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"override 'sft\.lr'.*not valid YAML"):
        load_config(None, ["sft.lr=[1, 2"])
    with pytest.raises(ConfigError, match="NUL byte on line 2"):
        load_config(write(tmp_path, "sft:\n  lr: 1\x00\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("data: {item_noun: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)


def test_empty_section_is_the_defaults(tmp_path):
    path = write(tmp_path, "sft:\n# lr: 1e-4\ndata:\n")
    assert load_config(path) == Config()
    assert load_config(path, ["sft.lr=2e-4"]).sft.lr == 2e-4
