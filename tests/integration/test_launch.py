"""nsfw.launch with real processes: run as root, against a throwaway user and an anonymous network namespace.

Nothing here touches the machine's own network namespace: the namespace COMMAND enters belongs to an
`unshare --net sleep` process and disappears with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from nsfw.errors import SetupError
from nsfw.launch import (
    DEFAULT_FORWARD,
    ExecError,
    User,
    invoking_user,
    prefork,
    read_as_user,
    spawn,
    wait_child,
)

if TYPE_CHECKING:
    from tests.conftest import LocalUser

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="launch integration tests need root (they create a user and drop privileges)"
)

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "NSFW_TEST": "spaces and = signs"}

# Run as COMMAND: writes what the process looks like from inside to argv[1], as JSON.
PROBE = r"""
import json, os, sys

def open_fds():
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")  # the fd listdir used is closed by now
        except OSError:
            continue
        fds.append(int(name))
    return sorted(fds)

with open("/proc/self/status") as f:
    status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
with open("/proc/self/environ", "rb") as f:
    environ = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if item)
report = {
    "resuid": os.getresuid(), "resgid": os.getresgid(), "groups": os.getgroups(),
    "status": {k: v.strip() for k, v in status.items()},
    "fds": open_fds(), "environ": environ, "cwd": os.getcwd(),
    "netns": os.stat("/proc/self/ns/net").st_ino, "mntns": os.stat("/proc/self/ns/mnt").st_ino,
    "argv": sys.argv[2:],
}
with open(sys.argv[1], "w") as f:
    json.dump(report, f)
"""

# Run as root in a subprocess: spawn() + wait_child() exactly as nsfw will, driven by a JSON spec.
SUPERVISOR = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from nsfw import launch
with open(sys.argv[2]) as f:
    spec = json.load(f)
if spec.get("tty"):
    tty = os.open(spec["tty"], os.O_RDWR)  # a session leader opening a tty makes it its controlling terminal
# Blocked before spawn(), so a signal cannot kill the supervisor before wait_child() relays it.
signal.pthread_sigmask(signal.SIG_BLOCK, launch.DEFAULT_FORWARD)
user = launch.invoking_user({"SUDO_UID": str(spec["uid"])}, 0)
pid = launch.spawn(spec["argv"], user=user, env=spec["env"], netns_fd=None)
with open(spec["pidfile"], "w") as f:
    f.write(str(pid))
sys.exit(launch.wait_child(pid))
"""

# Run as COMMAND: notes each signal it gets in argv[1], exits 42 on SIGTERM.
SIGNAL_NOTER = r"""
import os, signal, sys, time
out = sys.argv[1]
def note(signum, frame):
    with open(out, "a") as f:
        f.write(signal.Signals(signum).name + "\n")
    if signum == signal.SIGTERM:
        os._exit(42)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, note)
open(out + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user(test_user: LocalUser) -> User:
    """conftest's throwaway user (primary group plus one supplementary group), as nsfw sees it under sudo."""
    return invoking_user({"SUDO_UID": str(test_user.uid)}, 0)


@pytest.fixture
def root_user() -> User:
    return invoking_user({}, 0)


