"""llama.cpp's `llama-server` for tests and benchmarks: build it (once, cached), write the tiny
model, start servers on free loopback ports and stop them by PID.

    path = ensure_llama_server()              # cached binary, or build it (minutes) / None
    model = write_tiny_gguf(tmp / "tiny.gguf")
    with LlamaServers.start(3, model, tmp, slots=4) as servers:
        servers[0].url                        # http://127.0.0.1:PORT (the root; /v1 below)
        servers[1].kill()                     # SIGKILL, for fault tests

**The binary.** `llama-server` is built from the llama.cpp source vendored in the
`llama-cpp-python` sdist on PyPI (version `LLAMA_CPP_PYTHON_VERSION`, pinned here and
nowhere else), fetched with `pip download`, configured with `CMAKE_FLAGS` (static, no
`-march=native`, so a cached binary runs on any x86-64 with AVX2) and built for the one
target with ninja. The result lives in `cache_root()/<key>/llama-server` where the key
hashes the version and the flags, so a change of either builds afresh and an old binary is
never used for the new settings. A lock file serialises concurrent builders (two pytest
processes, CI steps). `TREADLE_LLAMA_SERVER=/path/to/llama-server` skips all of this and
uses that binary; `TREADLE_LLAMA_SERVER_CACHE` moves the cache (default
`~/.cache/treadle/llama-server`).

CLI, for CI and operators: `python -m treadle.testing.llamacpp build` (build or find the
cached binary, print its path), `... path` (print it, or exit 1 when absent).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from treadle.backends.sim.profile import Efficiency, EngineLimits, GPUSpec, ModelSpec, Profile
from treadle.errors import SetupError
from treadle.testing.processes import free_port
from treadle.testing.tiny_gguf import TinyModel, tiny_vocab

#: the llama-cpp-python sdist whose vendored llama.cpp is built (the one pin)
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: cmake flags of the build; part of the cache key
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
BINARY_ENV = "TREADLE_LLAMA_SERVER"
CACHE_ENV = "TREADLE_LLAMA_SERVER_CACHE"
#: the model name the servers answer to (`-a`)
MODEL_ALIAS = "tiny"


class LlamaServerUnavailable(SetupError, RuntimeError):
    """No `llama-server` binary, and building one failed or was not allowed."""


def cache_key() -> str:
    flags = "\n".join(CMAKE_FLAGS).encode()
    return f"{LLAMA_CPP_PYTHON_VERSION}-{hashlib.sha256(flags).hexdigest()[:12]}"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "treadle" / "llama-server"


def cached_binary() -> Path:
    """Where the build for the current version and flags is (or will be)."""
    return cache_root() / cache_key() / "llama-server"


def find_llama_server() -> Path | None:
    """`$TREADLE_LLAMA_SERVER`, else the cached build; None when neither exists."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerUnavailable(f"${BINARY_ENV}={explicit} is not an executable file")
        return path
    path = cached_binary()
    return path if path.is_file() else None


def ensure_llama_server(*, build: bool = True, jobs: int = 2, log: Path | None = None) -> Path:
    """The binary; built (and cached) when absent and `build` is true."""
    found = find_llama_server()
    if found is not None:
        return found
    if not build:
        raise LlamaServerUnavailable(
            f"no llama-server at {cached_binary()}; build it with "
            f"`python -m treadle.testing.llamacpp build` (about 10 minutes on 2 cores) "
            f"or point ${BINARY_ENV} at one"
        )
    return build_llama_server(jobs=jobs, log=log)


