"""Metrics: hand-computed cases for MMSA's definitions on both label scales."""

import math

import numpy as np
import pytest

from almt_pipeline.metrics import (
    LOWER_IS_BETTER,
    MOSI_KEYS,
    SIMS_KEYS,
    canonical_scale,
    format_metrics,
    infer_label_scale,
    is_better,
    metric_names,
    regression_metrics,
    sort_key,
    split_metric_names,
    split_metrics,
)


def test_keys_per_scale():
    assert set(regression_metrics([0.5, -1.0], [1.0, -2.0], "mosi")) == set(MOSI_KEYS)
    assert set(regression_metrics([0.5, -1.0], [1.0, -2.0], "mosei")) == set(MOSI_KEYS)
    assert set(regression_metrics([0.5, -1.0], [1.0, -0.2], "sims")) == set(SIMS_KEYS)
    assert metric_names("sims") == SIMS_KEYS
    with pytest.raises(ValueError, match="unknown label scale"):
        regression_metrics([0.0], [0.0], "iemocap")


def test_mosi_round_half_to_even():
    # np.round: 2.5 -> 2, -0.5 -> -0 (== 0), 1.5 -> 2, 0.5 -> 0
    pred = [2.5, -0.5, 1.5, 0.5]
    truth = [2.0, 0.0, 2.0, 0.0]
    m = regression_metrics(pred, truth, "mosi")
    assert m["Mult_acc_7"] == 1.0
    # but 2.5 vs truth 3 is a miss
    assert regression_metrics([2.5], [3.0], "mosi")["Mult_acc_7"] == 0.0
    # 3.5 rounds to 4 -> also checks clipping: clipped to 3 first, so it matches 3
    assert regression_metrics([3.5], [3.0], "mosi")["Mult_acc_7"] == 1.0


def test_mosi_clipping_per_class_count():
    # pred 2.6 / truth 2.2: Acc-7 (clip 3): round 3 vs 2 -> miss; Acc-5 (clip 2): 2 vs 2 -> hit;
    # Acc-3 (clip 1): 1 vs 1 -> hit
    m = regression_metrics([2.6], [2.2], "mosi")
    assert (m["Mult_acc_7"], m["Mult_acc_5"], m["Mult_acc_3"]) == (0.0, 1.0, 1.0)
    # pred -5 vs truth -3: clipped, so all hit; MAE uses unclipped values
    m = regression_metrics([-5.0], [-3.0], "mosi")
    assert (m["Mult_acc_7"], m["Mult_acc_5"], m["Mult_acc_3"]) == (1.0, 1.0, 1.0)
    assert m["MAE"] == pytest.approx(2.0)


def test_mosi_has0_and_non0():
    pred = np.array([0.5, -0.2, 0.0, 1.0, -1.0])
    truth = np.array([1.0, 0.0, 0.0, -2.0, -1.0])
    m = regression_metrics(pred, truth, "mosi")
    # Has0: truth>=0 [T,T,T,F,F], pred>=0 [T,F,T,T,F] -> 3/5 correct
    assert m["Has0_acc_2"] == pytest.approx(0.6)
    # Has0 weighted F1: class True (support 3): P=2/3 R=2/3 F1=2/3; class False (support 2):
    # P=1/2 R=1/2 F1=1/2 -> (3*2/3 + 2*1/2) / 5 = 0.6
    assert m["Has0_F1_score"] == pytest.approx(0.6)
    # Non0 drops the two zero labels: truth>0 [T,F,F], pred>0 [T,T,F] -> 2/3
    assert m["Non0_acc_2"] == pytest.approx(2 / 3)
    # weighted F1: class True (support 1): P=1/2 R=1 F1=2/3; class False (support 2): P=1 R=1/2
    # F1=2/3 -> 2/3
    assert m["Non0_F1_score"] == pytest.approx(2 / 3)
    # pred 0.0 counts as non-negative (Has0) but not positive (Non0)
    m = regression_metrics([0.0, 0.0], [1.0, -1.0], "mosi")
    assert m["Has0_acc_2"] == 0.5 and m["Non0_acc_2"] == 0.5


def test_mosi_mae_corr():
    pred = np.array([1.0, 2.0, 3.0])
    truth = np.array([1.5, 2.0, 2.0])
    m = regression_metrics(pred, truth, "mosi")
    assert m["MAE"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["Corr"] == pytest.approx(np.corrcoef(pred, truth)[0, 1], abs=1e-6)


def test_all_zero_labels_give_nan_non0_not_crash():
    m = regression_metrics([0.3, -0.3], [0.0, 0.0], "mosi")
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])
    assert m["Has0_acc_2"] == 0.5


def test_corr_constant_prediction_is_zero():
    # np.corrcoef gives NaN (with a warning) here; we return 0.0 so model selection keeps working
    with np.errstate(all="raise"):
        assert regression_metrics([0.2, 0.2, 0.2], [1.0, -1.0, 0.5], "mosi")["Corr"] == 0.0
        assert regression_metrics([1.0, -1.0, 0.5], [0.4, 0.4, 0.4], "sims")["Corr"] == 0.0
    assert math.isnan(regression_metrics([float("nan"), 1.0], [1.0, 2.0], "mosi")["Corr"])