@pytest.fixture
def shared(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory the test user can write in (pytest's tmp_path is root-only), also the cwd."""
    path = Path(tempfile.mkdtemp(prefix="nsfw-launch-"))
    path.chmod(0o1777)
    monkeypatch.chdir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def anon_netns() -> Iterator[tuple[int, int]]:
    """(fd, inode) of a network namespace owned by a sleeping process: never the machine's, never named."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    path = f"/proc/{holder.pid}/ns/net"
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        # unshare runs in the same pid before it execs sleep: wait until the namespace is the new one.
        _wait_for(lambda: os.stat(path).st_ino != ours, "unshare --net to create a namespace")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd, os.fstat(fd).st_ino
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()


# --- helpers ---------------------------------------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _probe(
    user: User,
    out: Path,
    *,
    env: Mapping[str, str] = ENV,
    netns_fd: int | None = None,
    in_child: Callable[[], None] | None = None,
) -> dict[str, Any]:
    pid = spawn([PYTHON, "-I", "-c", PROBE, str(out)], user=user, env=env, netns_fd=netns_fd, in_child=in_child)
    assert wait_child(pid) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def _assert_no_privileges(report: dict[str, Any]) -> None:
    status = report["status"]
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[key], 16) == 0, f"{key} = {status[key]}"
    assert status["NoNewPrivs"] == "1"


def _run_status(argv: list[str], user: User, **kwargs: Any) -> int:
    return wait_child(spawn(argv, user=user, env=ENV, netns_fd=None, **kwargs))


def _is_reaped(pid: int) -> bool:
    """Gone entirely: not even a zombie waiting for its parent (this test process) to collect it."""
    return not Path(f"/proc/{pid}").exists()


def _is_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _supervise(shared: Path, user: User, argv: list[str], *, tty: str | None = None) -> subprocess.Popen[bytes]:
    spec = shared / "spec.json"
    spec.write_text(json.dumps({"uid": user.uid, "argv": argv, "env": ENV, "pidfile": str(shared / "pid"), "tty": tty}))
    return subprocess.Popen([PYTHON, "-c", SUPERVISOR, str(REPO), str(spec)], start_new_session=tty is not None)


def _stop(supervisor: subprocess.Popen[bytes], shared: Path) -> None:
    """Kill the supervisor and, should it have outlived it, the COMMAND it started."""
    supervisor.kill()
    supervisor.wait()
    pidfile = shared / "pid"
    command = int(pidfile.read_text()) if pidfile.exists() and pidfile.read_text() else None
    if command is not None and not _is_gone(command):
        with contextlib.suppress(ProcessLookupError):
            os.kill(command, signal.SIGKILL)


def _noted(out: Path) -> list[str]:
    return out.read_text().split() if out.exists() else []


# --- who COMMAND runs as ---------------------------------------------------------------------------------


def test_command_runs_as_the_user_with_no_privileges(user: User, shared: Path) -> None:
    report = _probe(user, shared / "probe.json")
    assert report["resuid"] == [user.uid] * 3
    assert report["resgid"] == [user.gid] * 3
    assert report["status"]["Uid"].split() == [str(user.uid)] * 4  # real, effective, saved, filesystem
    assert report["status"]["Gid"].split() == [str(user.gid)] * 4
    assert set(report["groups"]) == set(user.groups)
    assert len(user.groups) == 2  # the primary group and the supplementary one the fixture added
    _assert_no_privileges(report)


def test_root_gets_no_capabilities_either(root_user: User, shared: Path) -> None:
    report = _probe(root_user, shared / "probe.json")
    assert report["resuid"] == [0, 0, 0]
    assert set(report["groups"]) == set(root_user.groups)
    _assert_no_privileges(report)


def test_root_without_capabilities_cannot_read_a_root_only_file(root_user: User, shared: Path) -> None:
    secret = shared / "secret"
    secret.write_text("x")
    secret.chmod(0o000)  # only CAP_DAC_OVERRIDE can read this, even for its owner
    status = _run_status(["cat", str(secret)], root_user)
    assert status == 1


def test_only_stdio_reaches_the_command(user: User, shared: Path) -> None:
    leaked = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    pipe_r, pipe_w = os.pipe()
    os.set_inheritable(pipe_w, True)
    try:
        report = _probe(user, shared / "probe.json")
    finally:
        for fd in (leaked, pipe_r, pipe_w):
            os.close(fd)
    assert leaked > 2
    assert set(report["fds"]) <= {0, 1, 2}
    assert leaked not in report["fds"]
    assert pipe_w not in report["fds"]


def test_environment_and_cwd_pass_unchanged(user: User, shared: Path) -> None:
    report = _probe(user, shared / "probe.json")
    assert report["environ"] == ENV
    assert report["cwd"] == str(shared)


def test_command_is_searched_in_the_given_path(user: User, shared: Path) -> None:
    bindir = shared / "bin"
    bindir.mkdir()
    tool = bindir / "nsfw-test-tool"
    tool.write_text("#!/bin/sh\nexit 33\n")
    tool.chmod(0o755)
    env = {**ENV, "PATH": f"{bindir}:/usr/bin:/bin"}
    assert wait_child(spawn(["nsfw-test-tool"], user=user, env=env, netns_fd=None)) == 33


# --- namespaces ------------------------------------------------------------------------------------------


def test_command_runs_in_the_given_network_namespace(user: User, shared: Path, anon_netns: tuple[int, int]) -> None:
    fd, inode = anon_netns
    assert inode != os.stat("/proc/self/ns/net").st_ino
    report = _probe(user, shared / "probe.json", netns_fd=fd)
    assert report["netns"] == inode
    assert report["mntns"] != os.stat("/proc/self/ns/mnt").st_ino


def test_without_netns_the_command_stays_in_ours(user: User, shared: Path) -> None:
    report = _probe(user, shared / "probe.json")
    assert report["netns"] == os.stat("/proc/self/ns/net").st_ino


def test_binds_made_in_in_child_stay_private(shared: Path) -> None:
    # Run in a mount namespace of its own whose / is *shared*, as on systemd machines: without the
    # private remount in spawn(), the bind made in in_child would propagate back into it.
    script = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from nsfw import launch
shared = sys.argv[2]
mounts = open("/proc/self/mountinfo").read().splitlines()
assert any(line.split()[4] == "/" and "shared:" in line for line in mounts), "/ is not shared"
def bind() -> None:
    subprocess.run(["mount", "--bind", shared + "/sandbox", shared + "/target"], check=True)
user = launch.invoking_user({}, 0)
pid = launch.spawn(["cp", shared + "/target", shared + "/seen"], user=user, env={"PATH": "/usr/bin:/bin"},
                   netns_fd=None, in_child=bind)
assert launch.wait_child(pid) == 0
print(open(shared + "/target").read())
"""
    (shared / "sandbox").write_text("sandbox")
    (shared / "target").write_text("host")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "shared", PYTHON, "-c", script, str(REPO), str(shared)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (shared / "seen").read_text() == "sandbox"  # COMMAND saw the bind
    assert result.stdout.strip() == "host"  # the namespace nsfw runs in did not


# --- exit statuses and errors ----------------------------------------------------------------------------


def test_exit_status_is_passed_on(user: User) -> None:
    assert _run_status(["sh", "-c", "exit 7"], user) == 7
    assert _run_status(["true"], user) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_128_plus_n(user: User, shared: Path, signum: signal.Signals) -> None:
    assert _run_status(["sh", "-c", f"kill -{signum.name[3:]} $$"], user) == 128 + signum


def _record_pid(path: Path) -> Callable[[], None]:
    def record() -> None:
        path.write_text(str(os.getpid()))

    return record


def test_command_not_found_is_127(user: User, shared: Path) -> None:
    pidfile = shared / "child.pid"
    with pytest.raises(ExecError) as caught:
        spawn(["nsfw-no-such-command"], user=user, env=ENV, netns_fd=None, in_child=_record_pid(pidfile))
    assert caught.value.exit_code == 127
    assert "nsfw-no-such-command" in str(caught.value)
    assert ENV["PATH"] in str(caught.value)
    assert _is_reaped(int(pidfile.read_text()))


def test_missing_absolute_path_is_127(user: User) -> None:
    with pytest.raises(ExecError) as caught:
        spawn(["/nonexistent/nsfw-tool"], user=user, env=ENV, netns_fd=None)
    assert caught.value.exit_code == 127


def test_file_that_is_not_executable_is_126(user: User, shared: Path) -> None:
    script = shared / "not-executable"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(ExecError) as caught:
        spawn([str(script)], user=user, env=ENV, netns_fd=None)
    assert caught.value.exit_code == 126
    assert str(script) in str(caught.value)


def test_exec_happens_after_the_privilege_drop(user: User, root_user: User, shared: Path) -> None:
    script = shared / "root-only"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o700)
    assert _run_status([str(script)], root_user) == 0
    with pytest.raises(ExecError) as caught:
        spawn([str(script)], user=user, env=ENV, netns_fd=None)
    assert caught.value.exit_code == 126


def test_failing_in_child_is_a_setup_error_and_command_never_runs(user: User, shared: Path) -> None:
    marker, pidfile = shared / "ran", shared / "child.pid"

    def broken() -> None:
        pidfile.write_text(str(os.getpid()))
        raise RuntimeError("the sandbox broke")

    with pytest.raises(SetupError) as caught:
        spawn(["touch", str(marker)], user=user, env=ENV, netns_fd=None, in_child=broken)
    assert caught.value.exit_code == 125
    assert "the sandbox broke" in str(caught.value)
    assert not marker.exists()
    assert _is_reaped(int(pidfile.read_text()))  # reaped, not left as a zombie


def test_in_child_runs_as_root_in_the_namespace(user: User, shared: Path, anon_netns: tuple[int, int]) -> None:
    seen = shared / "in-child"
    fd, inode = anon_netns

    def in_child() -> None:
        seen.write_text(f"{os.geteuid()} {os.stat('/proc/self/ns/net').st_ino}")

    assert wait_child(spawn(["true"], user=user, env=ENV, netns_fd=fd, in_child=in_child)) == 0
    assert seen.read_text() == f"0 {inode}"


def test_bad_netns_fd_is_a_setup_error(user: User, shared: Path) -> None:
    marker = shared / "ran"
    with open(os.devnull, "rb") as not_a_namespace, pytest.raises(SetupError) as caught:
        spawn(["touch", str(marker)], user=user, env=ENV, netns_fd=not_a_namespace.fileno())
    assert caught.value.exit_code == 125
    assert "network namespace" in str(caught.value)
    assert not marker.exists()


def test_empty_argv_is_refused(user: User) -> None:
    with pytest.raises(ValueError, match="command"):
        spawn([], user=user, env=ENV, netns_fd=None)


# --- supervising -----------------------------------------------------------------------------------------


def test_other_children_do_not_confuse_wait_child(user: User) -> None:
    other = os.fork()
    if other == 0:
        os._exit(3)
    status = _run_status(["sh", "-c", "sleep 0.5; exit 5"], user)
    assert status == 5
    done, other_status = os.waitpid(other, 0)  # still ours to reap: wait_child left it alone
    assert (done, os.waitstatus_to_exitcode(other_status)) == (other, 3)


def test_signals_sent_to_nsfw_reach_the_command(user: User, shared: Path) -> None:
    out = shared / "signals"
    supervisor = _supervise(shared, user, [PYTHON, "-I", "-c", SIGNAL_NOTER, str(out)])
    try:
        _wait_for((shared / "signals.ready").exists, "COMMAND to install its handlers")
        supervisor.send_signal(signal.SIGUSR1)
        _wait_for(lambda: _noted(out) == ["SIGUSR1"], "COMMAND to note SIGUSR1")
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(10) == 42
    finally:
        _stop(supervisor, shared)
    assert _noted(out) == ["SIGUSR1", "SIGTERM"]


def test_terminal_signals_are_not_delivered_twice(user: User, shared: Path) -> None:
    out = shared / "signals"
    master, slave = pty.openpty()
    tty = os.ttyname(slave)
    os.close(slave)
    supervisor = _supervise(shared, user, [PYTHON, "-I", "-c", SIGNAL_NOTER, str(out)], tty=tty)
    try:
        _wait_for((shared / "signals.ready").exists, "COMMAND to install its handlers")
        os.write(master, b"\x03")  # ^C: the kernel sends SIGINT to the whole foreground process group
        _wait_for(lambda: "SIGINT" in _noted(out), "COMMAND to note SIGINT")
        time.sleep(0.5)  # time for a wrongly relayed second SIGINT to arrive
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(10) == 42
    finally:
        _stop(supervisor, shared)
        os.close(master)
    assert _noted(out) == ["SIGINT", "SIGTERM"]


def test_command_dies_with_nsfw(user: User, shared: Path) -> None:
    supervisor = _supervise(shared, user, ["sleep", "60"])
    try:
        pidfile = shared / "pid"
        _wait_for(lambda: pidfile.exists() and pidfile.read_text() != "", "the supervisor to start COMMAND")
        command = int(pidfile.read_text())
        assert f"Uid:\t{user.uid}\t" in Path(f"/proc/{command}/status").read_text()
        assert not _is_gone(command)
        supervisor.kill()  # SIGKILL: nsfw gets no chance to relay anything
        supervisor.wait()
        _wait_for(lambda: _is_gone(command), "COMMAND to die with its supervisor", timeout=5)
    finally:
        _stop(supervisor, shared)


def test_wait_child_restores_the_signal_mask(user: User) -> None:
    old = signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGUSR2})
    try:
        assert _run_status(["true"], user) == 0
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == {signal.SIGUSR2}
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_wait_child_without_forwarding_still_waits(user: User) -> None:
    pid = spawn(["sh", "-c", "exit 4"], user=user, env=ENV, netns_fd=None)
    assert wait_child(pid, forward=()) == 4


