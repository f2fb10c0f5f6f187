"""`almt explain`: AHL attention maps (alpha, beta), the summary-token report, averaging over a split,
perturbing one frame, and the files written; on tiny random checkpoints and a synthetic feature file."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_synthetic, make_tiny_text_model
from typer.testing import CliRunner

from almt_pipeline.cli import app
from almt_pipeline.cli_explain import default_out
from almt_pipeline.config import Config, ModelConfig, config_to_dict, load_config
from almt_pipeline.errors import ConfigError, FeatureFileError
from almt_pipeline.evaluate import evaluate, load_checked_features
from almt_pipeline.explain import (
    explain,
    explain_average,
    explain_sample,
    file_sample,
    frame_periods,
    frame_seconds,
    perturb,
    summarise,
    to_json,
    traced,
)
from almt_pipeline.features import SPLITS, save_features
from almt_pipeline.model.almt import ALMT
from almt_pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from almt_pipeline.model.text_encoder import load_text_model

TEXT_LEN, AUDIO, VISION, TEXT_DIM, N_TOKENS = 12, (20, 5), (16, 6), 32, 4
CPU = torch.device("cpu")
runner = CliRunner()


def invoke(*args):
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:  # the command logs to the runner's stream, closed once it returns
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("explain")


@pytest.fixture(scope="module")
def text_model(root) -> Path:
    return make_tiny_text_model(root / "bert")


@pytest.fixture(scope="module")
def data(root) -> Path:
    """A synthetic feature file with the `default` extraction settings in its meta (so frames have seconds)."""
    raw = make_synthetic(None, n=(4, 3, 7), text_len=TEXT_LEN, audio=AUDIO, vision=VISION, text_dim=TEXT_DIM, seed=3)
    raw["test"]["audio_lengths"][0] = AUDIO[0]  # a sample that fills the model's length: maybe pooled
    meta = {**raw["meta"], "extract": config_to_dict(load_config("default"))["extract"]}
    path = root / "data.pkl"
    save_features(path, {s: raw[s] for s in SPLITS}, meta)
    return path


def make_checkpoint(folder: Path, text_model: Path, **model: object) -> Path:
    """A random tiny ALMT (2 AHL layers) saved as a checkpoint; ``model``: ModelConfig overrides."""
    cfg = Config(name="tiny", model=ModelConfig(**{
        "text_model": str(text_model), "text_len": TEXT_LEN, "audio_dim": AUDIO[1], "audio_len": AUDIO[0],
        "vision_dim": VISION[1], "vision_len": VISION[0], "dim": 16, "n_tokens": N_TOKENS, "embed_heads": 2,
        "embed_dim_head": 8, "embed_mlp_dim": 16, "ahl_depth": 2, "ahl_heads": 2, "ahl_dim_head": 8,
        "lang_heads": 2, "lang_dim_head": 8, "lang_mlp_dim": 16, "fusion_depth": 1, "fusion_heads": 2,
        "fusion_dim_head": 8, "fusion_mlp_dim": 16, **model}))
    bert, tokenizer = load_text_model(str(text_model))
    torch.manual_seed(7)
    almt = ALMT(cfg.model, bert, TEXT_DIM).eval()
    save_checkpoint(folder, almt, cfg, tokenizer=tokenizer, text_config=bert.config.to_dict(),
                    feature_meta={"lengths": {"text": TEXT_LEN, "audio": AUDIO[0], "vision": VISION[0]}},
                    label_scale="mosi")
    return folder


@pytest.fixture(scope="module")
def ckpt_dir(root, text_model) -> Path:
    return make_checkpoint(root / "ckpt", text_model)


@pytest.fixture(scope="module")
def loaded(ckpt_dir, data):
    ckpt = load_checkpoint(ckpt_dir, CPU)
    return ckpt, load_checked_features(ckpt, ckpt_dir, data, None)


def test_maps_are_distributions_of_the_right_shape(loaded):
    ckpt, file = loaded
    for sample_id in file.splits["test"]["id"]:
        sample = file_sample(ckpt, file, str(sample_id), CPU)
        _, ahl, summary = traced(ckpt.model, sample.inputs)
        assert len(ahl) == 2 and all(set(layer) == {"audio", "vision"} for layer in ahl)
        for layer in ahl:
            for m in layer.values():
                assert m.shape == (1, N_TOKENS, N_TOKENS)
                np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
        assert set(summary) == {"text", "audio", "vision"}
        for modality, w in summary.items():
            width = {"text": TEXT_LEN, "audio": AUDIO[0], "vision": VISION[0]}[modality]
            assert w.shape == (1, N_TOKENS, N_TOKENS + width)  # unmasked: every padded position is a key
            np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
        ex = explain_sample(ckpt, sample)
        for modality, rep in ex.summary.items():
            assert rep["weights"].shape == (N_TOKENS, sample.length(modality))
            np.testing.assert_allclose(rep["weights"].sum(-1), 1.0, atol=1e-5)
            for row in rep["summary_tokens"]:
                assert math.isclose(row["to_summary_tokens"] + row["to_inputs"] + row["to_padding"], 1.0,
                                    abs_tol=1e-5)
                assert len(row["top"]) == min(3, sample.length(modality))
        assert ex.summary["text"]["labels"][0] == "[CLS]" and ex.summary["text"]["labels"][-1] == "[SEP]"


def test_score_is_the_plain_forward_and_what_evaluate_gives(loaded, ckpt_dir, data):
    ckpt, file = loaded
    ckpt.model.train()  # explaining puts the model in eval mode
    predictions = evaluate(ckpt_dir, data, device="cpu", quiet=True)["predictions"]
    for sample_id, expected in zip(file.splits["test"]["id"], predictions):
        sample = file_sample(ckpt, file, str(sample_id), CPU)
        ex = explain_sample(ckpt, sample)
        assert not ckpt.model.training
        with torch.inference_mode():
            text_bert, audio, vision, a_len, v_len = sample.inputs
            plain = float(ckpt.model(text_bert, audio, vision, audio_lengths=a_len, vision_lengths=v_len)[0])
        assert ex.score == plain
        assert ex.score == pytest.approx(float(expected), abs=1e-5)


def test_seconds_of_input_positions():
    np.testing.assert_allclose(frame_seconds(3, 0.1, 10, 3), [[0.0, 0.1], [0.1, 0.2], [0.2, 0.3]])
    pooled = frame_seconds(4, 0.5, 4, 10)  # 10 frames into 4 bins: 2, 3, 2, 3 frames (fit_length's bins)
    np.testing.assert_allclose(pooled, [[0.0, 1.0], [1.0, 2.5], [2.5, 3.5], [3.5, 5.0]])
    # audio frames are centred on k * period (librosa), the first one clipped at the clip's start
    np.testing.assert_allclose(frame_seconds(3, 0.1, 10, 3, centred=True), [[0.0, 0.05], [0.05, 0.15], [0.15, 0.25]])
    assert frame_periods({"audio": {"hop_length": 512, "sample_rate": 22050}, "visual": {"fps": 10}}) == {
        "audio": 512 / 22050, "vision": 0.1}
    assert frame_periods(None) == {} and frame_periods({"audio": {}}) == {}


def test_feature_file_positions_map_to_seconds_unless_maybe_pooled(loaded):
    ckpt, file = loaded
    ids = [str(i) for i in file.splits["test"]["id"]]
    full = file_sample(ckpt, file, ids[0], CPU)  # audio fills the model's 20 positions
    assert "audio" not in full.seconds and "pooled" in full.timing["audio"]
    ex = explain_sample(ckpt, full)
    assert all(t["seconds"] is None for row in ex.summary["audio"]["summary_tokens"] for t in row["top"])
    samples = [file_sample(ckpt, file, i, CPU) for i in ids]
    short_v = next(s for s in samples if s.length("vision") < VISION[0])
    n_v = short_v.length("vision")
    np.testing.assert_allclose(short_v.seconds["vision"][-1], [(n_v - 1) / 10, n_v / 10])
    short = next(s for s in samples if s.length("audio") < AUDIO[0])
    assert short.seconds["audio"][1, 0] == pytest.approx(0.5 * 512 / 22050)  # centred frames
    assert short.split == "test"


def test_cli_writes_pictures_and_json_that_round_trips(ckpt_dir, data, loaded, tmp_path):
    ckpt, file = loaded
    sample_id = str(file.splits["valid"]["id"][1])
    out = tmp_path / "out"
    r = invoke("explain", sample_id, "--checkpoint", ckpt_dir, "--data", data, "--out", out, "--device", "cpu",
               "--perturb-frame", "0", "--quiet")
    assert r.exit_code == 0, r.output
    assert f"{sample_id}: score" in r.output and "AHL layer 2" in r.output and "vision summary tokens" in r.output
    for name in ("attention.png", "summary_attention.png", "perturbation.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    written = json.loads((out / "attention.json").read_text())
    ex = explain(ckpt_dir, sample_id, tmp_path / "again", data=data, perturb_frame=0, device="cpu")
    assert written == to_json(ex) == json.loads(json.dumps(to_json(ex)))
    assert written["kind"] == "sample" and written["checkpoint"] == str(ckpt_dir)
    for layer, maps in zip(written["ahl"], ex.ahl):
        np.testing.assert_allclose(layer["alpha"], maps["audio"], atol=1e-5)
        np.testing.assert_allclose(np.sum(layer["beta"], axis=1), 1.0, atol=1e-4)
    assert written["perturbation"]["score_before"] == written["score"]
    assert set(written["summary"]) == {"text", "audio", "vision"}


def test_default_output_folder_is_a_safe_name():
    assert default_out("us_male$_$3") == Path("explain") / "us_male___3"
    assert default_out("clip") == Path("explain") / "clip"


def test_average_over_a_split(ckpt_dir, data, loaded, tmp_path):
    ckpt, file = loaded
    ex = explain_average(ckpt_dir, data, tmp_path / "avg", batch_size=3, device="cpu", quiet=True)
    singles = [explain_sample(ckpt, file_sample(ckpt, file, str(i), CPU)) for i in file.splits["test"]["id"]]
    assert ex.n_samples == len(singles) == 7
    for j, layer in enumerate(ex.ahl):
        for key, m in layer.items():
            np.testing.assert_allclose(m, np.mean([s.ahl[j][key] for s in singles], axis=0), atol=1e-6)
            np.testing.assert_allclose(m.sum(-1), 1.0, atol=1e-5)
    predictions = evaluate(ckpt_dir, data, device="cpu", quiet=True)["predictions"]
    assert ex.score == pytest.approx(float(np.mean(predictions)), abs=1e-5)
    assert {p.name for p in (tmp_path / "avg").iterdir()} == {"attention.png", "attention.json"}
    r = invoke("explain", "--average", "--split", "valid", "--checkpoint", ckpt_dir, "--data", data,
               "--out", tmp_path / "cli", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli" / "attention.json").read_text())["n_samples"] == 3


def test_noise_on_a_vision_frame_changes_beta_only(loaded):
    ckpt, file = loaded
    sample = file_sample(ckpt, file, str(file.splits["train"]["id"][0]), CPU)
    before = explain_sample(ckpt, sample)
    for modality, changed, kept in (("vision", "vision", "audio"), ("audio", "audio", "vision")):
        after = explain_sample(ckpt, perturb(sample, modality, 0, noise_std=3.0, seed=1))
        for b, a in zip(before.ahl, after.ahl):
            assert np.array_equal(b[kept], a[kept])  # alpha depends on language and audio only, beta on vision
        assert any(not np.allclose(b[changed], a[changed], atol=1e-7) for b, a in zip(before.ahl, after.ahl))
    again = perturb(sample, "vision", 0, noise_std=3.0, seed=1)
    assert torch.equal(again.inputs[2], perturb(sample, "vision", 0, noise_std=3.0, seed=1).inputs[2])  # seeded
    assert torch.equal(again.inputs[2][0, 1:], sample.inputs[2][0, 1:])  # only frame 0 moved
    assert torch.equal(sample.inputs[2], file_sample(ckpt, file, sample.name, CPU).inputs[2])  # input not modified


def test_bad_frame_and_unknown_id_are_one_line_errors(ckpt_dir, data, loaded, tmp_path):
    ckpt, file = loaded
    sample_id = str(file.splits["test"]["id"][1])
    n = file_sample(ckpt, file, sample_id, CPU).length("vision")
    common = ("--checkpoint", ckpt_dir, "--data", data, "--out", tmp_path / "x", "--device", "cpu")
    line = one_line_error(invoke("explain", sample_id, *common, "--perturb-frame", n))  # the first padded frame
    assert f"--perturb-frame {n} is not a real vision frame" in line and sample_id in line
    line = one_line_error(invoke("explain", sample_id, *common, "--perturb-frame", -1, "--perturb-modality", "audio"))
    assert "audio frame" in line
    line = one_line_error(invoke("explain", "nobody", *common))
    assert "data.pkl" in line and "'nobody'" in line and "14 ids" in line and "train0000$_$1" in line
    line = one_line_error(invoke("explain", "nobody", *common, "--split", "valid"))
    assert "3 ids" in line
    assert "--average" in one_line_error(invoke("explain", sample_id, *common, "--average"))
    assert "--data" in one_line_error(invoke("explain", "--average", "--checkpoint", ckpt_dir))
    with pytest.raises(ConfigError, match="noise-std"):
        perturb(file_sample(ckpt, file, sample_id, CPU), "vision", 0, noise_std=0.0)


@pytest.mark.parametrize("ablation", [
    {"guided_layers": [1]}, {"drop_modalities": ["audio"]}, {"modality_embedding": False}, {"masked": True},
    {"ahl": False},
])
def test_ablated_checkpoints_still_explain(ablation, root, text_model, data, tmp_path):
    name = "-".join(f"{k}{v}" for k, v in ablation.items()).replace(" ", "")
    ckpt_dir = make_checkpoint(root / name, text_model, **ablation)
    out = tmp_path / "out"
    r = invoke("explain", "test0000$_$2", "--checkpoint", ckpt_dir, "--data", data, "--out", out, "--device", "cpu",
               "--quiet", "--perturb-frame", "0")
    assert r.exit_code == 0, r.output
    written = json.loads((out / "attention.json").read_text())
    assert (out / "attention.png").is_file() and (out / "perturbation.png").is_file()
    layers = written["ahl"]
    if "guided_layers" in ablation:
        assert layers[0]["alpha"] is not None and layers[1] == {"layer": 2, "alpha": None, "beta": None}
        assert "not guided" in r.output
    if "drop_modalities" in ablation:
        assert all(layer["alpha"] is None and layer["beta"] is not None for layer in layers)
        assert set(written["summary"]) == {"text", "vision"}
    if "ahl" in ablation:
        assert layers == []
    for rep in written["summary"].values():  # rows: 1, or 0 for a token with nothing on real inputs
        reaches = [row["to_inputs"] > 0 for row in rep["summary_tokens"]]
        np.testing.assert_allclose(np.sum(rep["weights"], axis=1), np.array(reaches, float), atol=1e-4)
        assert any(reaches)
        if "modality_embedding" in ablation:  # pooling weights: no summary-token keys
            assert all(row["to_summary_tokens"] == 0 for row in rep["summary_tokens"])
        if "masked" in ablation:  # padding is masked out
            assert all(row["to_padding"] == 0 for row in rep["summary_tokens"])
    ckpt = load_checkpoint(ckpt_dir, CPU)
    expected = evaluate(ckpt_dir, data, device="cpu", quiet=True)["predictions"][1]
    assert written["score"] == pytest.approx(float(expected), abs=1e-5)
    assert ckpt.cfg.model.n_tokens == written["n_tokens"]


def test_summarise_splits_the_shares():
    w = np.array([[0.1, 0.2, 0.3, 0.1, 0.3], [0.5, 0.5, 0.0, 0.0, 0.0]])  # 2 token keys, 2 real, 1 padding
    rep = summarise(w, token_keys=2, n_real=2, seconds=np.array([[0.0, 0.1], [0.1, 0.2]]), top=1)
    np.testing.assert_allclose(rep["weights"], [[0.75, 0.25], [0.0, 0.0]])
    first, second = rep["summary_tokens"]
    assert first["to_summary_tokens"] == pytest.approx(0.3) and first["to_inputs"] == pytest.approx(0.4)
    assert first["to_padding"] == pytest.approx(0.3)
    assert first["top"] == [{"position": 0, "weight": pytest.approx(0.75), "label": None, "seconds": [0.0, 0.1]}]
    assert second["top"] == []  # nothing on the real inputs


# ---------------------------------------------------------------- a real clip, end to end


@pytest.fixture(scope="module")
def clip_checkpoint(root, text_model) -> Path:
    """A random ALMT with the `default` extractors' widths and settings (as tests/test_long_text.py)."""
    default = load_config("default")
    cfg = Config(name="tiny", model=ModelConfig(
        text_model=str(text_model), text_len=TEXT_LEN, audio_dim=default.model.audio_dim, audio_len=40,
        vision_dim=default.model.vision_dim, vision_len=16, dim=16, n_tokens=N_TOKENS, embed_heads=2,
        embed_dim_head=8, embed_mlp_dim=16, ahl_depth=2, ahl_heads=2, ahl_dim_head=8, lang_heads=2,
        lang_dim_head=8, lang_mlp_dim=16, fusion_depth=1, fusion_heads=2, fusion_dim_head=8, fusion_mlp_dim=16,
    ))
    bert, tokenizer = load_text_model(str(text_model))
    torch.manual_seed(5)
    out = root / "clip_ckpt"
    save_checkpoint(out, ALMT(cfg.model, bert, TEXT_DIM).eval(), cfg, tokenizer=tokenizer,
                    text_config=bert.config.to_dict(), label_scale="mosi",
                    feature_meta={"extract": config_to_dict(default)["extract"],
                                  "lengths": {"text": TEXT_LEN, "audio": 40, "vision": 16}})
    return out