@pytest.mark.parametrize(
    "value, b3, b5",
    [
        (-1.0, 0, 0),
        (-0.7, 0, 0),  # -0.7 in [-1, -0.7]
        (-0.69, 0, 1),
        (-0.1, 0, 1),  # -0.1 in the lower bin of Acc-3 and in (-0.7, -0.1] of Acc-5
        (-0.09, 1, 2),
        (0.0, 1, 2),
        (0.1, 1, 2),  # 0.1 in the middle bin (-0.1, 0.1]
        (0.11, 2, 3),
        (0.7, 2, 3),  # 0.7 in (0.1, 0.7]
        (0.71, 2, 4),
        (1.0, 2, 4),
    ],
)
def test_sims_bin_edges(value, b3, b5):
    centres3 = {0: -0.5, 1: 0.0, 2: 0.5}
    centres5 = {0: -0.85, 1: -0.4, 2: 0.0, 3: 0.4, 4: 0.85}
    m = regression_metrics([value], [centres3[b3]], "sims")
    assert m["Mult_acc_3"] == 1.0
    m = regression_metrics([value], [centres5[b5]], "sims")
    assert m["Mult_acc_5"] == 1.0
    # and it misses every other bin
    for other, c in centres5.items():
        if other != b5:
            assert regression_metrics([value], [c], "sims")["Mult_acc_5"] == 0.0


def test_sims_acc2_bins_zero_is_negative():
    # [-1, 0] vs (0, 1]: 0.0 goes with the negatives
    m = regression_metrics([0.0, 0.01, -0.5], [-0.4, 0.2, 0.0], "sims")
    assert m["Mult_acc_2"] == 1.0
    assert m["F1_score"] == 1.0


def test_sims_clipping_before_mae_and_bins():
    # pred 1.8 is clipped to 1: MAE |1 - 0.6| = 0.4 (not 1.2); -3 -> -1 vs -1 -> 0
    m = regression_metrics([1.8, -3.0], [0.6, -1.0], "sims")
    assert m["MAE"] == pytest.approx(0.2)
    assert m["Mult_acc_5"] == 0.5  # 1 in (0.7, 1] vs 0.6 in (0.1, 0.7]; -1 vs -1 hit
    assert m["Mult_acc_3"] == 1.0


def test_sims_weighted_f1():
    pred = np.array([0.5, 0.5, -0.5, -0.5, 0.5])
    truth = np.array([0.5, 0.5, 0.5, -0.5, -0.5])
    m = regression_metrics(pred, truth, "sims")
    # positives (support 3): TP 2, FP 1, FN 1 -> F1 2/3; negatives (support 2): TP 1, FP 1, FN 1
    # -> F1 1/2; weighted (3*2/3 + 2*1/2) / 5 = 0.6
    assert m["F1_score"] == pytest.approx(0.6)
    assert m["Mult_acc_2"] == pytest.approx(0.6)


def test_torch_input_and_errors():
    torch = pytest.importorskip("torch")
    p = torch.tensor([[0.5], [1.5]], requires_grad=True)
    m = regression_metrics(p, torch.tensor([0.5, 1.5]), "mosi")
    assert m["MAE"] == 0.0
    with pytest.raises(ValueError):
        regression_metrics([1.0, 2.0], [1.0], "mosi")
    with pytest.raises(ValueError):
        regression_metrics([], [], "mosi")


def test_is_better_and_format():
    assert {"MAE", "Loss"} == LOWER_IS_BETTER
    assert is_better("MAE", 0.7, 0.8) and not is_better("MAE", 0.8, 0.7)
    assert is_better("Has0_acc_2", 0.8, 0.7) and not is_better("Corr", 0.5, 0.5)
    assert is_better("MAE", 1.0, None) and is_better("Corr", 0.0, float("nan"))
    assert not is_better("MAE", float("nan"), 1.0)
    # the rule training selects checkpoints with: inf never improves, anything finite beats inf
    assert not is_better("MAE", float("inf"), 1.0) and not is_better("Corr", float("inf"), 0.5)
    assert is_better("MAE", 5.0, float("inf")) and is_better("Corr", -1.0, float("-inf"))
    assert is_better("MAE", float("nan"), None)  # the first epoch is always selected
    assert not is_better("MAE", None, 1.0)
    assert sort_key("MAE", 0.5) < sort_key("MAE", 0.7) and sort_key("Corr", 0.7) < sort_key("Corr", 0.5)
    assert sort_key("MAE", float("nan")) == sort_key("Corr", None) == float("inf")
    line = format_metrics({"MAE": 0.712345, "Corr": float("nan"), "epoch": 3})
    assert line == "MAE 0.7123 | Corr nan | epoch 3"
    assert "\n" not in format_metrics(regression_metrics([0.1, 0.2], [0.3, -0.2], "mosi"))


def test_label_scale_names_and_inference():
    assert [canonical_scale(s) for s in ("mosi", "MOSEI", "sims")] == ["mosi", "mosi", "sims"]
    with pytest.raises(ValueError, match="mosi, mosei, sims"):
        canonical_scale("iemocap")
    assert infer_label_scale(np.array([-1.0, 0.4, 1.0])) == "sims"
    assert infer_label_scale(np.array([-1.0, 1.2, np.nan])) == "mosi"
    assert infer_label_scale(np.array([np.nan])) == infer_label_scale(np.zeros(0)) == "mosi"


def test_split_metrics_add_the_loss_that_selection_may_use():
    m = split_metrics([0.0, 2.0], [1.0, 1.0], "mosi")
    assert m["Loss"] == 1.0 and set(m) == set(split_metric_names("mosi"))
    assert split_metric_names("sims") == (*SIMS_KEYS, "Loss")
