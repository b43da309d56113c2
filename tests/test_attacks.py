"""A hostile tenant against the real gateway, as root: each attack must fail.

Every attack runs twice: through ``herd serve`` as shipped, where it must fail,
and through the same gateway with the protection under test turned off (a
module flag flipped in that gateway's process), where it must succeed, so that
each test shows the attack is real and the protection is what stops it.

The tenant is ``tests/helpers/hostile.py``: a worker that runs any Python a
request sends it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herd import _cgroups
from herd import _sandbox as herd_sandbox
from tests.helpers import wait_until_sync
from tests.test_cli import _answers, free_port

HOSTILE = str(Path(__file__).parent / "helpers" / "hostile.py")
ADMIN_TOKEN = "test-admin-token"
GROUPS = _cgroups.detect()
NAMESPACES = herd_sandbox.detect()
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the adversarial tests run as root"),
    pytest.mark.skipif(NAMESPACES.level != "full", reason=f"no full sandbox: {NAMESPACES.reason}"),
    pytest.mark.skipif(GROUPS.version != "v1", reason=f"cgroup v1 attacks: {GROUPS.reason}"),
]


class Gateway:
    """``herd serve --memory 64M --pids 20 FLAGS`` of the hostile worker;
    ``unprotected`` turns a module attribute (``"module.NAME"``) off in its process."""

    def __init__(
        self,
        *flags: str,
        unprotected: str | None = None,
        cwd: str | None = None,
        admin_token: str | None = ADMIN_TOKEN,
        program: str = HOSTILE,
    ) -> None:
        self.port = free_port()
        argv = ["serve", "--port", str(self.port), "--session-header", "X-Session-ID"]
        argv += ["--memory", "64M", "--pids", "20", "--min", "2", "--max", "4", *flags]
        argv += ["--health-path", "/health", "--", sys.executable, program, "{port}"]
        if unprotected is None:
            command = [sys.executable, "-m", "herd", *argv]
        else:
            module, _, name = unprotected.rpartition(".")
            program = textwrap.dedent(
                f"""
                import sys, importlib
                setattr(importlib.import_module({module!r}), {name!r}, False)
                from herd.cli import main
                sys.exit(main({argv!r}))
                """
            )
            command = [sys.executable, "-c", program]
        env = dict(os.environ)
        if admin_token is not None:
            env["HERD_ADMIN_TOKEN"] = admin_token
        # The log goes nowhere: a pipe nobody reads would block the gateway once full.
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env
        )
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_until_sync(
                lambda: _answers(self.base + "/herd/stats"), timeout=20, what="herd serve"
            )
        except BaseException:
            self.stop()
            raise

    def run(self, session: str, code: str) -> dict[str, Any]:
        """Send ``code`` to ``session``'s worker; its ``{ok, out, error}``."""
        request = urllib.request.Request(
            self.base + "/run",
            data=textwrap.dedent(code).encode(),
            headers={"X-Session-ID": session},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def stats(self) -> dict[str, Any]:
        """The gateway's stats, with session IDs (the admin token's view)."""
        request = urllib.request.Request(
            self.base + "/herd/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer

    def worker_of(self, session: str) -> dict[str, Any]:
        self.run(session, "pass")
        return next(w for w in self.stats()["workers"] if w["session_id"] == session)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# The cgroup attacks run against process isolation, the weaker level (and what
# herd_nb's kernels get): a tenant's view has no /sys at all.


@pytest.fixture
def herd_serve() -> Iterator[Gateway]:
    gateway = Gateway("--isolation", "process")
    yield gateway
    gateway.stop()


@pytest.fixture
def unhardened() -> Iterator[Gateway]:
    gateway = Gateway("--isolation", "process", unprotected="herd._sandbox.HARDEN")
    yield gateway
    gateway.stop()


OWN_MEMORY_CGROUP = """
    def own(controller):
        for line in open("/proc/self/cgroup"):
            _, names, path = line.rstrip("\\n").split(":", 2)
            if controller in names.split(","):
                return "/sys/fs/cgroup/" + controller + path
"""


def attack(gateway: Gateway, session: str, code: str) -> dict[str, Any]:
    return gateway.run(session, textwrap.dedent(OWN_MEMORY_CGROUP) + textwrap.dedent(code))


LEAVE_CGROUP = """
    import os
    for controller in ("memory", "pids"):
        with open(f"/sys/fs/cgroup/{controller}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    print(own("memory"), own("pids"))
"""


def test_a_worker_cannot_leave_its_cgroups(herd_serve: Gateway, unhardened: Gateway) -> None:
    escaped = attack(unhardened, "escape", LEAVE_CGROUP)
    assert escaped["ok"], escaped
    assert escaped["out"].split() == ["/sys/fs/cgroup/memory/", "/sys/fs/cgroup/pids/"]
    held = attack(herd_serve, "escape", LEAVE_CGROUP)
    assert not held["ok"]
    assert "Read-only file system" in held["error"]


RAISE_OWN_LIMIT = """
    import os
    # memory+swap first: the memory limit may not exceed it.
    for name in ("memory.memsw.limit_in_bytes", "memory.limit_in_bytes"):
        if os.path.exists(own("memory") + "/" + name):
            with open(own("memory") + "/" + name, "w") as f:
                f.write(str(1 << 40))
    print(open(own("memory") + "/memory.limit_in_bytes").read())
"""


def test_a_worker_cannot_raise_its_own_limits(herd_serve: Gateway, unhardened: Gateway) -> None:
    raised = attack(unhardened, "raise", RAISE_OWN_LIMIT)
    assert raised["ok"], raised
    assert int(raised["out"]) > 64 << 20
    held = attack(herd_serve, "raise", RAISE_OWN_LIMIT)
    assert "Read-only file system" in held["error"]


LOWER_A_NEIGHBOURS_LIMIT = """
    import os
    mine = own("memory")
    folder = os.path.dirname(mine)
    others = [os.path.join(folder, n) for n in os.listdir(folder)]
    others = [p for p in others if os.path.isdir(p) and p != mine]
    for other in others:
        with open(other + "/memory.limit_in_bytes", "w") as f:
            f.write(str(32 << 20))
    print(len(others))
"""


def test_a_worker_cannot_change_a_neighbours_limits(
    herd_serve: Gateway, unhardened: Gateway
) -> None:
    for gateway in (unhardened, herd_serve):
        gateway.run("neighbour", "pass")  # a second session: a neighbour exists
    lowered = attack(unhardened, "victim", LOWER_A_NEIGHBOURS_LIMIT)
    assert lowered["ok"], lowered
    assert int(lowered["out"]) >= 1
    held = attack(herd_serve, "victim", LOWER_A_NEIGHBOURS_LIMIT)
    assert "Read-only file system" in held["error"]


RELEASE_AGENT = """
    import os
    # The classic container escape: a release_agent runs as root on the host.
    print(os.access("/sys/fs/cgroup/memory/release_agent", os.W_OK))
"""

REMOUNT = """
    import subprocess
    done = subprocess.run(
        ["mount", "-o", "remount,rw", "/sys/fs/cgroup/memory"], capture_output=True, text=True
    )
    print(done.returncode, done.stderr.splitlines()[0])
    done = subprocess.run(
        ["mount", "-t", "cgroup", "-o", "memory", "cgroup", "/tmp"], capture_output=True, text=True
    )
    print(done.returncode, done.stderr.splitlines()[0])
"""


def test_a_worker_cannot_reach_the_release_agent_or_remount_the_cgroups(
    herd_serve: Gateway, unhardened: Gateway
) -> None:
    """(Writing the host's release_agent for real would change the host: the
    attack only asks whether it could.)"""
    assert attack(unhardened, "agent", RELEASE_AGENT)["out"].strip() == "True"
    assert attack(herd_serve, "agent", RELEASE_AGENT)["out"].strip() == "False"
    held = attack(herd_serve, "agent", REMOUNT)["out"].splitlines()
    assert len(held) == 2
    assert all(line.startswith("32 ") and "permission denied" in line for line in held), held


async def kernel_attack(code: str) -> str:
    """Run ``code`` in a herd_nb kernel with a memory limit; what it printed or raised."""
    import herd_nb

    worker = await herd_nb.KernelFactory("python3", memory_limit=256 << 20).spawn()
    try:
        printed: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                printed.append(content["text"])
            elif msg["msg_type"] == "error":
                printed.append(f"{content['ename']}: {content['evalue']}")

        full = textwrap.dedent(OWN_MEMORY_CGROUP) + textwrap.dedent(code)
        await worker.client.execute_interactive(full, output_hook=hook, timeout=30)
        return "".join(printed)
    finally:
        await worker.close()


async def test_a_kernel_cannot_leave_its_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for herd_nb's kernels: they start under the same init."""
    with monkeypatch.context() as unprotected:
        unprotected.setattr(herd_sandbox, "HARDEN", False)
        escaped = await kernel_attack(LEAVE_CGROUP)
    assert escaped.split() == ["/sys/fs/cgroup/memory/", "/sys/fs/cgroup/pids/"]
    held = await kernel_attack(LEAVE_CGROUP)
    assert "Read-only file system" in held


# -- a tenant cannot reach what is not its own ---------------------------------------


@pytest.fixture
def tenant_gateways(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway, Path]]:
    """``herd serve`` as shipped (tenant isolation) and with ``--isolation process``,
    both run from a directory that holds the gateway's own secrets: a hidden
    ``.env``, and a log beside it in a folder the workers have no business in."""
    home = tmp_path / "gateway"
    home.mkdir()
    (home / ".env").write_text("API_TOKEN=gateway-secret\n")
    private = tmp_path / "private"
    private.mkdir()
    (private / "gateway.log").write_text("session=alice token=gateway-secret\n")
    tenant = Gateway(cwd=str(home))
    process = Gateway("--isolation", "process", cwd=str(home))
    try:
        yield tenant, process, private
    finally:
        tenant.stop()
        process.stop()


def read(path: str) -> str:
    return f"""
        try:
            print(open({path!r}).read())
        except OSError as exc:
            print(type(exc).__name__)
    """


def test_a_tenant_cannot_read_another_sessions_files(
    tenant_gateways: tuple[Gateway, Gateway, Path],
) -> None:
    for gateway in tenant_gateways[:2]:
        gateway.run("alice", "open('/tmp/alice-notes.txt', 'w').write('alice-secret')")
    tenant, process, _ = tenant_gateways
    assert process.run("mallory", read("/tmp/alice-notes.txt"))["out"].strip() == "alice-secret"
    held = tenant.run("mallory", read("/tmp/alice-notes.txt"))["out"].strip()
    assert held == "FileNotFoundError"
    # (Its /tmp holds only the way to its working directory, here under /tmp.)
    listing = tenant.run("mallory", "import os; print(os.listdir('/tmp'))")["out"]
    assert "alice" not in listing


def test_a_tenant_cannot_read_the_gateways_files(
    tenant_gateways: tuple[Gateway, Gateway, Path],
) -> None:
    tenant, process, private = tenant_gateways
    log = str(private / "gateway.log")
    assert "gateway-secret" in process.run("mallory", read(log))["out"]
    assert "gateway-secret" in process.run("mallory", read(".env"))["out"]
    assert tenant.run("mallory", read(log))["out"].strip() == "FileNotFoundError"
    assert "gateway-secret" not in tenant.run("mallory", read(".env"))["out"]
    assert tenant.run("mallory", read("/etc/shadow"))["out"].strip() == ""
    # Its program and interpreter are there, read-only.
    program = tenant.run("mallory", read(HOSTILE))["out"]
    assert "A hostile tenant" in program
    assert "OSError" in tenant.run("mallory", f"open({HOSTILE!r}, 'a')")["error"]


CONNECT = """
    import socket
    with socket.socket() as sock:
        sock.settimeout(5)
        print(sock.connect_ex(("127.0.0.1", {port})))
"""


def test_a_tenant_cannot_connect_to_another_workers_port(
    tenant_gateways: tuple[Gateway, Gateway, Path],
) -> None:
    tenant, process, _ = tenant_gateways
    for gateway, expected in ((process, "0"), (tenant, str(errno.ECONNREFUSED))):
        victim = gateway.worker_of("alice")
        port = int(victim["address"].rpartition(":")[2])
        answer = gateway.run("mallory", CONNECT.format(port=port))
        assert answer["out"].strip() == expected, (gateway, answer)
    # Nor to the gateway itself.
    assert tenant.run("mallory", CONNECT.format(port=tenant.port))["out"].strip() == str(
        errno.ECONNREFUSED
    )


SIGNAL = """
    import os
    try:
        os.kill({pid}, 0)
        print("can signal")
    except OSError as exc:
        print(type(exc).__name__)
"""


def test_a_worker_cannot_see_or_signal_another_worker(
    tenant_gateways: tuple[Gateway, Gateway, Path],
) -> None:
    unsandboxed = Gateway("--no-sandbox")
    try:
        victim = unsandboxed.worker_of("alice")["pid"]
        assert unsandboxed.run("mallory", SIGNAL.format(pid=victim))["out"].strip() == "can signal"
    finally:
        unsandboxed.stop()
    for gateway in tenant_gateways[:2]:
        victim = gateway.worker_of("alice")["pid"]  # its host PID
        held = gateway.run("mallory", SIGNAL.format(pid=victim))["out"].strip()
        assert held == "ProcessLookupError"
        pids = gateway.run(
            "mallory", "import os; print([p for p in os.listdir('/proc') if p.isdigit()])"
        )
        assert sorted(map(int, json.loads(pids["out"].replace("'", '"')))) == [1, 2, 3]


STATUS = """
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(fields["CapEff"].strip(), fields["NoNewPrivs"].strip())
"""


def test_a_tenant_has_no_capabilities_and_cannot_gain_any(
    tenant_gateways: tuple[Gateway, Gateway, Path],
) -> None:
    tenant, process, _ = tenant_gateways
    assert process.run("a", STATUS)["out"].split() != ["0000000000000000", "1"]
    assert tenant.run("a", STATUS)["out"].split() == ["0000000000000000", "1"]


def test_user_runs_workers_as_that_user() -> None:
    gateway = Gateway("--user", "nobody")
    try:
        answer = gateway.run("a", "import os; print(os.getuid(), os.getgid(), os.getcwd())")
        uid, gid, _ = answer["out"].split()
        import pwd

        nobody = pwd.getpwnam("nobody")
        assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
        # Its home and /tmp are its own, and writable.
        code = "import os; open(os.path.expanduser('~/x'), 'w'); open('/tmp/y', 'w')"
        wrote = gateway.run("a", code)
        assert wrote["ok"], wrote
    finally:
        gateway.stop()


def test_the_stats_route_gives_no_session_to_replay() -> None:
    """A session ID read from the stats, replayed, reaches its session's worker:
    with the admin token it does (the attack, as it was for everyone); without
    it the stats show tags, and a tag replayed reaches a new, empty session."""
    plant = "import builtins; builtins.secret = 'victim-data'"
    steal = "import builtins; print(getattr(builtins, 'secret', None))"
    exposed = Gateway()  # with the admin token: the IDs, as anyone had them before
    try:
        exposed.run("victim-3f9c2b7e", plant)
        (stolen,) = [w["session_id"] for w in exposed.stats()["workers"] if w["session_id"]]
        assert exposed.run(stolen, steal)["out"].strip() == "victim-data"
    finally:
        exposed.stop()
    public = Gateway(admin_token=None)
    try:
        public.run("victim-3f9c2b7e", plant)
        with urllib.request.urlopen(public.base + "/herd/stats", timeout=10) as response:
            stats = json.loads(response.read())
        (tag,) = [w["session_id"] for w in stats["workers"] if w["session_id"]]
        assert tag != "victim-3f9c2b7e"
        assert public.run(tag, steal)["out"].strip() == "None"
    finally:
        public.stop()


def test_a_tenant_on_the_hosts_network_is_told_and_reported() -> None:
    """``--network host`` (for workers that must reach an API) keeps the rest of
    tenant isolation; the stats say the network is not isolated."""
    gateway = Gateway("--network", "host")
    try:
        reached = gateway.run("a", CONNECT.format(port=gateway.port))["out"].strip()
        assert reached == "0"
        stats = gateway.stats()
        assert stats["sandbox"] == "partial"
        assert "network NOT isolated: the host's, as asked" in stats["sandbox_reason"]
        assert (
            gateway.run("a", "import os; print(os.path.exists('/sys'))")["out"].strip() == "False"
        )
    finally:
        gateway.stop()


def test_a_program_right_in_tmp_does_not_open_the_hosts_tmp() -> None:
    """The view binds a program's folder, but never a shared one such as /tmp:
    a program at /tmp/x.py gets that file alone, and its /tmp stays private."""
    import shutil
    import uuid

    name = uuid.uuid4().hex
    program, secret = f"/tmp/hostile-{name}.py", Path(f"/tmp/secret-{name}.txt")
    shutil.copy(HOSTILE, program)
    secret.write_text("someone else's")
    try:
        gateway = Gateway(program=program)
        try:
            answer = gateway.run(
                "a",
                f"import os; print(os.path.exists({str(secret)!r}), sorted(os.listdir('/tmp')))"
                "; open('/tmp/mine', 'w').write('x')",
            )
            assert answer["ok"], answer
            seen, listing = answer["out"].split(" ", 1)
            assert seen == "False"
            assert secret.name not in listing
        finally:
            gateway.stop()
    finally:
        os.unlink(program)
        secret.unlink()
