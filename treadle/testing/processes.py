"""Local processes around the daemon: a private `redis-server` and `python -m
treadle.runtime.daemon.cli` children (`serve`, `worker`). The service benchmark runs the whole
system from these, and the tests start Redis and workers with the same launchers."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from treadle.errors import SetupError


class RedisUnavailable(SetupError, RuntimeError):
    """No `redis-server` binary on PATH."""


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, what: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """Return once something listens on 127.0.0.1:`port`; fail if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port}")


class RedisServer:
    """One `redis-server` process in `workdir`, listening on 127.0.0.1:`port`.

    With `appendonly=True` every write is fsynced to the append-only file before Redis
    replies (`appendfsync always`), so a SIGKILL loses nothing that was acknowledged and a
    restart on the same directory and port finds it all again.
    """

    def __init__(self, workdir: Path, port: int | None = None, *, appendonly: bool = False):
        binary = redis_binary()
        if binary is None:
            raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def logfile(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start and wait until it answers PING."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--logfile", str(self.logfile),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start:\n{self._diagnostics()}")
                with contextlib.suppress(redis.exceptions.RedisError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING:\n{self._diagnostics()}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; what survives is what was fsynced."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def _diagnostics(self) -> str:
        err = b""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            err = self.proc.stderr.read()
        log = ""
        with contextlib.suppress(OSError):
            log = self.logfile.read_text(errors="replace")[-2000:]
        return f"{err.decode(errors='replace')}\n{log}"


class DaemonProcess:
    """`python -m treadle.runtime.daemon.cli ARGS` in a process of its own, its output appended to
    `log`; it can be started again after a kill."""

    def __init__(self, args: list[str], log: Path, *, cwd: Path | None = None) -> None:
        self.args = [sys.executable, "-m", "treadle.runtime.daemon.cli", *args]
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        return self

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (its leases just expire)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (a graceful drain), then SIGKILL after `timeout_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