# --- reading files as the user ---------------------------------------------------------------------------


def test_read_as_user_refuses_a_root_only_file(user: User, shared: Path) -> None:
    secret = shared / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    groups_before = os.getgroups()
    with pytest.raises(PermissionError):
        read_as_user(secret, user)
    assert os.getresuid() == (0, 0, 0)
    assert os.getresgid() == (0, 0, 0)
    assert os.getgroups() == groups_before


def test_read_as_user_reads_the_users_own_file(user: User, shared: Path) -> None:
    own = shared / "profile"
    own.write_bytes(b"\x00binary\xff" * 20000)  # larger than a pipe buffer
    own.chmod(0o600)
    os.chown(own, user.uid, user.gid)
    assert read_as_user(own, user) == b"\x00binary\xff" * 20000
    assert read_as_user(str(own), user) == b"\x00binary\xff" * 20000


def test_read_as_user_uses_the_supplementary_groups(user: User, shared: Path) -> None:
    shared_file = shared / "group-readable"
    shared_file.write_bytes(b"for the group")
    extra = next(gid for gid in user.groups if gid != user.gid)
    os.chown(shared_file, 0, extra)
    shared_file.chmod(0o640)
    assert read_as_user(shared_file, user) == b"for the group"


def test_read_as_user_reports_a_missing_file(user: User, shared: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        read_as_user(shared / "missing", user)
    assert caught.value.filename == str(shared / "missing")


def test_read_as_user_cannot_pass_a_root_only_directory(user: User, shared: Path) -> None:
    private = shared / "private"
    private.mkdir(mode=0o700)
    (private / "readable").write_text("world-readable, but behind a root-only directory")
    (private / "readable").chmod(0o644)
    with pytest.raises(PermissionError):
        read_as_user(private / "readable", user)


def test_read_as_user_when_not_root_reads_directly(user: User, shared: Path) -> None:
    own = shared / "own"
    own.write_text("mine")
    os.chown(own, user.uid, user.gid)
    own.chmod(0o600)
    secret = shared / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); from nsfw import launch\n"
        "u = launch.invoking_user({}, os.getuid())\n"
        "print(launch.read_as_user(sys.argv[2], u).decode())\n"
        "try:\n    launch.read_as_user(sys.argv[3], u)\nexcept PermissionError:\n    print('refused')\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", script, str(REPO), str(own), str(secret)],
        user=user.uid,
        group=user.gid,
        extra_groups=list(user.groups),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.split() == ["mine", "refused"], result.stderr


