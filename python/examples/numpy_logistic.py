"""A NumPy softmax (logistic) regression as a Cohort client: ``fit`` runs mini-batch SGD with
the round's settings, ``evaluate`` returns a confusion matrix on a held-out part.

    python examples/numpy_logistic.py client.toml data.csv

``data.csv``: feature columns, then the class (0..K-1) in the last column, one header line.
The model spec it trains (``logistic.toml`` here) has no trunk and one head: its tensors are
``heads.label.00.weight`` (classes x features) and ``heads.label.00.bias``; native ``cohort-client``
daemons train the same spec with candle, so both kinds of client can share a federation.
"""

from __future__ import annotations

import sys

import numpy as np

import cohort

WEIGHT, BIAS = "heads.label.00.weight", "heads.label.00.bias"


def softmax_sgd(w, b, x, y, epochs, batch_size, lr, seed):
    """Mini-batch SGD on the mean cross-entropy, as candle's trainer does it; returns
    ``(w, b, mean loss)``."""
    w, b = w.astype(np.float32, copy=True), b.astype(np.float32, copy=True)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(len(x)) if batch_size < len(x) else np.arange(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            xb, yb = x[batch], y[batch]
            logits = xb @ w.T + b
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            losses.append(float(-np.log(p[np.arange(len(yb)), yb] + 1e-12).mean()))
            p[np.arange(len(yb)), yb] -= 1.0
            g = p / len(yb)
            w -= np.float32(lr) * (g.T @ xb)
            b -= np.float32(lr) * g.sum(axis=0)
    return w, b, float(np.mean(losses)) if losses else 0.0


class LogisticSite(cohort.Client):
    """One site's data, held here: ``x`` (n x features, float32) and ``y`` (n, int); ``names``:
    the model's weight and bias tensors."""

    def __init__(self, x, y, held_out=0.0, names=(WEIGHT, BIAS)):
        self.weight, self.bias = names
        cut = len(x) - int(len(x) * held_out)
        self.x, self.y = x[:cut], y[:cut]
        self.x_val, self.y_val = x[cut:], y[cut:]
        self.received = []  # the global parameters of each round, for inspection

    def fit(self, params, settings):
        self.received.append((settings.round, params))
        w, b, loss = softmax_sgd(
            params[self.weight], params[self.bias], self.x, self.y,
            settings.epochs, settings.batch_size, settings.learning_rate, settings.seed,
        )
        return cohort.FitResult(params={self.weight: w, self.bias: b}, examples=len(self.x), metrics={"loss": loss})

    def evaluate(self, params, settings):
        x, y = (self.x_val, self.y_val) if len(self.x_val) else (self.x, self.y)
        predictions = (x @ params[self.weight].T + params[self.bias]).argmax(axis=1)
        return cohort.confusion_matrix(y, predictions, classes=params[self.weight].shape[0])

    def label_counts(self, settings):
        return np.bincount(self.y, minlength=settings.labelled_heads[0].classes)


def read_csv(path):
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    return table[:, :-1], table[:, -1].astype(np.int64)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    x, y = read_csv(sys.argv[2])
    cohort.run(sys.argv[1], LogisticSite(x, y, held_out=0.2), examples=len(x))
