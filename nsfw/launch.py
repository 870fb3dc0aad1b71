"""Start COMMAND as the invoking user inside the sandbox, and supervise it until it exits.

nsfw runs as root (through sudo or pkexec) only to build the sandbox. Everything here makes sure that COMMAND
gets none of that: it runs with the invoking user's ids and groups, no capabilities in any set, no_new_privs,
only fds 0-2, and it dies with nsfw.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import signal
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from nsfw import caps, relay
from nsfw.errors import NsfwError, PrivilegeError, SetupError

EXIT_SETUP = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

# What nsfw relays to COMMAND (relay.RELAYED, by number there: the slim waiter and the warm client share it).
DEFAULT_FORWARD: tuple[signal.Signals, ...] = tuple(signal.Signals(s) for s in relay.RELAYED)

# (uid_t)-1 means "leave unchanged" to the set*id calls, so it can never name a user.
_MAX_ID = 2**32 - 2
_REPORT_MAX = 3800  # below PIPE_BUF, so the child's one report write is atomic


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    name: str
    home: str
    groups: tuple[int, ...]  # supplementary groups as initgroups would set them (the primary gid included)


class ExecError(NsfwError):
    """COMMAND could not be executed. exit_code follows the shell: 127 not found, 126 found but not runnable."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --- who invoked nsfw ------------------------------------------------------------------------------------


def invoking_user(environ: Mapping[str, str], real_uid: int) -> User:
    """The user nsfw acts for: sudo's SUDO_UID/SUDO_GID, else pkexec's PKEXEC_UID, else real_uid."""
    uid, source = _invoking_uid(environ, real_uid)
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise PrivilegeError(
            f"user id {uid} (from {source}) has no passwd entry, and nsfw runs COMMAND as that user: "
            "run nsfw through sudo or pkexec from an account that exists in /etc/passwd (or your user directory)"
        ) from None
    gid = entry.pw_gid
    if source == "SUDO_UID" and "SUDO_GID" in environ:
        gid = _parse_id(environ, "SUDO_GID")
    return User(uid, gid, entry.pw_name, entry.pw_dir, _group_list(entry.pw_name, gid))


def _invoking_uid(environ: Mapping[str, str], real_uid: int) -> tuple[int, str]:
    # SUDO_UID/PKEXEC_UID are only trusted when the real uid is root, i.e. when sudo or pkexec set them: a
    # user running nsfw with file capabilities could otherwise claim to be root and get COMMAND run as uid 0.
    if real_uid != 0:
        return real_uid, "the real user id"
    for key in ("SUDO_UID", "PKEXEC_UID"):
        if key in environ:
            return _parse_id(environ, key), key
    return real_uid, "the real user id"


def _parse_id(environ: Mapping[str, str], key: str) -> int:
    value = environ[key]
    if value.isascii() and value.isdigit() and int(value) <= _MAX_ID:
        return int(value)
    raise PrivilegeError(
        f"{key}={value!r} is not a user or group id; sudo and pkexec set it to the id of the user who ran "
        f"them: run nsfw through sudo or pkexec, or unset {key}"
    )


def _group_list(name: str, gid: int) -> tuple[int, ...]:
    # getgrouplist is what initgroups uses; computing it here, in the parent, means the child never does an
    # NSS lookup (LDAP, sssd) from inside a sandbox that may have no network.
    return tuple(dict.fromkeys(os.getgrouplist(name, gid)))


# --- reading the user's files ----------------------------------------------------------------------------


READ_LIMIT = 64 << 20  # a profile's list of 100,000 networks is a few MB; /dev/zero is not a profile


def read_as_user(path: str | os.PathLike[str], user: User, limit: int = READ_LIMIT) -> bytes:
    """The bytes of path, read with the user's permissions, never root's. Raises the OSError the user would get.

    The read happens in a forked child that drops to the user for good and sends the bytes back through a
    pipe. Switching fsuid/fsgid in this process would also work, but setgroups() changes every thread and a
    failure half-way (or an exception between switch and restore) would leave nsfw running with mixed ids;
    a child cannot leak its ids back, costs about a millisecond, and needs nothing restored.
    """
    if os.geteuid() != 0 or user.uid == 0:
        # Not root: the OS already applies our own permissions. Reading for root as root: nothing to drop.
        with open(path, "rb") as f:
            return _bounded(f.read(limit + 1), limit, os.fspath(path))
    return _bounded(_read_in_child(os.fspath(path), user, limit), limit, os.fspath(path))


