"""Real child processes (gunicorn services, workers, the fake provider) with readiness waits and log files."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from signal import SIGKILL, SIGTERM

import urllib3


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing listens on right now. Each is held until all are chosen: ports picked one
    at a time can repeat (the kernel may hand a just-released port out again; ~0.3% of ten-port picks here), and two
    services given one port meet the second's readiness check with the first's answer."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


class ServiceProcess:
    """A real process (gunicorn service, worker, fake provider) with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        log_dir: Path,
        ready_url: str | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **env}
        self.ready_url = ready_url
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> ServiceProcess:
        """Start and wait until its readiness URL answers 200 (or it dies, which fails with its log)."""
        self.launch()
        if self.ready_url:
            self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (to start several at once)."""
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        log_file.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll the readiness URL until it answers 200."""
        assert self.ready_url
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(urllib3.exceptions.HTTPError):
                if http.request("GET", self.ready_url).status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 60) -> str:
        """The end of its log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        """Send a signal to the whole process group (gunicorn and its workers)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 10.0, signum: int = SIGTERM) -> None:
        """Signal the process group (SIGTERM: graceful), then SIGKILL what is left after `timeout`."""
        self.signal(signum)
        self.wait_stopped(timeout)

    def wait_stopped(self, timeout: float) -> None:
        """Wait for the process to end; SIGKILL its group if it has not by then."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(SIGKILL)
            self.process.wait(5)


def python_module(module: str, *args: str) -> list[str]:
    """argv to run a module with this interpreter (the workspace's virtualenv)."""
    return [sys.executable, "-m", module, *args]
