"""The FedAvg paper's MNIST CNN (McMahan et al. 2017) in PyTorch, as a Cohort client.

One data owner, one process:

    python examples/torch_mnist_cnn.py client.toml IMAGES.idx3-ubyte.gz LABELS.idx1-ubyte.gz

The federation's model is Cohort's bundled spec `common/specs/mnist-cnn.toml`; `cohort.torch`
maps its tensors (`trunk.01.weight`, ...) onto this module's (`conv1.weight`, ...) by order, so
the server aggregates, checkpoints, evaluates and exports it like any native model, and
`cohort.torch.load(CNN(), "model.safetensors")` loads an export in one line. Training is plain
SGD on shuffled mini-batches with the round's epochs, batch size and learning rate (the same
loop as the Flower baseline in `../shared/anchors/flower/fedbench_common.py`).
"""

from __future__ import annotations

import gzip
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cohort
import cohort.torch

# The spec's `normalize` layer, which the server applies before its own evaluation: here the
# data are standardised once, as they are loaded.
MEAN, STD = 0.1307, 0.3081
SPEC = (Path(__file__).resolve().parents[2] / "common" / "specs" / "mnist-cnn.toml").read_text()


class CNN(nn.Module):
    """conv5x5x32, pool, conv5x5x64, pool, fc512, fc10: layers in the spec's order."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def read_idx(path) -> np.ndarray:
    raw = gzip.open(path, "rb").read() if str(path).endswith(".gz") else Path(path).read_bytes()
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def mnist(images, labels):
    x = (read_idx(images).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(read_idx(labels).astype(np.int64))


class TorchCNNSite(cohort.Client):
    """One site's images and labels; ``gate`` (a semaphore) bounds how many sites of one
    process train at once."""

    def __init__(self, x, y, device="cpu", gate: threading.Semaphore | None = None):
        self.x, self.y, self.device, self.gate = x, y, device, gate
        self.model = CNN().to(device)
        self.names = cohort.torch.name_map(self.model, SPEC)

    def fit(self, params, settings):
        with self.gate or _NO_GATE:
            cohort.torch.load_params(self.model, params, self.names)
            opt = torch.optim.SGD(self.model.parameters(), lr=settings.learning_rate, momentum=settings.momentum,
                                  weight_decay=settings.weight_decay)
            generator = torch.Generator().manual_seed(settings.seed % 2**63)
            self.model.train()
            losses = []
            for _ in range(settings.epochs):
                order = torch.randperm(len(self.y), generator=generator)
                for i in range(0, len(self.y), settings.batch_size):
                    batch = order[i : i + settings.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(self.model(self.x[batch].to(self.device)), self.y[batch].to(self.device))
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
            params = cohort.torch.to_params(self.model, self.names)
        return cohort.FitResult(params=params, examples=len(self.y), metrics={"loss": float(np.mean(losses))})

    @torch.no_grad()
    def evaluate(self, params, settings):
        with self.gate or _NO_GATE:
            cohort.torch.load_params(self.model, params, self.names)
            self.model.eval()
            predictions = torch.cat([self.model(self.x[i : i + 1000].to(self.device)).argmax(1).cpu()
                                     for i in range(0, len(self.y), 1000)])
        return cohort.confusion_matrix(self.y.numpy(), predictions.numpy(), classes=10)

    def label_counts(self, settings):
        return np.bincount(self.y.numpy(), minlength=10)


class _NoGate:
    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


_NO_GATE = _NoGate()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    x, y = mnist(sys.argv[2], sys.argv[3])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cohort.run(sys.argv[1], TorchCNNSite(x, y, device), examples=len(y), device=f"torch {device}")