def build_llama_server(*, jobs: int = 2, log: Path | None = None) -> Path:
    """Download the pinned sdist, build `llama-server`, install it in the cache; returns the
    binary. Another process building the same key is waited for, not duplicated."""
    target = cached_binary()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_file():
            return target
        for tool in ("cmake", "ninja", "c++"):
            if shutil.which(tool) is None:
                raise LlamaServerUnavailable(f"building llama-server needs {tool!r} on PATH")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="treadle-llama-build-") as tmp:
            work = Path(tmp)
            out = open(log, "ab") if log else open(work / "build.log", "wb")  # noqa: SIM115
            with out:
                source = _fetch_source(work, out)
                build = work / "build"
                _run(["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *CMAKE_FLAGS],
                     out)  # fmt: skip
                _run(["nice", "-n", "10", "cmake", "--build", str(build),
                      "--target", "llama-server", f"-j{jobs}"], out)  # fmt: skip
            binary = build / "bin" / "llama-server"
            if not binary.is_file():
                raise LlamaServerUnavailable(f"the build produced no {binary}")
            staged = target.with_suffix(".partial")
            shutil.copy2(binary, staged)
            info = {
                "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
                "cmake_flags": list(CMAKE_FLAGS),
                "llama_cpp_commit": _built_commit(build),
                "build_seconds": round(time.monotonic() - started, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (target.parent / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            staged.rename(target)  # atomic: a reader sees the whole binary or none
        return target


def build_info() -> dict[str, object]:
    """What `build.json` beside the cached binary says (empty when there is none)."""
    path = cached_binary().parent / "build.json"
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}


def _fetch_source(work: Path, out: BinaryIO) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work)], out)  # fmt: skip
    sdist = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        raise LlamaServerUnavailable(f"pip download did not produce {sdist.name}")
    with tarfile.open(sdist) as tar:
        # whole: the sdist's `.git/modules` lets cmake record llama.cpp's commit
        tar.extractall(work, filter="data")
    source = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise LlamaServerUnavailable(f"{sdist.name} has no vendor/llama.cpp")
    return source


def _built_commit(build: Path) -> str | None:
    """llama.cpp's commit as its build recorded it (the sdist carries the submodule's git
    metadata; cmake writes the short hash into `common/build-info.cpp`)."""
    with contextlib.suppress(OSError):
        for line in (build / "common" / "build-info.cpp").read_text().splitlines():
            if "LLAMA_COMMIT" in line and '"' in line:
                return line.split('"')[1]
    return None


def _run(cmd: Sequence[str], out: BinaryIO) -> None:
    out.write(f"$ {' '.join(cmd)}\n".encode())
    out.flush()
    done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise LlamaServerUnavailable(f"{cmd[0]} {cmd[1]} failed ({done.returncode}); see the log")


# -- servers ------------------------------------------------------------------------------


