"""The supervisor's wait for COMMAND, which after GRACE goes on in a fresh, slim image of the same process.

A cold supervisor has imported everything a launch needs, and waiting for COMMAND needs none of it. Once
COMMAND has run for GRACE (so that short runs never pay for an exec, and a launch's latency is untouched), the
supervisor execs `slim.py waiter` (see nsfw/slim.py): same pid, so COMMAND stays its child and the terminal's
shell still waits for it; the keeper's pipes are kept (made inheritable), everything else closes on exec.

Nothing is lost across the exec: the relayed signals and SIGCHLD stay blocked throughout (a blocked mask and
pending signals survive execve), and the new image takes them with relay.py's loop, the one launch.wait_child
runs. Then it hands the sandbox to the keeper and exits with COMMAND's status; only when the keeper is gone does
it import nsfw's clean-up (the rare path) and remove the sandbox itself.

This module and nsfw/relay.py import built-in modules only (posix, _signal, time, sys): they are the whole of
the slim waiter.
"""

import posix
import sys
import time

from nsfw.relay import RELAYED, SIGCHLD, drain, relay_until_exit

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers take it as True
if TYPE_CHECKING:
    import signal as _signal
else:
    import _signal  # `signal` itself would import enum

GRACE = 1.5  # seconds COMMAND runs before the supervisor slims down
SCRIPT = __file__.rsplit("/", 1)[0] + "/slim.py"


def wait(pid: int, keeper_fds: tuple[int, int, int] | None, record_id: str, slim: bool = True) -> int:
    """In the supervisor: launch.wait_child(pid), except that after GRACE the process execs the slim waiter,
    which then does the rest of sandbox.run's work (the hand-over to the keeper whose pid and pipe ends are
    `keeper_fds`, None when this run joined another's sandbox) and exits. Returns only when COMMAND exited
    within GRACE, or when the exec failed (then this process waits, as before)."""
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, {*RELAYED, SIGCHLD})
    try:
        status = relay_until_exit(pid, time.monotonic() + GRACE) if slim else None
        if status is None:
            if slim:
                _exec(pid, keeper_fds, record_id)
            status = relay_until_exit(pid)
            assert status is not None
        return status
    finally:
        drain()
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old)


def argv_for(pid: int, keeper_fds: tuple[int, int, int] | None, record_id: str) -> list[str]:
    keeper, to_keeper, from_keeper = keeper_fds or (0, -1, -1)
    return [sys.executable, "-IS", SCRIPT, "waiter", str(pid), str(keeper), str(to_keeper), str(from_keeper),
            record_id]


def _exec(pid: int, keeper_fds: tuple[int, int, int] | None, record_id: str) -> None:
    """Never returns, unless the exec failed."""
    try:
        for fd in (keeper_fds or (0,))[1:]:
            posix.set_inheritable(fd, True)
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        argv = argv_for(pid, keeper_fds, record_id)
        posix.execv(argv[0], argv)
    except OSError:
        pass  # this image goes on waiting: more memory, same behaviour


def hand_over(keeper: int, to_keeper: int, from_keeper: int) -> bool:
    """sandbox.Keeper.hand_over: tell the keeper COMMAND exited. False when the keeper is gone already."""
    try:
        posix.write(to_keeper, b"exit")
        handed = True
    except OSError:  # EPIPE: nobody reads the other end any more
        handed = False
    finally:
        posix.close(to_keeper)
        posix.close(from_keeper)
    try:
        posix.waitpid(keeper, posix.WNOHANG)
    except ChildProcessError:
        pass
    return handed


def _clean_up_alone(record_id: str) -> None:
    """The keeper died: as sandbox.run, kill what runs in the sandbox and remove it. Imports the full nsfw."""
    import site

    sys.path.extend(d for d in site.getsitepackages() if d not in sys.path)
    from nsfw import reconcile, state

    record = state.load(record_id)
    if record is not None:
        reconcile.kill_processes(record)
        reconcile.teardown(record)


def main(args: list[str]) -> None:
    """`slim.py waiter PID KEEPER TO_KEEPER FROM_KEEPER RECORD_ID`: the signals are still blocked."""
    code = 125
    try:
        pid, keeper, to_keeper, from_keeper = (int(a) for a in args[:4])
        record_id = args[4]
        status = relay_until_exit(pid)
        assert status is not None
        code = status
        drain()
        if to_keeper >= 0 and not hand_over(keeper, to_keeper, from_keeper):
            _clean_up_alone(record_id)
    except BaseException:  # never a traceback on the user's terminal for what is nsfw's business
        pass
    finally:
        posix._exit(code)
