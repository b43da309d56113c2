"""The public surface: __all__ kept honest, documented, and free of Jupyter imports."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import herd
import herd.registry
import herd.testing
import herd_nb


def test_all_is_sorted_and_complete() -> None:
    assert herd.__all__ == sorted(herd.__all__)
    for name in herd.__all__:
        assert hasattr(herd, name), name
    public = {
        name
        for name, value in vars(herd).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "").startswith("herd")
    }
    assert public <= set(herd.__all__), public - set(herd.__all__)


def test_every_public_name_has_a_docstring() -> None:
    for module in (herd, herd.testing, herd.registry, herd_nb):
        for name in module.__all__:
            value = getattr(module, name)
            assert inspect.getdoc(value), f"{module.__name__}.{name} has no docstring"
            if inspect.isclass(value):
                for attr, member in vars(value).items():
                    if attr.startswith("_") or not callable(member):
                        continue
                    assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_errors_form_one_tree() -> None:
    for name in (
        "InvalidSessionIdError",
        "PoolClosedError",
        "PoolExhaustedError",
        "SpawnError",
        "WorkerDeadError",
    ):
        assert issubclass(getattr(herd, name), herd.HerdError)
    assert issubclass(herd.InvalidSessionIdError, ValueError)
    assert issubclass(herd.PoolExhaustedError, TimeoutError)


BANNED = ("jupyter", "IPython", "ipywidgets", "ipykernel", "notebook", "traitlets", "zmq")


def test_the_core_imports_nothing_from_jupyter() -> None:
    """Importing every public module of herd loads no Jupyter package (nor redis,
    which only its registry extra will need)."""
    code = (
        "import sys, herd, herd.testing, herd.registry, herd.proxy, herd.cli, herd.sandbox\n"
        f"banned = {(*BANNED, 'redis')!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0].startswith(banned))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_no_module_of_the_core_names_a_jupyter_package() -> None:
    """Not even in a function body, where an import runs only when called."""
    found = []
    for path in sorted(Path(herd.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(BANNED)]
    assert found == []


def test_protocols_are_satisfied_by_the_shipped_implementations() -> None:
    assert isinstance(herd.MemoryRegistry(), herd.SessionRegistry)
    assert isinstance(herd.ProcessFactory(["true"]), herd.WorkerFactory)
    assert isinstance(herd.testing.FakeFactory(), herd.WorkerFactory)
