"""Config loading is strict: unknown keys, wrong types, bad choices and out-of-range values are one-line errors."""

import dataclasses

import pytest

from almt_pipeline.config import (
    BUILTIN_CONFIGS,
    Config,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    replace_config,
)
from almt_pipeline.errors import ConfigError
from almt_pipeline.metrics import SCALES


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
    message = r"bad.yaml: unknown config key 'model.fusion_dpeth' \(did you mean 'fusion_depth'\?\)"
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_unknown_section(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
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


@pytest.mark.parametrize("text, message", [
    ("train:\n  epochs: ten\n", "'train.epochs' must be an integer"),
    ("model:\n  masked: 1\n", "'model.masked' must be true or false"),
    ("train:\n  amp: fp8\n", "'train.amp' must be one of none, bf16, fp16"),
    ("train:\n  epochs: 0\n", r"'train.epochs' must be in \[1, 100000\], got 0"),
    ("train:\n  epochs: 100001\n", r"'train.epochs' must be in \[1, 100000\], got 100001"),
    ("extract:\n  visual:\n    backend: openface\n", "'extract.visual.backend' must be one of"),
    ("model: [1, 2]\n", "'model' must be a mapping"),
    ("model:\n  text_len: [\n", "not valid YAML"),
    ("train:\n  seed: 99999999999999999999\n", r"'train.seed' must be in \[0, 9223372036854775807\)"),
    ("train:\n  seeds: [1, -2]\n", r"'train.seeds' must hold seeds in \[0, 9223372036854775807\), got -2"),
    ("model:\n  embed_heads: 0\n", r"'model.embed_heads' must be in \[1, 256\], got 0"),
    ("model:\n  fusion_depth: -1\n", r"'model.fusion_depth' must be in \[1, 64\], got -1"),
    ("model:\n  fusion_depth: 1000000\n", r"'model.fusion_depth' must be in \[1, 64\], got 1000000"),
    ("model:\n  dim: 0\n", r"'model.dim' must be in \[1, 65536\], got 0"),
    ("model:\n  dim: 10000000\n", r"'model.dim' must be in \[1, 65536\], got 10000000"),
    ("model:\n  text_len: 1000000000\n", r"'model.text_len' must be in \[1, 100000\], got 1000000000"),
    ("model:\n  fusion_heads: 1000000\n", r"'model.fusion_heads' must be in \[1, 256\], got 1000000"),
    (f"model:\n  dim: {10**400}\n", r"'model.dim' must be in \[1, 65536\], got 1000"),  # no float overflow
    ("model:\n  dropout: 1.5\n", r"'model.dropout' must be in \[0, 1\), got 1.5"),
    ("model:\n  dropout: .nan\n", r"'model.dropout' must be in \[0, 1\), got nan"),
    ("train:\n  lr: nan\n", "'train.lr' must be finite and greater than 0, got nan"),
    ("train:\n  lr: .inf\n", "'train.lr' must be finite and greater than 0, got inf"),
    ("train:\n  lr: 0\n", "'train.lr' must be greater than 0, got 0.0"),
    ("train:\n  weight_decay: -1.0e-4\n", "'train.weight_decay' must be at least 0, got -0.0001"),
    ("train:\n  warmup_ratio: 1.0\n", r"'train.warmup_ratio' must be in \[0, 1\), got 1.0"),
    ("train:\n  patience: 0\n", r"'train.patience' must be in \[1, 100000\] \(or null\), got 0"),
    ("train:\n  grad_clip: -1\n", r"'train.grad_clip' must be at least 0 \(or null\), got -1.0"),
    ("train:\n  eval_batch_size: 0\n", r"'train.eval_batch_size' must be in \[1, 4096\], got 0"),
    ("train:\n  batch_size: 100000\n", r"'train.batch_size' must be in \[1, 4096\], got 100000"),
    ("train:\n  label_scale: imdb\n", "'train.label_scale' must be one of auto, mosi, mosei, sims, got 'imdb'"),
    ("extract:\n  min_duration: -1\n", "'extract.min_duration' must be at least 0, got -1.0"),
    ("extract:\n  audio:\n    n_mfcc: 0\n", r"'extract.audio.n_mfcc' must be in \[1, 128\], got 0"),
    ("extract:\n  audio:\n    n_mfcc: 129\n", r"'extract.audio.n_mfcc' must be in \[1, 128\], got 129"),
    ("extract:\n  audio:\n    sample_rate: 1000000000\n", r"'extract.audio.sample_rate' must be in \[1, 384000\]"),
    ("extract:\n  visual:\n    fps: .nan\n", r"'extract.visual.fps' must be in \(0, 1000\], got nan"),
    ("extract:\n  visual:\n    fps: 1.0e+6\n", r"'extract.visual.fps' must be in \(0, 1000\], got 1000000.0"),
    ("extract:\n  visual:\n    max_side: 100000\n", r"'extract.visual.max_side' must be in \[1, 16384\]"),
])
def test_bad_values_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(p)
    assert str(err.value).startswith(f"{p}: ") and "\n" not in str(err.value)


def test_every_model_size_is_validated():
    sizes = {f.name: f.metadata["bound"].high for f in dataclasses.fields(ModelConfig) if f.type == "int"}
    assert {"embed_heads", "fusion_depth", "dim", "ahl_dim_head"} <= set(sizes)
    for name, most in sizes.items():
        for bad in (0, most + 1):
            with pytest.raises(ConfigError, match=rf"'model.{name}' must be in \[1, {most}\], got {bad}"):
                config_from_dict({"model": {name: bad}})
        assert getattr(config_from_dict({"model": {name: most}}).model, name) == most


def _numeric_fields(cls: type, where: str = "") -> list[tuple[str, dataclasses.Field]]:
    found = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            found += _numeric_fields(f.default_factory, f"{where}{f.name}.")  # type: ignore[arg-type]
        elif f.type in ("int", "int | None", "float", "float | None"):
            found.append((f"{where}{f.name}", f))
    return found


def test_every_integer_size_has_an_upper_bound():
    fields = dict(_numeric_fields(Config))
    assert {"model.dim", "train.batch_size", "train.epochs", "extract.audio.n_mfcc"} <= set(fields)
    unbounded = [name for name, f in fields.items()
                 if f.type.startswith("int") and name != "train.seed" and f.metadata["bound"].high is None]
    assert unbounded == []
    assert fields["extract.visual.fps"].metadata["bound"].high == 1000


def test_bounds_admit_their_edges():
    cfg = config_from_dict({"model": {"dropout": 0.0}, "train": {"weight_decay": 0, "warmup_ratio": 0.0,
                                                                 "patience": None, "grad_clip": None},
                            "extract": {"min_duration": 0}})
    assert cfg.train.weight_decay == 0.0 and cfg.extract.min_duration == 0.0


def test_label_scales_are_the_metrics_table():
    for scale in ("auto", *SCALES):
        assert config_from_dict({"train": {"label_scale": scale}}).train.label_scale == scale
    assert load_config("mosei").train.label_scale in SCALES


def test_config_of_an_older_checkpoint_takes_defaults_for_new_keys():
    old = config_to_dict(load_config("mosi"))
    del old["model"]["fast_attention"]
    cfg = config_from_dict(old, source="old checkpoint")
    assert cfg.model.fast_attention is True and cfg == load_config("mosi")
    assert config_from_dict({"model": {"fast_attention": False}}).model.fast_attention is False


def test_pyfeat_weights_and_batch_size_keys():
    cfg = load_config("pyfeat")
    assert cfg.extract.visual.pyfeat_weights is None and cfg.extract.visual.pyfeat_batch_size >= 1
    cfg = config_from_dict({"extract": {"visual": {"pyfeat_weights": "/data/pyfeat", "pyfeat_batch_size": 4}}})
    assert cfg.extract.visual.pyfeat_weights == "/data/pyfeat" and cfg.extract.visual.pyfeat_batch_size == 4
    assert config_from_dict({"extract": {"visual": {"pyfeat_weights": None}}}).extract.visual.pyfeat_weights is None
    with pytest.raises(ConfigError, match="'extract.visual.pyfeat_weights' must be a string"):
        config_from_dict({"extract": {"visual": {"pyfeat_weights": 5}}})
    with pytest.raises(ConfigError, match=r"'extract.visual.pyfeat_batch_size' must be in \[1, "):
        config_from_dict({"extract": {"visual": {"pyfeat_batch_size": 0}}})
