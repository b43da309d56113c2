"""Fixtures for every test: no process may outlive the test that started it."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator

import psutil
import pytest

from tests.helpers import tagged_processes, wait_until_sync

# Every process the tests start inherits this tag, so the leak check finds even
# daemons that double-forked away from our process tree.
TAG = uuid.uuid4().hex
os.environ["HERD_TEST_TAG"] = TAG


def _leftovers(before: set[int]) -> list[int]:
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    tagged = set(tagged_processes(TAG))
    return sorted((mine | tagged) - before)


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    """Fail a test that leaves any child (or tagged) process running."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    try:
        wait_until_sync(lambda: not _leftovers(before), timeout=5.0, what="processes to exit")
    except AssertionError:
        left = _leftovers(before)
        details = []
        for pid in left:
            try:
                details.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())}")
                os.kill(pid, signal.SIGKILL)
            except (psutil.Error, OSError):
                pass
        pytest.fail("test left processes running:\n  " + "\n  ".join(details))