def _bounded(data: bytes, limit: int, path: str) -> bytes:
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB, which nsfw does not read", path)
    return data


def _read_in_child(path: str, user: User, limit: int) -> bytes:
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _read_child(path, user, parent, write_end, limit)
    os.close(write_end)
    try:
        reply = _read_all(read_end)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return _decode_read_reply(reply, path, user)


def _read_child(path: str, user: User, parent: int, out: int, limit: int) -> NoReturn:
    try:
        try:
            _become(user)
            _die_with_parent(parent)
        except BaseException as exc:  # everything must be reported; nothing may return
            _write_all(out, b"S" + _describe(exc).encode(errors="replace"))
            raise
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)  # no more than the caller accepts, and never all of /dev/zero
        except OSError as exc:
            _write_all(out, b"E%d" % (exc.errno or errno.EIO))
        else:
            _write_all(out, b"E%d" % errno.EFBIG if len(data) > limit else b"D" + data)
    finally:
        os._exit(0)


def _become(user: User) -> None:
    # Leaving uid 0 for a non-zero uid in all three slots makes the kernel clear every capability.
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)


def _decode_read_reply(reply: bytes, path: str, user: User) -> bytes:
    tag, body = reply[:1], reply[1:]
    if tag == b"D":
        return body
    if tag == b"E" and body.isdigit():
        code = int(body)
        raise OSError(code, os.strerror(code), path)  # OSError() picks PermissionError etc. from the errno
    if tag == b"S":
        raise PrivilegeError(f"could not switch to user {user.name} to read {path}: {body.decode(errors='replace')}")
    raise OSError(errno.EIO, f"reading {path} as {user.name} failed: the helper process died", path)


# --- starting COMMAND ------------------------------------------------------------------------------------


def spawn(
    argv: Sequence[str],
    *,
    user: User,
    env: Mapping[str, str],
    netns_fd: int | None,
    in_child: Callable[[], None] | None = None,
) -> int:
    """Start argv as user in the sandbox and return its pid once it was exec'd.

    Raises ExecError (127, 126) when argv[0] cannot be run, SetupError (exit_code 125) when the sandbox could
    not be entered or privileges not dropped; in both cases COMMAND never ran and the child was reaped.
    Callers that want no window in which a signal kills nsfw before wait_child() relays it may block those
    signals before spawn(): the child unblocks everything, wait_child() picks up what is pending.
    """
    if not argv:
        raise ValueError("spawn() needs a command to run")
    # Both ends are close-on-exec (PEP 446): the write end vanishes when exec succeeds, so EOF with nothing
    # read means COMMAND is running, and anything read is the child's report of why it is not.
    read_end, write_end = os.pipe()
    plan = _Plan(list(argv), user, dict(env), netns_fd, in_child, os.getpid(), write_end)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        raise SetupError(f"could not start a process for COMMAND: {exc} (too many processes?)") from exc
    if pid == 0:
        os.close(read_end)
        _child(plan)
    os.close(write_end)
    return _started(pid, read_end)


def _started(pid: int, read_end: int) -> int:
    try:
        report = _read_all(read_end)
    finally:
        os.close(read_end)
    if not report:
        return pid
    os.waitpid(pid, 0)
    raise _report_to_error(report)


