"""Native candle clients and Python (NumPy) clients in one federation with secure aggregation:
the global model must be exactly the weighted average of every client's update, the native ones
included, which the test recomputes in NumPy from the same data."""

from __future__ import annotations

import numpy as np

import cohort
from numpy_logistic import BIAS, WEIGHT, LogisticSite, read_csv, softmax_sgd
from sites import SPEC, site_data, write_csv

LR = 0.5

FEDERATION = f"""[federation]
rounds = 2
clients_per_round = 4
min_clients = 4
round_timeout_secs = 60
collection = "secure"
[federation.secagg]
degree = 2
threshold = 2
dropout_tolerance = 0.0
[federation.train]
epochs = 1
batch_size = 1000
lr = {LR}
momentum = 0.0
"""


def test_native_and_python_clients_average_exactly_under_secure_aggregation(federation, tmp_path):
    sizes = {"native-a": 30, "native-b": 55, "python-a": 70, "python-b": 95}
    data = {name: site_data(i, n) for i, (name, n) in enumerate(sizes.items())}
    configs = {}
    for name in sizes:
        if name.startswith("native"):
            csv = tmp_path / f"{name}.csv"
            write_csv(csv, *data[name])
            table = f'[data]\nformat = "csv"\npath = "{csv}"\nlabel_column = "label"\nclasses = 3\n'
            configs[name] = federation.enrol(name, table)
            # What candle reads is the CSV's text: the test recomputes from the same file.
            data[name] = read_csv(csv)
        else:
            configs[name] = federation.enrol(name)

    server = federation.serve(SPEC, FEDERATION)
    for name in ("native-a", "native-b"):
        federation.spawn("cohort-client", "run", "--config", configs[name], log=tmp_path / f"{name}.log")
    sites = {name: LogisticSite(*data[name]) for name in ("python-a", "python-b")}
    running = [cohort.start(configs[name], site, examples=sizes[name]) for name, site in sites.items()]
    try:
        assert federation.wait(server, 180) == 0, federation.log()
    finally:
        for r in running:
            r.stop()

    # Round 1's global model, as both Python clients received it.
    (round_1, start), = [(r, p) for r, p in sites["python-a"].received if r == 1]
    for key in (WEIGHT, BIAS):
        np.testing.assert_array_equal(start[key], dict(sites["python-b"].received)[1][key])

    updates, weights = [], []
    for name, n in sizes.items():
        x, y = data[name]
        w, b, _ = softmax_sgd(start[WEIGHT], start[BIAS], x, y, epochs=1, batch_size=1000, lr=LR, seed=0)
        updates.append(np.concatenate([(b - start[BIAS]).ravel(), (w - start[WEIGHT]).ravel()]))
        weights.append(n)
    flat_start = np.concatenate([start[BIAS].ravel(), start[WEIGHT].ravel()])
    expected = flat_start + np.average(updates, axis=0, weights=weights)

    federation.run("cohort-server", "export", "--state", federation.server_dir, "--round", 1,
                   "--out", tmp_path / "round-1.safetensors")
    exported = cohort.load_model(tmp_path / "round-1.safetensors")
    got = np.concatenate([exported[BIAS].ravel(), exported[WEIGHT].ravel()])
    assert np.abs(got - expected).max() < 1e-5, np.abs(got - expected).max()

    # The check has power: the average of the Python clients alone is far from it.
    python_only = flat_start + np.average(updates[2:], axis=0, weights=weights[2:])
    assert np.abs(got - python_only).max() > 1e-3

    # Round 2 started from that model, on the Python clients too.
    second = dict(sites["python-a"].received)[2]
    np.testing.assert_allclose(second[WEIGHT], exported[WEIGHT], atol=1e-7)