def test_command_starts_with_default_signal_handling(user: User, shared: Path) -> None:
    # nsfw may block the forwarded signals before spawn(), and Python ignores SIGPIPE and SIGXFSZ:
    # COMMAND must inherit neither (grep reports its own state; a Python probe would ignore SIGPIPE itself).
    out = shared / "signal-state"
    old = signal.pthread_sigmask(signal.SIG_BLOCK, DEFAULT_FORWARD)
    try:
        status = _run_status(["sh", "-c", 'exec grep -E "^Sig(Blk|Ign):" /proc/self/status > "$0"', str(out)], user)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert status == 0
    state = dict(line.split(":\t") for line in out.read_text().splitlines())
    assert int(state["SigBlk"], 16) == 0
    for ignored_by_python in (signal.SIGPIPE, signal.SIGXFSZ):
        assert int(state["SigIgn"], 16) & (1 << (ignored_by_python - 1)) == 0, ignored_by_python.name


# --- COMMAND's process forked ahead (the warm daemon's spare launchers) ------------------------------------------


def _touch_factory(path: str) -> Callable[[], None]:
    """An in_child step for a child forked ahead: sent as (factory, args), since a closure cannot be."""

    def touch() -> None:
        Path(path).write_text(str(os.getuid()))  # still root, before the privilege drop

    return touch


