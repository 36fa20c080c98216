"""A whole federation on this machine, for trials, tests and benchmarks: `cohort-server` and
native `cohort-client` daemons (the binaries in `COHORT_BIN`, default the repository's
`target/debug`; build them with `cargo build --workspace --bins`), Python clients in this process
(`cohort.start`), mutual TLS with a fresh CA, everything in one directory."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # python/cohort/local.py in the repository


def binaries() -> Path:
    """Where `cohort-server` and `cohort-client` are."""
    path = Path(os.environ.get("COHORT_BIN", REPO / "target" / "debug"))
    missing = [b for b in ("cohort-server", "cohort-client") if not (path / b).is_file()]
    if missing:
        raise RuntimeError(f"{missing} not in {path}: run `cargo build --workspace --bins` first, or set COHORT_BIN")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A server state directory with a CA, and enrolled client identities."""

    def __init__(self, root: Path):
        self.bin = binaries()
        self.root = root
        self.port = free_port()
        self.server_dir = root / "server"
        self.processes: list[subprocess.Popen] = []
        self.run("cohort-server", "init", "--state", self.server_dir, "--name", "pytest", "--san", "localhost")

    def run(self, binary, *args) -> str:
        done = subprocess.run([self.bin / binary, *map(str, args)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{binary} {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def enrol(self, client_id: str, data: str = "") -> Path:
        """A client directory with its key, certificate and client.toml (``data``: its [data] table)."""
        home = self.root / client_id
        home.mkdir()
        self.run("cohort-client", "keygen", "--id", client_id, "--out", home)
        self.run("cohort-server", "enroll", "--state", self.server_dir, "--csr", home / f"{client_id}.csr",
                 "--out", home / f"{client_id}.pem")
        (home / "ca.pem").write_bytes((self.server_dir / "ca.pem").read_bytes())
        (home / "client.toml").write_text(
            f'server = "127.0.0.1:{self.port}"\nserver_name = "localhost"\nstate_dir = "state"\ndevice = "cpu"\n'
            f'[reconnect]\ninitial_ms = 100\nmax_ms = 500\n'
            f'[identity]\ncert = "{client_id}.pem"\nkey = "{client_id}.key"\nca = "ca.pem"\n{data}'
        )
        return home / "client.toml"

    def serve(self, model: str, federation: str) -> subprocess.Popen:
        (self.server_dir / "model.toml").write_text(model)
        (self.server_dir / "server.toml").write_text(
            f'listen = "127.0.0.1:{self.port}"\nmodel = "model.toml"\n{federation}'
        )
        return self.spawn("cohort-server", "serve", "--state", self.server_dir, "--config",
                          self.server_dir / "server.toml", log=self.root / "server.log")

    def spawn(self, binary, *args, log: Path) -> subprocess.Popen:
        out = open(log, "w")
        process = subprocess.Popen([self.bin / binary, *map(str, args)], stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def wait(self, process: subprocess.Popen, timeout: float) -> int:
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; server log:\n{self.log()}")

    def log(self) -> str:
        return (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""

    def close(self):
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


