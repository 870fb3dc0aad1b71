"""nsfw-launch: what a wrapped menu entry runs, as the user, to start the application through nsfw.

    nsfw-launch [--profile P] -- ORIGINAL COMMAND LINE...

It hands the session's environment to nsfw through a FIFO in $XDG_RUNTIME_DIR (sudo's env_reset would drop
DISPLAY & co, and letting the environment through sudo would let LD_PRELOAD & co into root's process), then runs
`sudo -n nsfw run --environment FIFO [--profile P] -- ORIGINAL...` and waits for it, relaying signals.

A FIFO rather than a file: nsfw reads it once, the writer then removes it, and no copy of the environment stays
on disk however the launch ends. -n: sudo never prompts; the sudoers drop-in lets group nsfw run `nsfw run`
without a password, and a launch from a menu has no terminal to ask on anyway.

From inside a sandbox (a sandboxed application opening a link through the entry) no_new_privs forbids sudo:
there the launcher starts the command in that same sandbox instead, which keeps it under that sandbox's rules.

A launch from a menu has no terminal either, so what nsfw says (a refused display, a broken profile, a warning)
would only reach a log: when stderr is not a terminal, the launcher passes it through and also shows nsfw's and
sudo's own lines as a desktop notification (notify-send, when installed).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from . import session
from .relay import exit_status

SUDO = "/usr/bin/sudo"
EXIT_USAGE = 125  # the launch failed before the application started, as `nsfw run` reports it
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
NOTE_MAX = 8  # lines of nsfw's own to show in a notification


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Request:
    profile: str | None
    command: tuple[str, ...]


def parse_args(args: Sequence[str]) -> Request:
    """The launcher's own options end at the first `--`; everything after it is the original command line,
    passed on untouched. Options are only ever taken from before it, so nothing of the original's can become
    an option of the launcher or of nsfw."""
    profile = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            command = tuple(args[i + 1:])
            if not command:
                raise UsageError("no command after --")
            return Request(profile, command)
        if arg == "--profile" and i + 1 < len(args):
            profile = args[i + 1]
            i += 2
        elif arg.startswith("--profile="):
            profile = arg[len("--profile="):]
            i += 1
        else:
            raise UsageError(f"unknown argument {arg!r}")
    raise UsageError("missing -- before the command")


def nsfw_path() -> str:
    """The nsfw entry point of this installation (LIBDIR/bin/nsfw, which PREFIX/bin/nsfw links to)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "bin", "nsfw")


def run_argv(request: Request, nsfw: str, environment: str, root: bool) -> list[str]:
    """The command that starts the sandbox. Options are given as --opt=value, so that a value that begins with
    a dash is never read as an option; the original command line follows the `--`."""
    profile = [f"--profile={request.profile}"] if request.profile is not None else []
    argv = [nsfw, "run", *profile, f"--environment={environment}", "--", *request.command]
    return argv if root else [SUDO, "-n", "--", *argv]


def private_dir(environ: Mapping[str, str]) -> str:
    """A fresh directory only this user can enter: in $XDG_RUNTIME_DIR when it is really the user's own."""
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    parent = None
    with contextlib.suppress(OSError):
        st = os.stat(runtime) if runtime.startswith("/") else None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
            parent = runtime
    return tempfile.mkdtemp(prefix="nsfw-launch-", dir=parent)