@dataclass
class Preforked:
    """A child forked ahead of a launch (by the warm daemon's spare launcher), waiting for what spawn() would
    have given it: forking a process with nsfw's heap costs milliseconds that a launch then does not pay.

    prepare() sends the plan: the child enters the sandbox and drops its privileges while the launch loads
    the rules, then waits. start() tells it to exec COMMAND, once everything COMMAND may rely on is in place."""

    pid: int
    sock: socket.socket  # the plan and the three standard fds go over it, then "go"
    report: int  # as in spawn(): EOF once COMMAND was exec'd, else the child's report
    started: bool = False

    def close(self) -> None:
        """Unused, or prepared but never told to start: the child sees EOF and leaves, without exec. Never
        raises."""
        if self.started:
            return
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.report)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def prepare(self, argv: Sequence[str], *, user: User, env: Mapping[str, str], netns: str | None,
                in_child: tuple[Callable[..., Callable[[], None]], tuple[str, ...]] | None) -> None:
        """What spawn() takes, to a child forked ahead: it gets this process's fds 0-2, working directory and
        umask, and opens the namespace at `netns`. `in_child` is (factory, args), called in the child for the
        in_child step (a closure cannot be sent). Raises SetupError when the child is gone."""
        import array
        import pickle  # the warm daemon's only: a cold run never imports it

        if not argv:
            raise ValueError("spawn() needs a command to run")
        umask = os.umask(0o022)
        os.umask(umask)
        message = pickle.dumps((list(argv), user, dict(env), netns, in_child, os.getcwd(), umask))
        try:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        except OSError as exc:
            self.close()
            raise SetupError(f"could not start a process for COMMAND: {exc}") from exc

    def start(self) -> int:
        """COMMAND may run now: its pid once exec'd, or the ExecError/SetupError spawn() would raise."""
        try:
            self.sock.send(b"go")
        except OSError:
            pass  # it failed and left already: its report says why
        self.sock.close()
        self.started = True
        return _started(self.pid, self.report)


def prefork() -> Preforked:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the waiting child
        try:
            os.close(read_end)
            ours.close()
            _preforked(theirs, write_end, parent)
        finally:
            os._exit(EXIT_SETUP)
    theirs.close()
    os.close(write_end)
    return Preforked(pid, ours, read_end)


def _preforked(sock: socket.socket, report_fd: int, parent: int) -> NoReturn:
    import array
    import pickle

    ahead = _ahead()  # while no launch waits for it
    try:
        message, ancdata, _flags, _addr = sock.recvmsg(1 << 22, socket.CMSG_SPACE(3 * 4))
    except OSError:
        os._exit(0)
    if not message:
        os._exit(0)  # the launcher left without a launch
    try:
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(fds) != 3:
            raise ValueError("a launch brings its three standard fds")
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        argv, user, env, netns, factory, cwd, umask = pickle.loads(message)
        os.chdir(cwd)  # what a child forked now would have inherited
        os.umask(umask)
        netns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns else None
        in_child = factory[0](*factory[1]) if factory else None
        plan = _Plan(argv, user, env, netns_fd, in_child, parent, report_fd, go=sock.fileno(), ahead=ahead)
    except BaseException as exc:
        _report(report_fd, EXIT_SETUP, f"internal error while starting COMMAND: {_describe(exc)}")
        os._exit(EXIT_SETUP)
    _child(plan)


@dataclass(frozen=True)
class _Plan:
    """Everything the forked child needs; built before fork so the child only acts."""

    argv: list[str]
    user: User
    env: dict[str, str]
    netns_fd: int | None
    in_child: Callable[[], None] | None
    parent: int  # nsfw's pid, to notice that it died before the child could arrange to die with it
    report_fd: int
    go: int = -1  # a child forked ahead: prepared, it execs only once "go" arrives here (EOF: it leaves)
    ahead: str | None = None  # a child forked ahead did _ahead() already: "" done, else what failed


def _child(plan: _Plan) -> NoReturn:
    # Whatever happens, this process must not return into the parent's code (it would run nsfw twice).
    try:
        _prepare(plan)
        if plan.go >= 0 and os.read(plan.go, 16) != b"go":
            os._exit(EXIT_SETUP)  # the launch was abandoned: COMMAND never runs
        _exec(plan)
    except _ChildSetupError as failure:
        _report(plan.report_fd, EXIT_SETUP, str(failure))
    except BaseException as exc:  # a bug here must become a report, never a second running nsfw
        _report(plan.report_fd, EXIT_SETUP, f"internal error while starting COMMAND: {_describe(exc)}")
    finally:
        os._exit(EXIT_SETUP)


