"""Records of running sandboxes under /run/nsfw: plain data, written atomically, before the kernel objects they
describe, under one lock that launches and clean-up share. Loading a record never changes anything."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

STATE_DIR = "/run/nsfw"  # fixed: root writes here, so no environment variable may move it
SANDBOXES = "sandboxes"
FORWARDING = "forwarding.json"


def _dir(*parts: str) -> str:
    return os.path.join(STATE_DIR, *parts)


@dataclass
class Record:
    id: str
    profile: str
    profile_path: str
    profile_sha256: str
    command: list[str]
    uid: int
    user: str
    network: str
    netns: str
    slot: int | None = None
    veth: str | None = None
    table: str | None = None
    addresses: list[str] = field(default_factory=list)
    supervisor_pid: int = 0
    supervisor_start: int = 0  # /proc/PID/stat starttime: a reused pid is never mistaken for ours
    keeper_pid: int = 0  # the root process that owns the sandbox once COMMAND has started
    keeper_start: int = 0
    command_pid: int = 0
    closing: bool = False  # being removed: nobody may join it any more
    pooled: bool = False  # built ahead by the warm daemon (its supervisor), for no profile yet
    started_at: float = 0.0
    version: int = 1


def proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields resume after the last ')'
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def _running(pid: int, start: int) -> bool:
    """Alive, and the same process: a reused pid has another start time, and a zombie is dead already."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start


def alive(record: Record) -> bool:
    """Somebody still owns the sandbox: its keeper, or, before the keeper exists, its supervisor."""
    return _running(record.keeper_pid, record.keeper_start) or _running(record.supervisor_pid,
                                                                         record.supervisor_start)


def write_json(path: str, data: dict[str, Any]) -> None:
    """Atomically: readers see the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(record: Record) -> None:
    write_json(_dir(SANDBOXES, f"{record.id}.json"), asdict(record))


def sandbox_dir(record_id: str) -> str:
    """A sandbox's own files: its resolv.conf, nsswitch.conf and DNS query log."""
    return _dir(SANDBOXES, record_id)


def drop_dir(record_id: str) -> bool:
    """Idempotent, never raises. True when something was removed."""
    path = sandbox_dir(record_id)
    if not os.path.isdir(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def drop(record_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_dir(SANDBOXES, f"{record_id}.json"))


def load(record_id: str) -> Record | None:
    try:
        with open(_dir(SANDBOXES, f"{record_id}.json")) as f:
            return Record(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def records(include_pool: bool = False) -> list[Record]:
    """The sandboxes' records; the warm daemon's pool (built, not yet launched) only when asked for: it runs
    nothing, so ps, stop and joins have no business with it, but clean-up and address allocation do."""
    out: list[Record] = []
    try:
        entries = sorted(os.listdir(_dir(SANDBOXES)))
    except FileNotFoundError:
        return out
    for name in entries:
        if not name.endswith(".json"):
            continue
        try:
            with open(_dir(SANDBOXES, name)) as f:
                record = Record(**json.load(f))
            if include_pool or not record.pooled:
                out.append(record)
        except (OSError, ValueError, TypeError):
            continue  # a foreign or broken file is not ours to interpret
    return out


def new_record(**kw: Any) -> Record:
    return Record(supervisor_pid=os.getpid(), supervisor_start=proc_start_time(os.getpid()) or 0,
                  started_at=time.time(), **kw)


@contextmanager
def locked() -> Iterator[None]:
    os.makedirs(STATE_DIR, mode=0o755, exist_ok=True)
    fd = os.open(_dir("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_forwarding() -> dict[str, Any] | None:
    try:
        with open(_dir(FORWARDING)) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return None


def save_forwarding(data: dict[str, Any]) -> None:
    write_json(_dir(FORWARDING), data)


def drop_forwarding() -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_dir(FORWARDING))