class EnvironmentFifo:
    """A FIFO that gives the environment to the first reader, then disappears."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.data = session.encode_environment(environ)
        self.dir = private_dir(environ)
        self.path = os.path.join(self.dir, "environment")
        os.mkfifo(self.path, 0o600)
        self.thread = threading.Thread(target=self._serve, name="nsfw-launch-env", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError), open(self.path, "wb") as f:  # blocks until nsfw opens it to read
            f.write(self.data)
        self.remove()

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def notify(summary: str, body: str, environ: Mapping[str, str]) -> None:
    """A desktop notification, when the session has a bus and notify-send is installed; else nothing."""
    tool = shutil.which("notify-send", path=environ.get("PATH", os.defpath))
    if tool is None or not environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run([tool, "--app-name=nsfw", "--icon=dialog-warning", summary, body],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5)


def _own_lines(chunk: bytes, pending: bytearray, notes: list[str]) -> None:
    """Collect complete lines of nsfw's and sudo's own from what the child wrote to stderr."""
    pending += chunk
    while b"\n" in pending:
        line, _, rest = bytes(pending).partition(b"\n")
        pending[:] = rest
        text = line.decode(errors="replace").strip()
        if text.startswith(("nsfw:", "sudo:")) and len(notes) < NOTE_MAX:
            notes.append(text)
    if len(pending) > 65536:  # a huge line of the application's own: not ours, forget it
        pending.clear()


def inside_a_sandbox(status: str = "/proc/self/status") -> bool:
    """no_new_privs is set: this process descends from a sandboxed application (nsfw sets it for COMMAND), so
    sudo cannot gain privileges here, and nothing could start a sandbox of its own."""
    with contextlib.suppress(OSError), open(status) as f:
        return any(line.split() == ["NoNewPrivs:", "1"] for line in f)
    return False


def launch(request: Request, environ: Mapping[str, str]) -> int:
    if inside_a_sandbox():
        # A sandboxed application opened this entry (a link clicked in a mail client, say). Failing would only
        # break the click; starting it where we are keeps it in that sandbox, under that sandbox's rules.
        print(f"nsfw-launch: started from inside a sandbox, where nsfw cannot start another: {request.command[0]} "
              "runs in this one, under its profile", file=sys.stderr)
        try:
            os.execvp(request.command[0], list(request.command))
        except OSError as e:
            print(f"nsfw-launch: cannot run {request.command[0]}: {e.strerror}", file=sys.stderr)
            return 127 if isinstance(e, FileNotFoundError) else 126
    fifo = EnvironmentFifo(environ)
    argv = run_argv(request, nsfw_path(), fifo.path, os.geteuid() == 0)
    relay = not os.isatty(2)
    read_end, write_end = os.pipe() if relay else (-1, -1)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                if relay:
                    os.dup2(write_end, 2)
                    os.close(read_end)
                    os.close(write_end)
                os.execv(argv[0], argv)
            except OSError as e:
                os.write(2, f"nsfw-launch: cannot run {argv[0]}: {e.strerror}\n".encode())
            os._exit(EXIT_USAGE)
        if relay:
            os.close(write_end)
        fifo.start()  # only now: no thread may exist at a fork

        def forward(signum: int, _frame: FrameType | None) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

        for s in RELAYED:
            # From a terminal, ^C and ^\ already reach the child (same process group): relaying them would
            # deliver them twice. The launcher only has to survive them.
            terminal = not relay and s in (signal.SIGINT, signal.SIGQUIT)
            signal.signal(s, signal.SIG_IGN if terminal else forward)
        notes: list[str] = []
        status = _wait(pid, read_end if relay else None, notes)
    finally:
        fifo.remove()
    code = exit_status(status)
    if notes and relay:
        failed = code == EXIT_USAGE or any(n.startswith("sudo:") for n in notes)
        name = os.path.basename(request.command[0])
        summary = f"{name} did not start" if failed else f"{name}: a warning from nsfw"
        body = "\n".join(notes)
        if any(n.startswith("sudo:") for n in notes):
            body += "\n(are you in group nsfw? `nsfw desktop list` shows the wrapped entries)"
        notify(summary, body, environ)
    return code


def _wait(pid: int, stderr_fd: int | None, notes: list[str]) -> int:
    """Pass the child's stderr on and wait for it. Its descendants may keep the pipe open after it exits, so
    the child's exit, not the pipe's end, ends the wait."""
    pending = bytearray()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if stderr_fd is not None:
            while select.select([stderr_fd], [], [], 0 if done else 0.2)[0]:
                chunk = os.read(stderr_fd, 65536)
                if not chunk:
                    os.close(stderr_fd)
                    stderr_fd = None
                    break
                with contextlib.suppress(OSError):
                    os.write(2, chunk)
                _own_lines(chunk, pending, notes)
                if not done:
                    break
        if done:
            break
        if stderr_fd is None:
            _, status = os.waitpid(pid, 0)
            break
    if stderr_fd is not None:
        os.close(stderr_fd)
    return status


def main(args: Sequence[str]) -> int:
    try:
        request = parse_args(args)
    except UsageError as e:
        print(f"nsfw-launch: {e}\nusage: nsfw-launch [--profile NAME|PATH] -- COMMAND [ARG...]", file=sys.stderr)
        return EXIT_USAGE
    return launch(request, dict(os.environ))
