"""The package without a server: layouts, model files, the bridge's checks, name pairing."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cohort
from cohort import _Bridge
from cohort.names import layer_order, pair_by_order, pair_names

SPEC = """name = "small"
input_shape = [1, 6, 6]
[[trunk]]
kind = "conv2d"
out_channels = 2
kernel = 3
[[trunk]]
kind = "relu"
[[trunk]]
kind = "flatten"
[[trunk]]
kind = "linear"
out = 4
[[heads]]
name = "digit"
classes = 3
[[heads]]
name = "mine"
classes = 2
personal = true
"""


def settings(**overrides):
    raw = {
        "round": 2, "run": "main", "model": "small", "seed": 9, "deadline_ms": 1000, "class_counts": None,
        "heads": [{"name": "digit", "classes": 3, "personal": False, "labelled": True},
                  {"name": "mine", "classes": 2, "personal": True, "labelled": False}],
        "train": {"epochs": 2, "batch_size": 5, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
    }
    raw.update(overrides)
    return json.dumps(raw)


def test_the_layout_names_every_tensor_with_its_shape_in_wire_order():
    tensors, heads = cohort.model_layout(SPEC)
    assert tensors == [
        ("trunk.00.bias", (2,)), ("trunk.00.weight", (2, 1, 3, 3)),
        ("trunk.03.bias", (4,)), ("trunk.03.weight", (4, 32)),
        ("heads.digit.00.bias", (3,)), ("heads.digit.00.weight", (3, 4)),
        ("heads.mine.00.bias", (2,)), ("heads.mine.00.weight", (2, 4)),
    ]
    assert [(h.name, h.classes, h.personal) for h in heads] == [("digit", 3, False), ("mine", 2, True)]
    with pytest.raises(ValueError, match="input_shape"):
        cohort.model_layout('name = "x"\ninput_shape = []\n[[heads]]\nname = "y"\nclasses = 2\n')


def test_a_model_file_round_trips_and_refuses_what_does_not_fit(tmp_path):
    rng = np.random.default_rng(1)
    params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in cohort.model_layout(SPEC)[0]}
    cohort.save_model(tmp_path / "m.safetensors", params, SPEC)
    back = cohort.load_model(tmp_path / "m.safetensors")
    assert back.keys() == params.keys()
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])
    assert "small" in cohort.model_spec(tmp_path / "m.safetensors")

    missing = dict(params)
    missing.pop("trunk.00.bias")
    with pytest.raises(ValueError, match="trunk.00.bias"):
        cohort.save_model(tmp_path / "bad.safetensors", missing, SPEC)
    wrong = dict(params, **{"trunk.03.weight": np.zeros((32, 4), np.float32)})
    with pytest.raises(ValueError, match="shape"):
        cohort.save_model(tmp_path / "bad.safetensors", wrong, SPEC)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        cohort.load_model(tmp_path / "junk.safetensors")


class Echo(cohort.Client):
    """Returns what ``result`` says, after recording what it got."""

    def __init__(self, result):
        self.result, self.got = result, None

    def fit(self, params, settings):
        self.got = (params, settings)
        return self.result(params)

    def evaluate(self, params, settings):
        return self.result(params)


def wire(params):
    return [(name, list(a.shape), a.astype("<f4").tobytes()) for name, a in params.items()]


def test_fit_gets_arrays_by_name_and_the_round_settings_and_returns_float32_bytes():
    start = {"heads.digit.00.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    client = Echo(lambda p: cohort.FitResult(params={k: v * 2.0 for k, v in p.items()}, examples=7,
                                              metrics={"loss": 0.25}))
    tensors, is_delta, examples, loss = _Bridge(client)._fit(wire(start), settings())
    params, got = client.got
    np.testing.assert_array_equal(params["heads.digit.00.weight"], start["heads.digit.00.weight"])
    assert (got.round, got.epochs, got.batch_size, got.learning_rate, got.seed) == (2, 2, 5, 0.1, 9)
    assert [h.name for h in got.labelled_heads] == ["digit"]
    (name, shape, data), = tensors
    assert (name, shape, is_delta, examples, loss) == ("heads.digit.00.weight", [3, 4], False, 7, 0.25)
    np.testing.assert_array_equal(np.frombuffer(data, "<f4").reshape(3, 4), start["heads.digit.00.weight"] * 2)

    # The tuple form, float64 arrays, and a delta.
    _, _, examples, loss = _Bridge(Echo(lambda p: (p, 3)))._fit(wire(start), settings())
    assert (examples, loss) == (3, None)
    _, is_delta, _, _ = _Bridge(Echo(lambda p: cohort.FitResult(delta=p, examples=1)))._fit(wire(start), settings())
    assert is_delta


@pytest.mark.parametrize(
    "result, words",
    [
        (lambda p: None, "fit returned NoneType"),
        (lambda p: cohort.FitResult(examples=3), "exactly one of params and delta"),
        (lambda p: cohort.FitResult(params=p, delta=p, examples=3), "exactly one of params and delta"),
        (lambda p: cohort.FitResult(params=p, examples=0), "at least one"),
        (lambda p: cohort.FitResult(params=[1, 2], examples=3), "mapping of name to array"),
    ],
)
def test_what_fit_returns_is_refused_with_words_when_it_makes_no_sense(result, words):
    start = {"heads.digit.00.weight": np.zeros((3, 4), np.float32)}
    with pytest.raises((TypeError, ValueError), match=words):
        _Bridge(Echo(result))._fit(wire(start), settings())


def test_evaluation_and_counts_go_to_the_first_labelled_head_unless_named():
    matrix = cohort.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], classes=3)
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert _Bridge(Echo(lambda p: matrix))._evaluate([], settings()) == {"digit": [1, 0, 0, 0, 0, 1, 0, 1, 1]}
    assert _Bridge(Echo(lambda p: {"mine": [[2, 0], [0, 1]]}))._evaluate([], settings()) == {"mine": [2, 0, 0, 1]}
    for bad in ([-1, 2], [0.5, 1]):
        with pytest.raises(ValueError, match="digit"):
            _Bridge(Echo(lambda p: bad))._evaluate([], settings())
    with pytest.raises(ValueError, match="outside"):
        cohort.confusion_matrix([0, 3], [0, 1], classes=3)
    with pytest.raises(NotImplementedError, match="census"):
        _Bridge(cohort.Client())._label_counts(settings())


def test_names_pair_by_layer_order_with_every_shape_checked():
    assert layer_order(["trunk.03.bias", "trunk.00.weight", "heads.d.00.bias", "trunk.00.bias", "trunk.03.weight",
                        "heads.d.00.weight"]) == ["trunk.00.weight", "trunk.00.bias", "trunk.03.weight",
                                                  "trunk.03.bias", "heads.d.00.weight", "heads.d.00.bias"]
    torch_like = [("conv.weight", (2, 1, 3, 3)), ("conv.bias", (2,)), ("fc.weight", (4, 32)), ("fc.bias", (4,)),
                  ("out.weight", (3, 4)), ("out.bias", (3,)), ("own.weight", (2, 4)), ("own.bias", (2,))]
    pairs = pair_by_order(SPEC, torch_like)
    assert pairs["trunk.00.weight"] == "conv.weight" and pairs["heads.mine.00.bias"] == "own.bias"
    swapped = [torch_like[2], torch_like[3], torch_like[0], torch_like[1]] + torch_like[4:]
    with pytest.raises(ValueError, match="pairs with fc.weight"):
        pair_by_order(SPEC, swapped)
    with pytest.raises(ValueError, match="8 tensors"):
        pair_by_order(SPEC, torch_like[:-1])


def test_a_client_with_a_bad_config_is_told_which_file_and_what(tmp_path):
    config = tmp_path / "client.toml"
    with pytest.raises(ValueError, match="client.toml"):
        cohort.run(config, fit=lambda p, s: None)
    config.write_text('server = "fl.example.org:4433"\n')
    with pytest.raises(ValueError, match="identity"):
        cohort.run(config, fit=lambda p, s: None)
    with pytest.raises(TypeError, match="fit="):
        cohort.run(config)
    with pytest.raises(TypeError, match="not both"):
        cohort.run(config, cohort.Client(), fit=lambda p, s: None)


def test_a_spec_of_declared_names_pairs_them_with_the_same_names():
    declared = ('name = "d"\n[[parameters]]\nname = "conv.weight"\nshape = [2, 1, 3, 3]\n[[heads]]\nname = "y"\n'
                'classes = 2\n[[heads.parameters]]\nname = "fc.weight"\nshape = [2, 4]\n')
    theirs = [("fc.weight", (2, 4)), ("conv.weight", (2, 1, 3, 3))]
    assert pair_names(declared, theirs) == {"conv.weight": "conv.weight", "fc.weight": "fc.weight"}
    with pytest.raises(ValueError, match="fc.weight has shape"):
        pair_names(declared, [("fc.weight", (4, 2)), ("conv.weight", (2, 1, 3, 3))])
    # A layer spec's names are places: paired by order, as before.
    torch_like = [("conv.weight", (2, 1, 3, 3)), ("conv.bias", (2,)), ("fc.weight", (4, 32)), ("fc.bias", (4,)),
                  ("out.weight", (3, 4)), ("out.bias", (3,)), ("own.weight", (2, 4)), ("own.bias", (2,))]
    assert pair_names(SPEC, torch_like) == pair_by_order(SPEC, torch_like)
