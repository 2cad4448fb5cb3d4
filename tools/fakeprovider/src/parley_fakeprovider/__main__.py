"""Command line: ``python -m parley_fakeprovider --host H --port P [--workers N]`` execs gunicorn."""

from __future__ import annotations

import argparse
import os
import resource
import sys


def _raise_file_limit() -> None:
    """Raise the open-files soft limit to the hard limit: thousands of streams need thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def gunicorn_argv(host: str, port: int, workers: int, log_level: str) -> list[str]:
    """The gunicorn command line serving ``parley_fakeprovider:create_app()``."""
    return [
        sys.executable, "-m", "gunicorn",
        "-k", "gevent",
        "--worker-connections", "4000",
        "--workers", str(workers),
        "--bind", f"{host}:{port}",
        "--backlog", "4096",
        # Gateways keep pooled upstream connections idle for a while; gunicorn's 2 s default
        # would close them under the client and turn reuse into spurious connection errors.
        "--keep-alive", "75",
        "--graceful-timeout", "5",
        # gunicorn's control socket has one fixed path per user: parallel instances would clash.
        "--no-control-socket",
        "--log-level", log_level,
        "parley_fakeprovider:create_app()",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and replace this process with gunicorn."""
    parser = argparse.ArgumentParser(prog="python -m parley_fakeprovider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    _raise_file_limit()
    command = gunicorn_argv(args.host, args.port, args.workers, args.log_level)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
