"""Bring your own model to a Cohort federation.

A data owner writes ``fit`` (and optionally ``evaluate``) in Python, with PyTorch, NumPy,
scikit-learn or anything else; ``cohort.run`` runs the Cohort client daemon around it. The
daemon is Rust, the same as ``cohort-client``: ``client.toml``, the identity and mutual TLS,
reconnects, the round plans, clipping, differential-privacy noise, quantization, SecAgg+
masking, the privacy ledger and personal heads all stay there, on this machine. The server only
ever learns the sum of a cohort's updates.

Parameters travel as NumPy arrays by name: ``{"trunk.01.weight": array, ...}`` for a model
spec's layers (``cohort.model_layout`` lists them), in any shapes a spec declares.

Example (a NumPy logistic regression; see ``python/examples`` for PyTorch)::

    import numpy as np
    import cohort

    class Site(cohort.Client):
        def fit(self, params, settings):
            w, b = params["heads.label.00.weight"], params["heads.label.00.bias"]
            ...  # train on this site's data for settings.epochs
            return cohort.FitResult(params={"heads.label.00.weight": w, "heads.label.00.bias": b},
                                    examples=len(x), metrics={"loss": loss})

        def evaluate(self, params, settings):
            return cohort.confusion_matrix(y_true, y_pred, classes=3)

    cohort.run("client.toml", Site())
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import _native

__all__ = [
    "Client",
    "FitResult",
    "Head",
    "RoundSettings",
    "Running",
    "confusion_matrix",
    "load_model",
    "model_layout",
    "model_spec",
    "run",
    "save_model",
    "start",
]

__version__ = _native.__version__


@dataclasses.dataclass(frozen=True)
class Head:
    """A task head of the model."""

    name: str
    classes: int
    #: A personal head never leaves this client; ``fit`` gets this client's own values of it.
    personal: bool
    #: Whether this client labels (trains and evaluates) the head.
    labelled: bool


@dataclasses.dataclass(frozen=True)
class RoundSettings:
    """What the server asks of this round: the training settings of its ``[federation.train]``."""

    round: int
    run: str
    #: The model spec's name.
    model: str
    #: This client's seed for the round (use it for shuffling and dropout).
    seed: int
    heads: tuple[Head, ...]
    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    weight_decay: float
    #: The whole ``[federation.train]`` as the server sent it (loss options included).
    train: Mapping[str, Any]
    #: The population's label counts from the last census, if the loss weighs classes by them.
    class_counts: tuple[int, ...] | None
    #: Milliseconds this client has to answer.
    deadline_ms: int

    @classmethod
    def _from_json(cls, text: str) -> "RoundSettings":
        raw = json.loads(text)
        train = raw["train"]
        counts = raw.get("class_counts")
        return cls(
            round=raw["round"],
            run=raw["run"],
            model=raw["model"],
            seed=raw["seed"],
            heads=tuple(Head(**h) for h in raw["heads"]),
            epochs=train["epochs"],
            batch_size=train["batch_size"],
            learning_rate=train["lr"],
            momentum=train.get("momentum", 0.0),
            weight_decay=train.get("weight_decay", 0.0),
            train=train,
            class_counts=None if counts is None else tuple(counts),
            deadline_ms=raw["deadline_ms"],
        )

    @property
    def labelled_heads(self) -> tuple[Head, ...]:
        """The heads this client trains."""
        return tuple(h for h in self.heads if h.labelled)


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the new parameters (or the delta), how many examples it trained on,
    and metrics (``loss`` is reported to the server as the training loss)."""

    params: Mapping[str, Any] | None = None
    examples: int = 0
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: ``local - global`` instead of ``params``.
    delta: Mapping[str, Any] | None = None


