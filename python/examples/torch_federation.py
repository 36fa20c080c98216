"""The FedAvg paper's CNN federation with every site a PyTorch client of this library, on one
machine: `cohort-server` (SecAgg+, the 10,000 MNIST test images evaluated after every round) and
100 sites of 600 IID training images (McMahan et al.'s partition, the Flower baseline's seed),
10 a round, E = 5, B = 10, lr 0.05, as in `scenarios/mnist-cnn-iid-secure.toml`. The sites live in
one child process (`--processes N`: N, each training one site at a time), `--parallel` of them
training at once (default 2, one torch thread each), as Flower's simulation trains in 2 Ray
actors; real sites are each a process of their own. (One process balances best: with 10, a
process that drew 3 of a round's sites trains them one after another while a core idles;
BENCHMARKS.md has both.)

    cargo build --release --bins
    COHORT_BIN=target/release python python/examples/torch_federation.py --rounds 40 --out out/torch-cnn

It prints each round's seconds and test accuracy and writes `report.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

import cohort
from cohort.local import REPO, Federation
from torch_mnist_cnn import SPEC, TorchCNNSite, mnist


class Gate:
    """At most ``slots`` trainings at once across the processes and, with ``alone``, one at a
    time in this process."""

    def __init__(self, slots, alone):
        self.slots, self.local = slots, threading.Lock() if alone else None

    def __enter__(self):
        if self.local:
            self.local.acquire()
        self.slots.acquire()

    def __exit__(self, *_):
        self.slots.release()
        if self.local:
            self.local.release()
        return False


def host_sites(configs, parts, mnist_dir, slots, alone, stop):
    """One process's sites: each a client daemon on its own thread."""
    torch.set_num_threads(1)
    x, y = mnist(mnist_dir / "train-images.idx3-ubyte.gz", mnist_dir / "train-labels.idx1-ubyte.gz")
    gate = Gate(slots, alone)
    sites = [TorchCNNSite(x[p].clone(), y[p].clone(), gate=gate) for p in parts]
    del x, y
    running = [cohort.start(c, site, examples=len(site.y), device="torch cpu") for c, site in zip(configs, sites)]
    stop.wait()
    for r in running:
        r.stop(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1,
                        help="processes hosting the sites; with more than one, each trains one site at a time")
    parser.add_argument("--parallel", type=int, default=2, help="trainings at once, one torch thread each")
    parser.add_argument("--mnist", type=Path, default=REPO / "scenarios" / "data" / "mnist")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = mnist(args.mnist / "train-images.idx3-ubyte.gz", args.mnist / "train-labels.idx1-ubyte.gz")[1]
    parts = list(np.random.default_rng(0).permutation(len(labels))[: args.sites * 600].reshape(args.sites, 600))

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    fed = Federation(args.out)
    test = args.mnist
    federation = f"""[test_data]
format = "idx"
images = "{test / 't10k-images.idx3-ubyte.gz'}"
labels = "{test / 't10k-labels.idx1-ubyte.gz'}"
[federation]
rounds = {args.rounds}
clients_per_round = {args.per_round}
min_clients = {max(3, args.per_round * 8 // 10)}
start_after_clients = {args.sites}
round_timeout_secs = 600
seed = 1
collection = "secure"
[federation.train]
epochs = 5
batch_size = 10
lr = 0.05
"""
    configs = [fed.enrol(f"site-{i:03}") for i in range(args.sites)]
    started = time.monotonic()
    server = fed.serve(SPEC, federation)
    context = multiprocessing.get_context("spawn")
    stop, slots = context.Event(), context.Semaphore(args.parallel)
    hosts = [
        context.Process(
            target=host_sites,
            args=(configs[k :: args.processes], parts[k :: args.processes], args.mnist, slots, args.processes > 1, stop),
        )
        for k in range(args.processes)
    ]
    for host in hosts:
        host.start()
    try:
        code = fed.wait(server, 3600 * 4)
    finally:
        stop.set()
        for host in hosts:
            host.join(120)
        fed.close()
    if code != 0:
        raise SystemExit(f"the server failed ({code}):\n{fed.log()[-3000:]}")
    rounds = json.loads(fed.run("cohort-server", "rounds", "--state", fed.server_dir, "--json"))
    rows = [r for r in rounds if r["status"] == "completed"]
    report = {"wall_seconds": time.monotonic() - started, "rounds": rows}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    seconds = [r["seconds"] for r in rows]
    accuracy = [r.get("test_accuracy") for r in rows]
    for r, s, a in zip(rows, seconds, accuracy):
        print(f"round {r['round']}: {s:.1f} s, test accuracy {a}")
    first = next((r.get("round") for r, a in zip(rows, accuracy) if a is not None and a >= 0.99), None)
    print(f"median {statistics.median([s for s in seconds if s is not None]):.1f} s/round; 99% at round {first}; "
          f"best {max(a for a in accuracy if a is not None):.4f}; {report['wall_seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