UMASK_TOO = "\nwith open(sys.argv[1] + '.umask', 'w') as f:\n    f.write(oct(os.umask(0)))\n"


def test_a_command_forked_ahead_gets_what_spawn_gives(user: User, shared: Path,
                                                    anon_netns: tuple[int, int]) -> None:
    fd, inode = anon_netns
    os.chdir("/")
    old_umask = os.umask(0o022)
    child = prefork()  # forked here, with this cwd and umask: what the launch sets later must still reach it
    try:
        os.chdir(shared)
        os.umask(0o027)
        leaked = os.open("/dev/null", os.O_RDONLY)
        os.set_inheritable(leaked, True)
        marker = shared / "in_child"
        out = shared / "probe.json"
        child.prepare([PYTHON, "-I", "-c", PROBE + UMASK_TOO, str(out)], user=user, env=ENV,
                      netns=f"/proc/{os.getpid()}/fd/{fd}", in_child=(_touch_factory, (str(marker),)))
        os.close(leaked)
        os.chdir("/")  # too late: the plan went with the cwd of its time
        pid = child.start()
        assert wait_child(pid) == 0
    finally:
        os.umask(old_umask)
    report = json.loads(out.read_text())
    assert report["resuid"] == [user.uid] * 3 and set(report["groups"]) == set(user.groups)
    _assert_no_privileges(report)
    assert report["netns"] == inode and report["environ"] == ENV and report["cwd"] == str(shared)
    assert set(report["fds"]) <= {0, 1, 2}
    assert marker.read_text() == "0"
    assert (shared / "probe.json.umask").read_text() == "0o27"


def test_a_command_forked_ahead_reports_what_cannot_run(user: User, shared: Path) -> None:
    child = prefork()
    child.prepare(["/no/such/program"], user=user, env=ENV, netns=None, in_child=None)
    with pytest.raises(ExecError) as caught:
        child.start()
    assert caught.value.exit_code == 127 and _is_reaped(child.pid)


def test_a_prepared_command_never_told_to_start_never_runs(user: User, shared: Path) -> None:
    marker = shared / "ran"
    child = prefork()
    child.prepare(["touch", str(marker)], user=user, env=ENV, netns=None, in_child=None)
    child.close()  # the launch failed after COMMAND's process got ready: it leaves without exec
    assert _is_reaped(child.pid) and not marker.exists()


def test_a_child_forked_ahead_and_never_used_leaves() -> None:
    child = prefork()
    assert not _is_gone(child.pid)
    child.close()
    assert _is_reaped(child.pid)