class Client:
    """A data owner's training. Override ``fit``; ``evaluate`` for federated evaluation;
    ``label_counts`` for a label census (class reweighting with ``scope = "global"``)."""

    def fit(self, params: dict[str, np.ndarray], settings: RoundSettings) -> FitResult | tuple:
        """Train from the global ``params`` and return a ``FitResult`` (or ``(params, examples)``
        or ``(params, examples, metrics)``)."""
        raise NotImplementedError("this client has no fit(); override cohort.Client.fit")

    def evaluate(self, params: dict[str, np.ndarray], settings: RoundSettings):
        """A confusion matrix (true class by row, predicted by column) of the first labelled
        head, or ``{head name: matrix}``, on held-out data."""
        raise NotImplementedError("this client does not evaluate; override cohort.Client.evaluate")

    def label_counts(self, settings: RoundSettings):
        """How many examples of each class this client holds: a list for the first labelled
        head, or ``{head name: counts}``."""
        raise NotImplementedError("this client takes no part in label censuses; override cohort.Client.label_counts")


class _Functions(Client):
    def __init__(self, fit, evaluate, label_counts):
        self._fit, self._evaluate, self._label_counts = fit, evaluate, label_counts

    def fit(self, params, settings):
        return self._fit(params, settings)

    def evaluate(self, params, settings):
        if self._evaluate is None:
            return super().evaluate(params, settings)
        return self._evaluate(params, settings)

    def label_counts(self, settings):
        if self._label_counts is None:
            return super().label_counts(settings)
        return self._label_counts(settings)


def _to_numpy(value: Any) -> np.ndarray:
    # PyTorch tensors (on any device) and anything array-like.
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _arrays(tensors) -> dict[str, np.ndarray]:
    return {name: np.frombuffer(data, dtype="<f4").reshape(shape).copy() for name, shape, data in tensors}


def _wire(arrays: Mapping[str, Any]) -> list[tuple[str, list[int], bytes]]:
    if not isinstance(arrays, Mapping):
        raise TypeError(f"parameters must be a mapping of name to array, not {type(arrays).__name__}")
    out = []
    for name, value in arrays.items():
        array = np.ascontiguousarray(_to_numpy(value), dtype="<f4")
        out.append((str(name), list(array.shape), array.tobytes()))
    return out


def _per_head(value: Any, settings: RoundSettings, what: str) -> dict[str, list[int]]:
    if isinstance(value, Mapping):
        items = value.items()
    else:
        labelled = settings.labelled_heads
        if not labelled:
            raise ValueError(f"{what}: this client labels no head of the model")
        items = [(labelled[0].name, value)]
    out = {}
    for head, counts in items:
        array = _to_numpy(counts)
        if array.size and (not np.issubdtype(array.dtype, np.number) or (array < 0).any()):
            raise ValueError(f"{what}: head {head!r} has negative or non-numeric counts")
        if array.size and not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{what}: head {head!r} has counts that are not whole numbers")
        out[str(head)] = [int(c) for c in array.reshape(-1)]
    return out


class _Bridge:
    """What the Rust daemon calls (with the GIL, on its job thread)."""

    def __init__(self, client: Client):
        self.client = client

    def _fit(self, tensors, settings_json):
        settings = RoundSettings._from_json(settings_json)
        result = self.client.fit(_arrays(tensors), settings)
        if isinstance(result, tuple):
            result = FitResult(*result)
        if not isinstance(result, FitResult):
            raise TypeError(f"fit returned {type(result).__name__}; return a cohort.FitResult or (params, examples)")
        if (result.params is None) == (result.delta is None):
            raise ValueError("fit must return exactly one of params and delta")
        examples = int(result.examples)
        if examples <= 0:
            raise ValueError(f"fit says it trained on {result.examples} examples; an update needs at least one")
        loss = (result.metrics or {}).get("loss")
        is_delta = result.delta is not None
        return _wire(result.delta if is_delta else result.params), is_delta, examples, None if loss is None else float(loss)

    def _evaluate(self, tensors, settings_json):
        settings = RoundSettings._from_json(settings_json)
        return _per_head(self.client.evaluate(_arrays(tensors), settings), settings, "evaluate")

    def _label_counts(self, settings_json):
        settings = RoundSettings._from_json(settings_json)
        return _per_head(self.client.label_counts(settings), settings, "label_counts")