class _ChildSetupError(Exception):
    """A setup step failed in the child; str() is the message for the user."""


def _ahead() -> str:
    """What a child forked ahead of its launch does while it waits: empty its capability bounding set, which
    depends on neither the sandbox nor the user. The bounding set only limits what an exec may grant: the
    capabilities this process uses until it drops them (setns, mount, setgroups) stay. "" when done, else
    what failed (the launch reports it). (A private mount namespace made this early would not see the
    namespaces bound under /run/netns later.)"""
    try:
        drop_bounding_set()
    except BaseException as exc:
        return f"could not empty COMMAND's capability bounding set: {_describe(exc)}"
    return ""


def _prepare(plan: _Plan) -> None:
    if plan.ahead:
        raise _ChildSetupError(plan.ahead)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("could not make COMMAND die with nsfw", lambda: _die_with_parent(plan.parent)),
        ("could not enter the sandbox's network namespace", lambda: _enter_netns(plan.netns_fd)),
        ("could not give COMMAND a private mount namespace", _private_mounts),
        ("preparing COMMAND's sandbox failed", plan.in_child or _nothing),
        (f"could not drop root privileges to user {plan.user.name}",
         lambda: drop_privileges(plan.user, bounding=plan.ahead is None)),
        # Changing the euid cleared the parent-death signal (kernel commit_creds), so set it again.
        ("could not make COMMAND die with nsfw", lambda: _die_with_parent(plan.parent)),
        ("could not close nsfw's files before starting COMMAND", lambda: _close_fds(keep={plan.report_fd, plan.go})),
        ("could not reset signal handling for COMMAND", _reset_signals),
    ]
    for what, step in steps:
        try:
            step()
        except BaseException as exc:  # in_child may raise anything: all of it is a setup failure
            raise _ChildSetupError(f"{what}: {_describe(exc)}") from exc


def _nothing() -> None:
    pass


def _die_with_parent(parent: int) -> None:
    caps.prctl(caps.PR_SET_PDEATHSIG, signal.SIGKILL)
    # nsfw may have died before the line above ran; then no signal will ever come.
    if os.getppid() != parent:
        raise _ChildSetupError("nsfw exited before COMMAND started")


def _enter_netns(netns_fd: int | None) -> None:
    if netns_fd is not None:
        caps.setns(netns_fd, caps.CLONE_NEWNET)


def _private_mounts() -> None:
    # A mount namespace of its own lets later setup bind files (resolv.conf) over the host's for COMMAND
    # only; private propagation keeps those binds from leaking back into the host's namespace.
    caps.unshare(caps.CLONE_NEWNS)
    caps.make_mounts_private()


def _close_fds(keep: set[int]) -> None:
    # Listing /proc/self/fd finds every open fd, however high, without guessing at a limit.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:  # the fd listdir used, already closed
                    raise


def _reset_signals() -> None:
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec; COMMAND expects the defaults.
    # Handlers are reset by exec itself. A blocked mask also survives exec, so unblock everything.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _exec(plan: _Plan) -> None:
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)  # searches env's PATH, not nsfw's
    except OSError as exc:
        code = EXIT_NOT_FOUND if exc.errno in (errno.ENOENT, errno.ENOTDIR) else EXIT_NOT_EXECUTABLE
        _report(plan.report_fd, code, _exec_message(plan.argv[0], plan.env, plan.user, code, exc))


