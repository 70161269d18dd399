"""The traps a new user hit with another dataset layout (issue 13, item 6): each gives a message that
names the file, the line or the config key and what to do, at load time."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentr3.config import ConfigError, DataConfig, load_config
from latentr3.data import dataset
from latentr3.data.dataset import item_noun, load_catalogue, load_split, train_and_valid
from latentr3.data.splits import DataFormatError, write_catalogue, write_split

TITLES = ["Alpha", "Beta", "Greatest Hits", "Greatest Hits", "Gamma", "Delta", "Greatest Hits", "Blue", "Blue"]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(dataset, "_NOTED", set())


def rows(n: int, start_time: int = 1000, times: list[int] | None = None, with_time: bool = True) -> list[dict]:
    out = []
    for i in range(n):
        hist = [i % len(TITLES), (i + 1) % len(TITLES)]
        target = (i + 2) % len(TITLES)
        row = {"user_id": f"u{i}", "history_item_id": hist, "item_id": target,
               "history_item_title": [TITLES[h] for h in hist], "item_title": TITLES[target]}
        if with_time:
            row["timestamp"] = (times[i] if times else start_time + 10 * i)
        out.append(row)
    return out


def make_dir(root: Path, splits=("train", "valid", "test"), n: int = 20, **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_catalogue(root / "info.txt", range(len(TITLES)), TITLES)
    for name in splits:
        write_split(root / f"{name}.csv", rows(n, **kw))
    return root


def data_cfg(root: Path, *extra: str) -> DataConfig:
    return load_config(None, [f"data.dir={root}", "data.item_noun=albums", *extra]).data


# ------------------------------------------------------------------ missing files
def test_missing_train_split_names_the_file_and_the_keys(tmp_path):
    root = make_dir(tmp_path / "d", splits=("valid", "test"))
    cfg = data_cfg(root)
    with pytest.raises(FileNotFoundError) as e:
        train_and_valid(cfg, load_catalogue(cfg))
    text = str(e.value)
    assert str(root / "train.csv") in text and "no such file" in text
    assert "data.train_split='train'" in text and "data.train_split=valid" in text
    assert "data.valid_holdout" in text and "test.csv, valid.csv" in text
    assert "Errno" not in text


def test_missing_valid_and_eval_split_and_catalogue_are_named(tmp_path):
    root = make_dir(tmp_path / "d", splits=("train",))
    cfg = data_cfg(root)
    with pytest.raises(FileNotFoundError, match=r"data\.valid_split='valid'.*data\.valid_holdout=0\.1"):
        train_and_valid(cfg, load_catalogue(cfg))
    with pytest.raises(FileNotFoundError, match=r"split 'later'.*eval\.split"):
        load_split(cfg, "later")
    with pytest.raises(FileNotFoundError, match=r"items\.tsv: no such catalogue file \(data\.catalogue='items\.tsv'"):
        load_catalogue(data_cfg(root, "data.catalogue=items.tsv"))


# ------------------------------------------------------------------ train == valid, holdout and time order
def test_train_equal_valid_is_refused_in_code_too(tmp_path):
    root = make_dir(tmp_path / "d")
    cfg = data_cfg(root)
    cfg.train_split = "valid"  # set in code, after load_config's check
    with pytest.raises(ConfigError, match="data.allow_valid_on_train"):
        train_and_valid(cfg, load_catalogue(cfg))
    cfg.allow_valid_on_train = True
    train, valid = train_and_valid(cfg, load_catalogue(cfg))
    assert len(train) == len(valid) == 20


def test_holdout_with_sorted_timestamps_says_which_rows(tmp_path, capsys):
    root = make_dir(tmp_path / "d", splits=("valid", "test"))
    cfg = data_cfg(root, "data.train_split=valid", "data.valid_holdout=0.25")
    train, valid = train_and_valid(cfg, load_catalogue(cfg))
    assert (len(train), len(valid)) == (15, 5)
    err = capsys.readouterr().err
    assert "the last 5 of 20 rows" in err and "lines 17-21" in err and "timestamps from 1150" in err


def test_holdout_refuses_rows_out_of_time_order_naming_the_line(tmp_path):
    times = [100 * i for i in range(20)]
    times[7] = 50  # line 9 (header = line 1) is earlier than line 8
    root = make_dir(tmp_path / "d", splits=("valid", "test"), times=times)
    cfg = data_cfg(root, "data.train_split=valid", "data.valid_holdout=0.1")
    with pytest.raises(DataFormatError) as e:
        train_and_valid(cfg, load_catalogue(cfg))
    assert e.value.line == 9 and e.value.path == str(root / "valid.csv")
    assert "not sorted by target time" in str(e.value) and "600 of line 8" in str(e.value)


def test_holdout_refuses_a_timestamp_that_is_not_a_time(tmp_path):
    root = make_dir(tmp_path / "d", splits=("valid", "test"))
    text = (root / "valid.csv").read_text().splitlines()
    text[4] = text[4].rsplit(",", 1)[0] + ",soon"
    (root / "valid.csv").write_text("\n".join(text) + "\n")
    cfg = data_cfg(root, "data.train_split=valid", "data.valid_holdout=0.1")
    with pytest.raises(DataFormatError, match="line 5: timestamp is neither a number nor an ISO date-time: 'soon'"):
        train_and_valid(cfg, load_catalogue(cfg))


def test_holdout_without_timestamps_says_it_is_the_last_rows(tmp_path, capsys):
    root = make_dir(tmp_path / "d", splits=("valid", "test"), with_time=False)
    cfg = data_cfg(root, "data.train_split=valid", "data.valid_holdout=0.1")
    train, valid = train_and_valid(cfg, load_catalogue(cfg))
    assert (len(train), len(valid)) == (18, 2)
    err = capsys.readouterr().err
    assert "no timestamp column" in err and "the file's last rows" in err and "lines 20-21" in err


def test_cds_release_is_in_time_order():
    cds = Path(__file__).resolve().parents[2] / "shared/data/cds_and_vinyl"
    if not cds.is_dir():
        pytest.skip("no CDs data")
    cfg = load_config(None, [f"data.dir={cds}", "data.train_split=valid", "data.valid_holdout=0.1",
                             "data.item_noun=music albums"]).data
    train, valid = train_and_valid(cfg, load_catalogue(cfg))
    assert len(train) + len(valid) == 6156 and len(valid) == 616


# ------------------------------------------------------------------ item noun, shared titles
def test_item_noun_is_required_for_another_data_dir(tmp_path):
    assert item_noun(DataConfig()) == "movies"
    assert item_noun(DataConfig(dir=str(tmp_path), item_noun="office products")) == "office products"
    with pytest.raises(ConfigError, match=r"data\.item_noun is not set.*data\.item_noun='music albums'"):
        item_noun(DataConfig(dir=str(tmp_path)))


def test_shared_titles_are_counted_at_load_time(tmp_path, capsys):
    root = make_dir(tmp_path / "d")
    load_catalogue(data_cfg(root))
    err = capsys.readouterr().err
    # "Greatest Hits" x3 and "Blue" x2: 2 titles shared by 5 of 9 items
    assert "2 titles are shared by 5 of the 9 items" in err and "'Greatest Hits', 3 items" in err
    # targets (i + 2) % 9 for i < 20: ids 2, 3, 6, 7, 8 are shared -> 5 + 5 + 2 = 12 of 20
    assert "12 of the 20 test targets (60.0 %) have a shared title" in err


# ------------------------------------------------------------------ warm-up, first prompt, run summary
def test_warmup_longer_than_the_run_warns():
    from latentr3.training.common import warn_long_warmup

    with pytest.warns(UserWarning, match=r"sft\.warmup_steps=20 is not shorter than the run's 6"):
        assert warn_long_warmup("sft", 20, 6)
    assert not warn_long_warmup("grpo", 5, 6) and not warn_long_warmup("grpo", 0, 0)


TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_vocab=300",
        "prompt.template=short", "prompt.cutoff_len=64", "sft.micro_batch_size=8", "sft.batch_size=8",
        "sft.epochs=1", "sft.save_steps=1000", "sft.log_steps=1", "sft.warmup_steps=20"]


def test_sft_requires_item_noun_prints_the_first_prompt_and_warns_on_warmup(tmp_path, capsys):
    from latentr3.training.sft import train_sft

    root = make_dir(tmp_path / "d", splits=("valid", "test"))
    base = [f"data.dir={root}", "data.train_split=valid", "data.valid_holdout=0.2", *TINY]
    with pytest.raises(ConfigError, match=r"data\.item_noun"):
        train_sft(load_config(None, [*base, f"sft.output_dir={tmp_path / 'a'}"]))
    assert not (tmp_path / "a" / "best").exists()
    cfg = load_config(None, [*base, "data.item_noun=vinyl records", f"sft.output_dir={tmp_path / 'b'}"])
    with pytest.warns(UserWarning, match=r"sft\.warmup_steps=20 is not shorter than the run's 2"):
        train_sft(cfg)
    out = capsys.readouterr().out
    assert "prompt of the first training row (valid line 2):\nvinyl records: \"Alpha\", \"Beta\"\nnext:" in out
    meta = json.loads((tmp_path / "b" / "best" / "latentr3.json").read_text())
    assert meta["item_noun"] == "vinyl records"


def test_run_data_summary_reports_the_rows_used(tmp_path, monkeypatch):
    from latentr3 import pipeline

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pipeline, "_train_and_eval", stop)
    root = make_dir(tmp_path / "d", splits=("valid", "test"))
    cfg = load_config(None, [f"data.dir={root}", "data.item_noun=albums", "data.train_split=valid",
                             "data.valid_holdout=0.25", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(Stop):
        pipeline.run_pipeline(cfg)
    summary = json.loads((tmp_path / "run" / "data" / "summary.json").read_text())
    assert (summary["train_rows"], summary["valid_rows"], summary["test_rows"]) == (15, 5, 20)
    assert summary["valid_holdout"] == 0.25 and "the last 5 rows of" in summary["files"]["valid"]
