"""Loss, metrics, config and optimiser pieces of the trial, checked against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from chestxpert.trainable.config import ConfigError, TrialConfig
from chestxpert.trainable.losses import EPSILON, make_loss
from chestxpert.trainable.metrics import auc_metrics, metric_key

LABELS = 14


def reference_weighted_loss(y, p, pos_w, neg_w, mask=None):
    """The issue's formula, one class at a time: sum over classes of the batch mean."""
    total = 0.0
    for i in range(y.shape[1]):
        terms = []
        for b in range(y.shape[0]):
            term = -(
                pos_w[i] * y[b, i] * math.log(p[b, i] + EPSILON)
                + neg_w[i] * (1 - y[b, i]) * math.log(1 - p[b, i] + EPSILON)
            )
            terms.append(term * (1.0 if mask is None else mask[b, i]))
        total += sum(terms) / y.shape[0]
    return total


def reference_focal_loss(y, p, gamma, mask):
    total = 0.0
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            term = -(
                y[b, i] * (1 - p[b, i]) ** gamma * math.log(p[b, i] + EPSILON)
                + (1 - y[b, i]) * p[b, i] ** gamma * math.log(1 - p[b, i] + EPSILON)
            )
            total += term * mask[b, i]
    return total / y.shape[0]


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    y = (rng.random((32, LABELS)) < 0.2).astype(np.float32)
    p = rng.uniform(0.001, 0.999, (32, LABELS)).astype(np.float32)
    pos_w = rng.uniform(0.8, 1.0, LABELS)
    neg_w = 1.0 - pos_w
    mask = (rng.random((32, LABELS)) > 0.25).astype(np.float32)
    return y, p, pos_w, neg_w, mask


def _value(loss, y, p, mask):
    return float(loss(np.concatenate([y, mask], axis=1), p))


def test_weighted_loss_equals_the_per_class_reference_loop(batch) -> None:
    y, p, pos_w, neg_w, _ = batch
    loss = make_loss("weighted_bce", LABELS, pos_w, neg_w)
    expected = reference_weighted_loss(y, p, pos_w, neg_w)
    assert _value(loss, y, p, np.ones_like(y)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["weighted_bce", "bce", "focal"])
def test_every_loss_has_a_masked_form(batch, kind: str) -> None:
    y, p, pos_w, neg_w, mask = batch
    loss = make_loss(kind, LABELS, pos_w, neg_w, gamma=2.0)
    if kind == "weighted_bce":
        expected = reference_weighted_loss(y, p, pos_w, neg_w, mask)
    elif kind == "bce":
        expected = reference_weighted_loss(y, p, np.ones(LABELS), np.ones(LABELS), mask)
    else:
        expected = reference_focal_loss(y, p, 2.0, mask)
    assert _value(loss, y, p, mask) == pytest.approx(expected, rel=1e-5)
    # a masked entry does not change the loss whatever its label says
    flipped = y.copy()
    flipped[mask == 0] = 1.0 - flipped[mask == 0]
    assert _value(loss, flipped, p, mask) == pytest.approx(_value(loss, y, p, mask), rel=1e-6)


def test_weighted_loss_needs_the_manifest_weights() -> None:
    with pytest.raises(ValueError, match="pos_weight and neg_weight"):
        make_loss("weighted_bce", LABELS)


