"""A model the server does not run: the spec declares named tensors (PyTorch's names), the run
starts from the data owner's initial model file, the server averages, checkpoints and exports it
by those names, federated evaluation scores it, and a native candle client is refused with why."""

from __future__ import annotations

import json

import numpy as np

import cohort
from numpy_logistic import LogisticSite, softmax_sgd
from sites import site_data, write_csv

SPEC = """name = "torch-logistic"
[[heads]]
name = "label"
classes = 3
[[heads.parameters]]
name = "fc.weight"
shape = [3, 4]
[[heads.parameters]]
name = "fc.bias"
shape = [3]
init = "zeros"
"""

FEDERATION = """initial_model = "init.safetensors"
[federation]
rounds = 2
clients_per_round = 4
min_clients = 3
start_after_clients = 4
round_timeout_secs = 60
collection = "secure"
evaluate_every = 1
[federation.train]
epochs = 1
batch_size = 1000
lr = 0.5
"""


def test_a_declared_model_is_averaged_exported_and_evaluated_by_name(federation, tmp_path):
    initial = {"fc.weight": (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 10,
               "fc.bias": np.array([0.1, -0.2, 0.3], np.float32)}
    cohort.save_model(federation.server_dir / "init.safetensors", initial, SPEC)
    names = ("fc.weight", "fc.bias")
    sites = {f"py-{i}": LogisticSite(*site_data(10 + i, 30 + 10 * i), held_out=0.25, names=names) for i in range(3)}
    configs = {name: federation.enrol(name) for name in sites}
    csv = tmp_path / "native.csv"
    write_csv(csv, *site_data(20, 40))
    native = federation.enrol(
        "native", f'[data]\nformat = "csv"\npath = "{csv}"\nlabel_column = "label"\nclasses = 3\n'
    )
    server = federation.serve(SPEC, FEDERATION)
    federation.spawn("cohort-client", "run", "--config", native, log=tmp_path / "native.log")
    running = [cohort.start(configs[n], s, examples=len(s.x)) for n, s in sites.items()]
    try:
        assert federation.wait(server, 180) == 0, federation.log()
    finally:
        for r in running:
            r.stop()

    # Round 1 started from the initial model file, not the spec's initialisation.
    start = dict(sites["py-0"].received)[1]
    for name in names:
        np.testing.assert_array_equal(start[name], initial[name])

    # The export holds the declared names, and round 1 is the average of the three Python sites
    # (the native one cannot train this model).
    federation.run("cohort-server", "export", "--state", federation.server_dir, "--round", 1,
                   "--out", tmp_path / "r1.safetensors")
    exported = cohort.load_model(tmp_path / "r1.safetensors")
    assert sorted(exported) == ["fc.bias", "fc.weight"]
    expected = {n: np.zeros_like(initial[n]) for n in names}
    total = sum(len(s.x) for s in sites.values())
    for site in sites.values():
        w, b, _ = softmax_sgd(initial["fc.weight"], initial["fc.bias"], site.x, site.y, 1, 1000, 0.5, 0)
        expected["fc.weight"] += len(site.x) / total * (w - initial["fc.weight"])
        expected["fc.bias"] += len(site.x) / total * (b - initial["fc.bias"])
    for n in names:
        assert np.abs(exported[n] - (initial[n] + expected[n])).max() < 1e-5

    rounds = json.loads(federation.run("cohort-server", "rounds", "--state", federation.server_dir, "--json"))
    completed = [r for r in rounds if r["status"] == "completed"]
    assert [(r["round"], r["participants"]) for r in completed] == [(1, 3), (2, 3)], rounds
    assert all(r["test_accuracy"] is None for r in completed), "the server has no test set for this model"
    assert "client=native" in federation.log() and "declares its parameters only" in federation.log(), \
        "the native client's refusal, with its reason"
    # Federated evaluation: the server holds the sum of the sites' confusion matrices of the new
    # model on their held-out examples, and nothing else.
    (federated,) = completed[0]["federated"]
    summed = sum(site.evaluate(exported, None) for site in sites.values())
    assert federated["head"] == "label" and federated["examples"] == summed.sum() == 29
    assert federated["confusion"] == summed.tolist()