@pytest.mark.slow
def test_clip_end_to_end_matches_predict(clip_checkpoint, repo_root, tmp_path):
    from almt_pipeline.prediction import Predictor

    clip = repo_root / "samples" / "new_clip.mp4"
    short, long = "A delightful movie.", " ".join(["good fun"] * 12)  # the long one needs 3 windows of 10 tokens
    predictor = Predictor(clip_checkpoint, device="cpu")
    for transcript in (short, long):
        expected = predictor.predict(clip, transcript=transcript)
        out = tmp_path / str(len(transcript))
        r = invoke("explain", clip, "--checkpoint", clip_checkpoint, "--transcript", transcript, "--out", out,
                   "--device", "cpu", "--perturb-frame", "3", "--quiet")
        assert r.exit_code == 0, r.output
        written = json.loads((out / "attention.json").read_text())
        assert written["kind"] == "clip" and written["target"] == str(clip)
        audio = written["summary"]["audio"]
        assert "mean-pooled into 40 positions" in audio["timing"]  # a 4 s clip has ~180 audio frames
        last_end = audio["summary_tokens"][0]["top"][0]["seconds"][1]
        assert 0 < last_end <= expected.duration + 0.05
        assert written["summary"]["text"]["labels"][:2] == ["[CLS]", transcript.split()[0].lower()]
        if transcript == short:
            assert written["score"] == pytest.approx(expected.score, abs=1e-5) and written["clip_score"] is None
        else:
            assert len(expected.windows) == 3 and "first window" in r.output
            assert written["score"] == pytest.approx(expected.windows[0].score, abs=1e-5)
            assert written["clip_score"] == pytest.approx(expected.score, abs=1e-5)
        assert {p.name for p in out.iterdir()} == {"attention.png", "attention.json", "summary_attention.png",
                                                   "perturbation.png"}


def test_an_id_in_several_splits_must_be_given_a_split(loaded):
    import dataclasses

    ckpt, file = loaded
    splits = {k: dict(v) for k, v in file.splits.items()}
    splits["test"]["id"] = splits["train"]["id"][: len(splits["test"]["id"])].copy()  # ids repeated across splits
    both = dataclasses.replace(file, splits=splits)
    shared = str(splits["test"]["id"][0])
    with pytest.raises(FeatureFileError, match="is in the train and test splits; choose one with --split"):
        file_sample(ckpt, both, shared, CPU)
    only_test = dataclasses.replace(file, splits={"test": splits["test"]})
    assert file_sample(ckpt, only_test, shared, CPU).split == "test"
