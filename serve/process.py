"""Servers in child processes, for scripts that drive one (tests, load tests, benchmarks):
`nanovlm serve`, and the llama.cpp servers the benchmarks compare with."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """An HTTP server in a child process: started from `cmd`, waited for (bounded) until GET `health`
    answers 200, its output in a file (a pipe nobody reads fills up and blocks the server)."""

    def __init__(self, cmd: list[str], health: str, name: str, timeout: float = 300, log: str | None = None):
        self.name = name
        self.log = open(log, "w+") if log else tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{name} not healthy after {timeout} s")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def stop(self) -> str:
        """SIGTERM (a server drains), then the log it wrote."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()

    def output(self) -> str:
        """What the server has logged so far."""
        self.log.seek(0)
        return self.log.read()

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """`nanovlm serve BUNDLE ARGS...` on 127.0.0.1 and a free port."""

    def __init__(self, bundle: str, *args: str, timeout: float = 300, python: str = sys.executable):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = os.path.join(os.path.dirname(python), "nanovlm")  # the console script of that environment
        cmd = [script, "serve", bundle, "--port", str(self.port), *args]
        super().__init__(cmd, self.url + "/health", "server", timeout)


class SlowBodies:
    """`clients` connections that each send a request head announcing a 100 kB body, then trickle
    one byte of it every half second until closed: a slowloris on the body."""

    def __init__(self, port: int, clients: int = 20):
        self.socks, self.stop = [], threading.Event()
        for _ in range(clients):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
            )
            self.socks.append(c)
        threading.Thread(target=self._trickle, daemon=True).start()

    def _trickle(self) -> None:
        while not self.stop.is_set():
            for c in self.socks:
                try:
                    c.send(b" ")
                except OSError:
                    pass
            time.sleep(0.5)

    def close(self) -> None:
        self.stop.set()
        for c in self.socks:
            c.close()

    def __enter__(self) -> SlowBodies:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
