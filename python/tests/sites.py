"""What the federation tests share: a small logistic model and the sites' synthetic data."""

from __future__ import annotations

import numpy as np

#: A softmax regression on four features: what native clients train with candle and the NumPy
#: example trains in Python.
SPEC = """name = "logistic"
input_shape = [4]
[[heads]]
name = "label"
classes = 3
"""


def site_data(seed: int, n: int):
    """Three classes around different centres in four features, rounded as the CSV keeps them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = np.array([[1, 0, 0, 1], [0, 1, 0, -1], [0, 0, 1, 0]], dtype=np.float64)
    x = np.round(centres[y] + rng.normal(0, 0.7, (n, 4)), 4)
    return x.astype(np.float32), y


def write_csv(path, x, y):
    rows = "\n".join(",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x, y))
    path.write_text("a,b,c,d,label\n" + rows + "\n")