def _daemon(config, client, fit, evaluate, label_counts, heads, examples, device):
    if client is None:
        if fit is None:
            raise TypeError("give a cohort.Client, or fit= (and optionally evaluate= and label_counts=)")
        client = _Functions(fit, evaluate, label_counts)
    elif fit is not None or evaluate is not None or label_counts is not None:
        raise TypeError("give either a cohort.Client or functions, not both")
    return _native.Daemon(str(config), _Bridge(client), [str(h) for h in heads], int(examples), str(device))


def run(
    config,
    client: Client | None = None,
    *,
    fit: Callable | None = None,
    evaluate: Callable | None = None,
    label_counts: Callable | None = None,
    heads: Sequence[str] = (),
    examples: int = 0,
    device: str = "python",
) -> None:
    """Runs a client daemon for ``config`` (a ``client.toml`` without ``[data]``) until Ctrl-C
    (raised as ``KeyboardInterrupt``) or SIGTERM (``systemctl stop``, ``docker stop``, Kubernetes:
    ``run`` returns), as ``cohort-client run`` does. Either way the daemon closes its connection
    cleanly; a round in progress is abandoned and everything completed is kept.

    ``heads``: the heads this client labels (default: the model's first). ``examples``: how many
    examples it holds, for the server's view before its first round. ``device``: how the server's
    logs name this client's device.
    """
    daemon = _daemon(config, client, fit, evaluate, label_counts, heads, examples, device)
    with _sigterm_stops(daemon):
        daemon.run()


@contextlib.contextmanager
def _sigterm_stops(daemon):
    """While ``daemon`` runs, SIGTERM stops it as ``stop()`` does, rather than killing the process
    mid-round (Python's default). Only on the main thread, where Python runs signal handlers, and
    only while SIGTERM has its default action: a program's own handler, or an ignored SIGTERM,
    stays as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: daemon.stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Running:
    """A client daemon on a thread of this process (``cohort.start``)."""

    def __init__(self, daemon):
        self._daemon = daemon
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cohort-client", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self._daemon.run()
        except BaseException as error:  # handed to join()
            self._error = error

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops the daemon (it closes its connection cleanly) and waits for it."""
        self._daemon.stop()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Waits for the daemon to end; raises what ended it, if that was an error."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the client daemon has not stopped")
        if self._error is not None:
            raise self._error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def start(
    config,
    client: Client | None = None,
    *,
    fit: Callable | None = None,
    evaluate: Callable | None = None,
    label_counts: Callable | None = None,
    heads: Sequence[str] = (),
    examples: int = 0,
    device: str = "python",
) -> Running:
    """``run`` on a background thread: returns at once; ``.stop()`` ends it."""
    return Running(_daemon(config, client, fit, evaluate, label_counts, heads, examples, device))


def model_layout(spec: str) -> tuple[list[tuple[str, tuple[int, ...]]], list[Head]]:
    """A model spec's (TOML text) tensors in the order the federation carries them, as
    ``(name, shape)``, and its heads."""
    tensors, heads = _native.model_layout(spec)
    return [(n, tuple(s)) for n, s in tensors], [Head(n, c, p, False) for n, c, p in heads]


def load_model(path) -> dict[str, np.ndarray]:
    """A model file (``cohort-server export``) as NumPy arrays by name."""
    tensors, _spec = _native.read_safetensors(str(path))
    return _arrays(tensors)


def model_spec(path) -> str | None:
    """The model spec (TOML) a model file carries, if any."""
    return _native.read_safetensors(str(path))[1]


def save_model(path, params: Mapping[str, Any], spec: str) -> None:
    """Writes ``params`` (every tensor of the model ``spec``) as a model file that
    ``cohort-client evaluate`` and a run's ``initial_model`` (server.toml) read."""
    _native.write_safetensors(str(path), _wire(params), spec)


def confusion_matrix(labels, predictions, classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): what ``evaluate`` returns per head."""
    # PyTorch tensors on any device too (``model(x).argmax(1)``).
    labels, predictions = _to_numpy(labels).astype(np.int64), _to_numpy(predictions).astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape[0] if labels.ndim else 0} labels and {predictions.size} predictions")
    if labels.size and (labels.min() < 0 or labels.max() >= classes or predictions.min() < 0 or predictions.max() >= classes):
        raise ValueError(f"a class outside 0..{classes - 1}")
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix
