"""Losses for multi-label chest X-ray training: class-weighted BCE (the default), plain BCE, focal.

Every loss reads `y_true` as labels and a known-label mask side by side
(shape batch × 2L), so labels a source leaves unknown add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

EPSILON = 1e-7


def split_targets(y_true, num_labels: int):
    """Split packed targets (batch × 2L) into labels and mask (each batch × L)."""
    return y_true[:, :num_labels], y_true[:, num_labels:]


@keras.saving.register_keras_serializable(package="chestxpert")
class MultiLabelLoss(keras.losses.Loss):
    """Per sample, the sum over classes of a per-element loss; Keras then averages over the batch.

    `kind`: "weighted_bce" — `-(pos_w[i]·y·log(p+eps) + neg_w[i]·(1-y)·log(1-p+eps))`,
    with pos_w the negative frequency and neg_w the positive frequency of class i
    in the training split; "bce" — the same with weights 1; "focal" — binary focal
    loss with `gamma`. The batch mean of the per-sample sums equals the sum over
    classes of the per-class batch means, i.e. the weighted loss exactly.
    """

    def __init__(
        self,
        kind: str = "weighted_bce",
        pos_weight: Sequence[float] | None = None,
        neg_weight: Sequence[float] | None = None,
        gamma: float = 2.0,
        num_labels: int = 14,
        name: str = "multilabel_loss",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if kind not in ("weighted_bce", "bce", "focal"):
            raise ValueError(f"loss {kind!r} is not one of weighted_bce, bce, focal")
        if kind == "weighted_bce" and (pos_weight is None or neg_weight is None):
            raise ValueError(
                "weighted_bce needs pos_weight and neg_weight (from the dataset manifest)"
            )
        self.kind = kind
        self.num_labels = int(num_labels)
        weighted = kind == "weighted_bce"
        self.pos_weight = [float(w) for w in pos_weight] if weighted else [1.0] * self.num_labels
        self.neg_weight = [float(w) for w in neg_weight] if weighted else [1.0] * self.num_labels
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        labels, mask = split_targets(ops.cast(y_true, "float32"), self.num_labels)
        p = ops.cast(y_pred, "float32")
        log_p = ops.log(p + EPSILON)
        log_not_p = ops.log(1.0 - p + EPSILON)
        if self.kind == "focal":
            element = -(
                labels * ops.power(1.0 - p, self.gamma) * log_p
                + (1.0 - labels) * ops.power(p, self.gamma) * log_not_p
            )
        else:
            pos_w = ops.convert_to_tensor(self.pos_weight, dtype="float32")
            neg_w = ops.convert_to_tensor(self.neg_weight, dtype="float32")
            element = -(pos_w * labels * log_p + neg_w * (1.0 - labels) * log_not_p)
        return ops.sum(element * mask, axis=-1)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "kind": self.kind,
            "pos_weight": self.pos_weight,
            "neg_weight": self.neg_weight,
            "gamma": self.gamma,
            "num_labels": self.num_labels,
        }


def make_loss(
    kind: str, num_labels: int, pos_weight=None, neg_weight=None, gamma: float = 2.0
) -> MultiLabelLoss:
    """The trial's loss by name; weights come from the prepared dataset's manifest."""
    return MultiLabelLoss(
        kind=kind, pos_weight=pos_weight, neg_weight=neg_weight, gamma=gamma, num_labels=num_labels
    )