def test_auc_metrics_match_scikit_learn_and_skip_one_class_labels() -> None:
    rng = np.random.default_rng(11)
    names = ["Atelectasis", "Pleural Effusion", "Hernia"]
    y = (rng.random((200, 3)) < 0.3).astype(np.float32)
    y[:, 2] = 0.0  # no positives: no AUC for Hernia
    p = np.clip(y * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    mask = np.ones_like(y)
    mask[:20, 0] = 0.0
    metrics = auc_metrics(y, p, mask, names)
    expected_0 = roc_auc_score(y[20:, 0], p[20:, 0])
    expected_1 = roc_auc_score(y[:, 1], p[:, 1])
    assert metrics["val_auc_Atelectasis"] == pytest.approx(expected_0)
    assert metrics["val_auc_Pleural_Effusion"] == pytest.approx(expected_1)
    assert "val_auc_Hernia" not in metrics
    assert metrics["val_auc_macro"] == pytest.approx((expected_0 + expected_1) / 2)
    assert metrics["val_auc_labels"] == 2.0
    pr = (
        average_precision_score(y[20:, 0], p[20:, 0]) + average_precision_score(y[:, 1], p[:, 1])
    ) / 2
    assert metrics["val_pr_auc_macro"] == pytest.approx(pr)


def test_no_scorable_label_reports_no_macro_rather_than_half() -> None:
    y = np.zeros((10, 2), np.float32)
    metrics = auc_metrics(y, np.full((10, 2), 0.5), np.ones_like(y), ["A", "B"])
    assert "val_auc_macro" not in metrics and metrics["val_auc_labels"] == 0.0
    assert metric_key("Pleural Effusion") == "Pleural_Effusion"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learnig_rate": 0.1}, "did you mean 'learning_rate'"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not one of adam, adamw, sgd"),
        ({"batch_size": 0}, "batch_size must be > 0"),
        ({"dropout": 1.5}, "dropout must be in"),
        ({"augment": "yes"}, "augment must be true or false"),
        ({"epochs": "ten"}, "epochs must be a int"),
    ],
)
def test_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrialConfig.from_dict({"dataset": "x", **values})


def test_config_coerces_plain_yaml_values() -> None:
    config = TrialConfig.from_dict(
        {"dataset": "x", "learning_rate": 1, "epochs": 3.0, "weights": None}
    )
    assert config.learning_rate == 1.0 and isinstance(config.epochs, int) and config.weights == ""


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
def test_optimizers_and_schedules_build(optimizer: str, schedule: str) -> None:
    from chestxpert.trainable.optim import make_optimizer

    config = TrialConfig.from_dict(
        {
            "dataset": "x",
            "optimizer": optimizer,
            "lr_schedule": schedule,
            "learning_rate": 0.01,
            "epochs": 4,
            "warmup_epochs": 1.0,
            "weight_decay": 1e-4,
            "clipnorm": 1.0,
        }
    )
    opt = make_optimizer(config, steps_per_epoch=10)
    assert type(opt).__name__.lower() == optimizer
    assert opt.clipnorm == 1.0
    if schedule == "cosine":
        schedule_fn = opt._learning_rate
        assert float(schedule_fn(0)) == pytest.approx(1e-4, rel=1e-3)  # warm-up starts low
        assert float(schedule_fn(10)) == pytest.approx(
            0.01, rel=1e-3
        )  # warm-up target after one epoch
        assert float(schedule_fn(40)) == pytest.approx(0.0, abs=1e-6)  # decayed by the last step
    else:
        assert float(opt.learning_rate) == pytest.approx(0.01)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["learning_rate", "weight_decay", "dropout", "warmup_epochs"])
def test_a_trial_config_refuses_numbers_that_are_not_finite(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^trial config: {key} must be a finite number"):
        TrialConfig.from_dict({"dataset": "s3://b/p", key: value})


def test_predict_gives_the_models_own_outputs_in_order_with_a_last_partial_batch() -> None:
    import keras

    from chestxpert.trainable.train import predict, predict_batches

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten()]
        + [keras.layers.Dense(3, activation="sigmoid")]
    )
    images = np.random.default_rng(0).integers(0, 256, (11, 8, 8, 1), dtype=np.uint8)
    got = predict(model, images, 4)  # batches of 4, 4 and 3
    assert got.shape == (11, 3)
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(model(images)), rtol=1e-6)
    # through the reader's options, not Keras's own array pipeline with the autotuner on
    assert predict_batches(images, 4).options().autotune.enabled is False
