"""The notebooks in notebooks/ run top to bottom on a fresh install (nbclient)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers.jupyter import Server

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, cwd: Path) -> Any:
    """Run notebooks/``name`` in ``cwd`` as ``jupyter nbconvert --execute`` would; raise
    ``CellExecutionError`` on the first cell that fails."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return notebook


def outputs(notebook: Any) -> list[dict[str, Any]]:
    return [output for cell in notebook.cells for output in cell.get("outputs", [])]


def plain(notebook: Any) -> str:
    """Everything the notebook shows as text (what nbconvert renders without widgets)."""
    texts = []
    for output in outputs(notebook):
        texts.append(output.get("text", ""))
        texts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.timeout(240)
def test_quickstart(tmp_path: Path) -> None:
    notebook = execute("quickstart.ipynb", tmp_path)
    text = plain(notebook)
    assert "alice's notebook state" in text
    assert "no secret here" in text  # bob never saw alice's variable
    assert "ZeroDivisionError" in text
    # The dashboard renders as a widget, with a readable text fallback.
    widgets = [
        o
        for o in outputs(notebook)
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert widgets, "no dashboard widget"
    assert "alice" in widgets[-1]["data"]["text/plain"]


@pytest.mark.timeout(240)
def test_gateway(tmp_path: Path) -> None:
    text = plain(execute("gateway.ipynb", tmp_path))
    assert "alice  -> " in text
    assert "3 request(s) served" in text  # alice's third visit reached her worker
    assert "herd serve exited with 0" in text
    assert "herd: stopped" in text


@pytest.mark.timeout(240)
def test_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # %herd connect finds the server through its runtime file, as `jupyter server
    # list` does: the test's server is the only one in this runtime directory.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    server = Server(tmp_path, "c.Herd.warm_kernels = 1\n")
    try:
        server.wait_ready(lambda pools: pools["kernels:python3"]["available_workers"] >= 1)
        text = plain(execute("server.ipynb", tmp_path))
    finally:
        server.stop()
    assert f"connected to {server.base}/" in text
    assert "same kernel, counter = 2" in text
    assert "scratch" in text