def _exec_message(name: str, env: Mapping[str, str], user: User, code: int, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if code == EXIT_NOT_FOUND and "/" not in name:
        path = env.get("PATH", os.defpath)
        return f"{name}: command not found in PATH={path} (give its full path, or add its directory to PATH)"
    if code == EXIT_NOT_FOUND:
        return f"{name}: {reason}"
    return f"{name}: cannot be run by user {user.name}: {reason} (check that it is executable by that user)"


def _report(fd: int, code: int, message: str) -> None:
    data = f"{code}:{message}".encode(errors="replace")[:_REPORT_MAX]
    _write_all(fd, data)


def _report_to_error(report: bytes) -> NsfwError:
    code_text, _, message_bytes = report.partition(b":")
    code = int(code_text) if code_text.isdigit() else EXIT_SETUP
    message = message_bytes.decode(errors="replace")
    if code in (EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE):
        return ExecError(code, message)
    error = SetupError(f"COMMAND was not started: {message}")
    error.exit_code = EXIT_SETUP
    return error


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text or type(exc).__name__


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- dropping privileges ---------------------------------------------------------------------------------


def drop_bounding_set() -> None:
    """Empty the capability bounding set (PR_CAPBSET_DROP needs CAP_SETPCAP): no exec can grant a capability."""
    for cap in range(caps.cap_last_cap() + 1):
        caps.prctl(caps.PR_CAPBSET_DROP, cap)


def drop_privileges(user: User, bounding: bool = True) -> None:
    """Become user for good, with no capabilities in any set and no way to gain any; verified before return.

    The order matters: groups and gids first (changing them needs CAP_SETGID), the bounding set next
    (PR_CAPBSET_DROP needs CAP_SETPCAP), then the uids. The capability sets are cleared explicitly because
    setresuid() keeps them when the user is root; with empty inheritable and bounding sets even uid 0 gets
    no capabilities from exec, and no_new_privs stops setuid binaries and file capabilities from adding any.
    """
    os.setgroups(list(user.groups))
    os.setresgid(user.gid, user.gid, user.gid)
    if bounding:  # else emptied already (_ahead); privilege_problems below checks it either way
        drop_bounding_set()
    caps.prctl(caps.PR_CAP_AMBIENT, caps.PR_CAP_AMBIENT_CLEAR_ALL)
    os.setresuid(user.uid, user.uid, user.uid)
    caps.capset_empty()
    caps.prctl(caps.PR_SET_NO_NEW_PRIVS, 1)
    problems = privilege_problems(user, _read_status())
    if problems:
        raise PrivilegeError("privileges were not fully dropped: " + "; ".join(problems))


def privilege_problems(user: User, status: Mapping[str, str]) -> list[str]:
    """What about this process's credentials differs from a fully dropped user (status: /proc/self/status)."""
    problems = []
    # status also shows the filesystem uid and gid, which getresuid()/getresgid() do not.
    if os.getresuid() != (user.uid,) * 3 or _status_ids(status, "Uid") != (user.uid,) * 4:
        problems.append(f"uids are {status.get('Uid', '?')}, not {user.uid}")
    if os.getresgid() != (user.gid,) * 3 or _status_ids(status, "Gid") != (user.gid,) * 4:
        problems.append(f"gids are {status.get('Gid', '?')}, not {user.gid}")
    if set(os.getgroups()) != set(user.groups):
        problems.append(f"groups are {sorted(os.getgroups())}, not {sorted(user.groups)}")
    if any(caps.capget()):
        problems.append("effective, permitted or inheritable capabilities remain")
    cap_sets = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    problems.extend(f"{key} is {status.get(key)}" for key in cap_sets if int(status.get(key, "1"), 16))
    if status.get("NoNewPrivs") != "1":
        problems.append("no_new_privs is not set")
    return problems


def _status_ids(status: Mapping[str, str], key: str) -> tuple[int, ...]:
    return tuple(int(field) for field in status.get(key, "").split())


def _read_status() -> dict[str, str]:
    with open("/proc/self/status", encoding="utf-8") as f:
        return parse_status(f.read())


def parse_status(text: str) -> dict[str, str]:
    """The "Key:\tvalue" lines of a /proc/PID/status file."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


# --- supervising COMMAND ---------------------------------------------------------------------------------


def wait_child(pid: int, *, forward: Iterable[signal.Signals] = DEFAULT_FORWARD) -> int:
    """Wait for COMMAND, relaying the signals in forward; its exit status, or 128+N if signal N killed it
    (relay.py: the loop the slim waiter runs too)."""
    relayed = tuple(forward)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*relayed, signal.SIGCHLD})
    try:
        status = relay.relay_until_exit(pid, relayed=relayed)
        assert status is not None  # no deadline
        return status
    finally:
        relay.drain(relayed)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
