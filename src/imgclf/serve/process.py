"""`imgclf serve` in a child process, ready to answer when the block starts.

For what must talk to a real server over a real socket: the load benchmark,
the browser test, and users' own integration tests. Picks a free loopback
port, waits for ``/healthz``, and stops the server when the block ends; a
server that dies while starting is reported with its last error line.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A loopback port nobody is listening on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def serve_in_subprocess(
    model: str | Path, *options: str, timeout: float = 60.0, log: str | Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``imgclf serve MODEL --port P *options``; yields its base URL and process.

    The server's stderr goes to ``log`` if given (to read what it logged), else to a
    temporary file."""
    port = free_port()
    # a file, not a pipe: a chatty server never blocks on it
    with open(log, "w+b") if log else tempfile.TemporaryFile() as stderr:
        server = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "serve", str(model), "--port", str(port),
                                   *options], stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if server.poll() is not None:
                    stderr.seek(0)
                    lines = stderr.read().decode(errors="replace").strip().splitlines() or ["no output"]
                    raise RuntimeError(f"imgclf serve exited with code {server.returncode}: {lines[-1]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"imgclf serve did not answer {url}/healthz within {timeout:.0f} s")
                time.sleep(0.1)
            yield url, server
        finally:
            server.terminate()
            server.wait(10)
