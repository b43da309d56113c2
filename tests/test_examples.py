"""The examples run the way their docs say."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import wait_until_sync
from tests.test_cli import _answers, free_port

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "alice always reached the same worker" in done.stdout
    assert "pool closed" in done.stdout


def run_gateway(script: str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_sync(
        lambda: (
            (proc.poll() is None and _answers(f"http://127.0.0.1:{port}/herd/stats"))
            or (proc.poll() is not None and _fail(proc))
        ),
        timeout=60,
        what=script,
    )
    return proc


def _fail(proc: subprocess.Popen[str]) -> bool:
    assert proc.stderr is not None
    raise AssertionError(f"gateway exited {proc.returncode}: {proc.stderr.read()[-2000:]}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    if proc.stderr is not None:
        proc.stderr.close()


def fetch(url: str, **kwargs: object) -> object:
    with urllib.request.urlopen(urllib.request.Request(url, **kwargs), timeout=30) as reply:  # type: ignore[arg-type]
        return json.loads(reply.read())


def test_echo_gateway() -> None:
    port = free_port()
    proc = run_gateway("echo_gateway.py", port)
    try:
        base = f"http://127.0.0.1:{port}"
        first = fetch(base + "/hello", headers={"X-Session-ID": "alice"})
        again = fetch(base + "/again", headers={"X-Session-ID": "alice"}, data=b"hi")
        other = fetch(base + "/hello", headers={"X-Session-ID": "bob"})
        assert isinstance(first, dict)
        assert isinstance(again, dict)
        assert isinstance(other, dict)
        # Same process for alice (its counter went on), another for bob (PIDs are
        # alike: each worker has a PID namespace of its own).
        assert (first["served"], again["served"], again["body"]) == (1, 2, "hi")
        assert other["served"] == 1
    finally:
        stop(proc)


def test_jupyter_gateway() -> None:
    pytest.importorskip("jupyter_server")
    pytest.importorskip("ipykernel")
    port = free_port()
    proc = run_gateway("jupyter_gateway.py", port)
    try:
        base = f"http://127.0.0.1:{port}"
        kernel = fetch(base + "/alice/api/kernels", method="POST", data=b"{}")
        assert isinstance(kernel, dict)
        assert kernel["name"]
        assert fetch(base + "/bob/api/kernels") == []
        kernels = fetch(base + "/alice/api/kernels")
        assert isinstance(kernels, list)
        assert [k["id"] for k in kernels] == [kernel["id"]]
    finally:
        stop(proc)