@dataclass
class LlamaServer:
    """One `llama-server` child: `slots` parallel slots of `context // slots` tokens each,
    `/metrics` and `/slots` on, slot files under `workdir/slots`. `cache_ram_mib` is the
    server's host-RAM prompt cache (llama.cpp's own second tier; 0 turns it off, so a
    slot's KV lives only in the slot). `threads` compute threads (1 by default: several
    servers share a small machine)."""

    binary: Path
    model: Path
    workdir: Path
    slots: int = 4
    context: int = 32768
    threads: int = 1
    cache_ram_mib: int = 0
    port: int = 0
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The server root (the OpenAI API is under `/v1`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def slot_dir(self) -> Path:
        return self.workdir / "slots"

    @property
    def logfile(self) -> Path:
        return self.workdir / "server.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def args(self) -> list[str]:
        return [
            str(self.binary),
            "-m", str(self.model), "-a", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port),
            "-c", str(self.context), "-np", str(self.slots), "-t", str(self.threads),
            "--slot-save-path", str(self.slot_dir), "--metrics", "--slots",
            "--cache-ram", str(self.cache_ram_mib), "--no-webui", "--jinja",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout_s: float = 60.0) -> LlamaServer:
        """Start and return once `/health` answers 200."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.slot_dir.mkdir(exist_ok=True)
        self.port = self.port or free_port()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"llama-server exited ({self.proc.returncode}) at start:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
                        return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"llama-server was not ready in {timeout_s:g} s")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as its clients can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-chars:]
        return ""


class LlamaServers:
    """N servers started together and stopped together (a context manager)."""

    def __init__(self, servers: list[LlamaServer]) -> None:
        self.servers = servers

    @classmethod
    def start(
        cls,
        n: int,
        model: Path,
        workdir: Path,
        *,
        binary: Path | None = None,
        **options: Any,
    ) -> LlamaServers:
        """Start `n` servers of `model` (options: `LlamaServer`'s fields)."""
        exe = binary or ensure_llama_server(build=False)
        servers: list[LlamaServer] = []
        try:
            for i in range(n):
                server = LlamaServer(exe, model, workdir / f"server-{i}", **options)
                servers.append(server.start())
        except BaseException:
            for server in servers:
                server.stop()
            raise
        return cls(servers)

    def __getitem__(self, i: int) -> LlamaServer:
        return self.servers[i]

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[LlamaServer]:
        return iter(self.servers)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> LlamaServers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def tiny_profile(model: TinyModel, server: LlamaServer, *, n_batch: int = 2048) -> Profile:
    """A simulator profile of `server` serving the tiny `model`: the model's true shape, the
    server's slots and context as the engine's limits, and a CPU "device" whose peaks are a
    nominal scale (the fit's `mfu`/`mbu` carry its measured speed). Uncalibrated: its
    efficiencies are placeholders until `treadle sim calibrate` fits them."""
    vocab = len(tiny_vocab().tokens)
    params = model.parameters(vocab)
    dtype = 4  # F32 weights (llama.cpp keeps the KV cache in f16: counted at 4 B, an upper bound)
    kv_per_token = 2 * model.layers * model.kv_heads * model.head_dim * dtype
    memory = params * dtype + server.context * kv_per_token
    device = f"CPU, llama.cpp, {server.threads} thread(s)"
    return Profile(
        name=f"llamacpp_cpu_tiny_{model.layers}x{model.hidden}",
        description=(
            f"llama.cpp llama-server ({server.slots} slots of {server.context // server.slots} "
            f"tokens) on {server.threads} CPU thread(s) serving treadle's random-weight "
            f"{model.layers}-layer, {model.hidden}-wide test model."
        ),
        gpu=GPUSpec(name=device, count=1, peak_flops=1e12, hbm_bandwidth=1e12, memory_bytes=memory),
        model=ModelSpec(
            name="treadle-tiny",
            params=params,
            layers=model.layers,
            hidden_size=model.hidden,
            num_heads=model.heads,
            kv_heads=model.kv_heads,
            head_dim=model.head_dim,
            dtype_bytes=dtype,
            max_model_len=server.context // server.slots,
        ),
        efficiency=Efficiency(mfu=0.05, mbu=0.05, step_overhead_s=2e-4),
        engine=EngineLimits(
            gpu_memory_utilization=1.0,
            block_size=16,
            max_num_seqs=server.slots,
            max_num_batched_tokens=n_batch,
        ),
        sources={
            "gpu.count": "one llama-server process",
            "gpu.peak_flops": "nominal scale, not a datasheet: mfu carries the measured rate",
            "gpu.hbm_bandwidth": "nominal scale, not a datasheet: mbu carries the measured rate",
            "gpu.memory_bytes": f"weights + the server's -c {server.context} tokens of KV",
            "model.params": "counted from the tensors treadle.testing.tiny_gguf writes",
            "model.layers": "TinyModel.layers",
            "model.hidden_size": "TinyModel.hidden",
            "model.num_heads": "TinyModel.heads",
            "model.kv_heads": "TinyModel.kv_heads",
            "model.head_dim": "TinyModel.hidden / TinyModel.heads",
            "model.dtype_bytes": "F32 weights",
            "model.max_model_len": f"one slot's context: -c {server.context} / -np {server.slots}",
            "efficiency.mfu": "placeholder until calibrated",
            "efficiency.mbu": "placeholder until calibrated",
            "efficiency.step_overhead_s": "placeholder until calibrated",
            "engine.gpu_memory_utilization": "all of -c is KV",
            "engine.block_size": "simulator default",
            "engine.max_num_seqs": f"-np {server.slots} slots",
            "engine.max_num_batched_tokens": f"llama-server's default batch -b {n_batch}",
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treadle.testing.llamacpp")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build llama-server (or find it cached); print its path")
    build.add_argument("-j", "--jobs", type=int, default=2)
    build.add_argument("--log", type=Path, default=None, help="append the build output here")
    sub.add_parser("path", help="print the cached binary's path; exit 1 when there is none")
    args = parser.parse_args(argv)
    if args.command == "path":
        found = find_llama_server()
        if found is None:
            print(f"no llama-server at {cached_binary()}", file=sys.stderr)
            return 1
        print(found)
        return 0
    started = time.monotonic()
    fresh = find_llama_server() is None
    path = ensure_llama_server(jobs=args.jobs, log=args.log)
    took = f"built in {time.monotonic() - started:.0f} s" if fresh else "cached"
    print(f"{path} ({took})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
