"""Relaying signals to COMMAND while waiting for it: the one implementation the supervisor (launch.wait_child),
its slim image (waiter.py) and the warm client (warmclient.py, for the list) share.

Built-in modules only (posix, _signal, time): the slim waiter and the warm client load nothing else, and `signal`
itself would import enum.

The signals are blocked by the caller and taken with sigwaitinfo(), so no handler runs Python code between
waitpid calls and SIGCHLD cannot be missed: it stays pending from the moment it is blocked until it is taken.
"""

import posix
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers take it as True
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Iterable
else:
    import _signal

# What nsfw passes on to COMMAND, by number (launch.DEFAULT_FORWARD is this as signal.Signals).
RELAYED = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
           _signal.SIGWINCH, _signal.SIGCONT)
SIGCHLD = _signal.SIGCHLD
# si_code of a signal the kernel itself raised, e.g. ^C or a window resize on the controlling terminal.
SI_KERNEL = 0x80


def should_relay(si_code: int, si_pid: int, child: int) -> bool:
    """Whether a signal nsfw got should go on to COMMAND.

    Not when the kernel sent it (terminal ^C, ^\\, window resize: it went to the whole foreground process
    group, COMMAND included, as sudo also reasons), nor when COMMAND sent it (kill(0, ...) reached COMMAND
    already, and a signal it aimed at nsfw must not bounce back at it).
    """
    return si_code != SI_KERNEL and si_pid != child


def exit_status(wait_status: int) -> int:
    """A waitpid() status as a shell would report it: the exit code, or 128+N for death by signal N."""
    if posix.WIFSIGNALED(wait_status):
        return 128 + posix.WTERMSIG(wait_status)
    return posix.WEXITSTATUS(wait_status)


def relay_until_exit(pid: int, deadline: float | None = None, relayed: "Iterable[int]" = RELAYED) -> int | None:
    """COMMAND's exit status, relaying `relayed` meanwhile; None when `deadline` (monotonic) passes first.
    The caller has blocked `relayed` and SIGCHLD."""
    watched = {*relayed, SIGCHLD}
    while True:
        # SIGCHLD may come from any child, or mean COMMAND stopped: waitpid decides.
        done, wait_status = posix.waitpid(pid, posix.WNOHANG)
        if done == pid:
            return exit_status(wait_status)
        if deadline is None:
            info = _signal.sigwaitinfo(watched)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            got = _signal.sigtimedwait(watched, left)
            if got is None:
                continue
            info = got
        if info.si_signo != SIGCHLD and should_relay(info.si_code, info.si_pid, pid):
            try:
                posix.kill(pid, info.si_signo)
            except ProcessLookupError:  # a zombie still accepts signals; kept for safety
                pass


def drain(relayed: "Iterable[int]" = RELAYED) -> None:
    """Relayable signals that arrived after COMMAND exited were meant for it: take them, so that they do not
    kill nsfw before it has removed the sandbox."""
    pending = set(relayed)
    if pending:
        while _signal.sigtimedwait(pending, 0) is not None:
            pass
