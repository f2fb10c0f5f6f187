"""Config loading is strict: unknown keys, wrong types and bad choices are one-line errors."""

import pytest

from almt_pipeline.config import (
    BUILTIN_CONFIGS, Config, config_from_dict, config_to_dict, load_config, replace_config,
)
from almt_pipeline.errors import ConfigError


@pytest.mark.parametrize("name", BUILTIN_CONFIGS)
def test_builtin_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_reference_hyperparameters():
    mosi, mosei, sims = load_config("mosi"), load_config("mosei"), load_config("sims")
    assert (mosi.model.audio_dim, mosi.model.vision_dim) == (5, 20)
    assert (mosi.model.text_len, mosi.model.audio_len, mosi.model.vision_len) == (50, 375, 500)
    assert (mosei.model.audio_dim, mosei.model.vision_dim, mosei.model.audio_len) == (74, 35, 500)
    assert (sims.model.text_len, sims.model.audio_len, sims.model.vision_len) == (39, 400, 55)
    assert (sims.model.audio_dim, sims.model.vision_dim) == (33, 709)
    assert [c.model.fusion_depth for c in (mosi, mosei, sims)] == [2, 4, 4]
    assert [c.train.seed for c in (mosi, mosei, sims)] == [7, 0, 8]
    for c in (mosi, mosei, sims):
        assert (c.train.lr, c.train.weight_decay, c.train.batch_size, c.train.epochs) == (1e-4, 1e-4, 64, 200)
        assert c.model.masked is False
    assert sims.model.text_model == "bert-base-chinese"


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  fusion_dpeth: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.fusion_dpeth' \(did you mean 'fusion_depth'\?\)"):
        load_config(p)


def test_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(p)


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: ten\n", "'train.epochs' must be an integer"),
    ("model:\n  masked: 1\n", "'model.masked' must be true or false"),
    ("train:\n  amp: fp8\n", "'train.amp' must be one of none, bf16, fp16"),
    ("train:\n  epochs: 0\n", "'train.epochs' must be positive"),
    ("extract:\n  visual:\n    backend: openface\n", "'extract.visual.backend' must be one of"),
    ("model: [1, 2]\n", "'model' must be a mapping"),
    ("model:\n  text_len: [\n", "not valid YAML"),
])
def test_bad_values(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_yaml_scientific_notation_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(p).train.lr == pytest.approx(1e-4)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no such config file or built-in config"):
        load_config("mosii")


def test_overrides_do_not_mutate_and_none_is_ignored():
    cfg = load_config("mosi")
    new = replace_config(cfg, model={"text_model": "x/y", "masked": None}, train={"epochs": 3})
    assert new.model.text_model == "x/y" and new.train.epochs == 3 and new.model.masked is False
    assert cfg.model.text_model == "bert-base-uncased" and cfg.train.epochs == 200
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        replace_config(cfg, train={"epochs": "3"})


def test_defaults_are_the_embedded_default():
    assert Config().model == load_config("default").model
