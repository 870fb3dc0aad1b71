"""Where desktop entries live, and the wrapped copies that `nsfw desktop` writes there.

A desktop file id (`firefox-esr` for firefox-esr.desktop, `kde4-okular` for kde4/okular.desktop) names the
first entry of that id along $XDG_DATA_HOME/applications, then each of $XDG_DATA_DIRS/applications. A wrapped
copy is written where it comes first: $XDG_DATA_HOME/applications for one user, /usr/local/share/applications
(which precedes /usr/share in the default $XDG_DATA_DIRS) for everyone. The original is never modified. When a
file of the user's (or, with --system, of the admin's) already stands where the copy goes, it is moved aside to
nsfw/desktop-originals/ under the same data directory and moved back by unwrap, so nothing is lost.

Runs as whoever calls `nsfw desktop`, with that caller's permissions: no privilege is involved.
"""

from __future__ import annotations

import contextlib
import grp
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import desktop
from .desktop import DesktopEntry, DesktopError

SYSTEM_DATA_DIR = Path("/usr/local/share")
DEFAULT_DATA_DIRS = (Path("/usr/local/share"), Path("/usr/share"))
GROUP = "nsfw"  # members launch wrapped entries without a password (desktop-wrappers/nsfw.sudoers)
ORIGINALS = Path("nsfw") / "desktop-originals"
# An id becomes a file name: nothing that could climb out of the applications directory.
_ID = re.compile(r"^(?![.-])[^/\x00-\x1f]+$")


def default_launcher() -> str:
    """nsfw-launch beside this installation: LIBDIR/desktop-wrappers/ when installed, the checkout's otherwise."""
    return str(Path(__file__).resolve().parent.parent / "desktop-wrappers" / "nsfw-launch")


@dataclass(frozen=True)
class Scope:
    """Where wrapped copies go (base/applications) and where originals are looked for, in precedence order."""

    name: str  # "user" or "system"
    base: Path
    search: tuple[Path, ...]  # data directories, highest precedence first

    @property
    def applications(self) -> Path:
        return self.base / "applications"

    @property
    def originals(self) -> Path:
        return self.base / ORIGINALS


def scope(system: bool, environ: Mapping[str, str], home: str) -> Scope:
    dirs = tuple(Path(d) for d in environ.get("XDG_DATA_DIRS", "").split(":") if d.startswith("/"))
    dirs = dirs or DEFAULT_DATA_DIRS
    if system:
        return Scope("system", SYSTEM_DATA_DIR, dirs)
    data_home = environ.get("XDG_DATA_HOME", "")
    base = Path(data_home) if data_home.startswith("/") else Path(home) / ".local" / "share"
    return Scope("user", base, (base, *dirs))


def desktop_id(app: str) -> str:
    """`firefox` and `firefox.desktop` are the id firefox.desktop."""
    name = app[:-len(".desktop")] if app.endswith(".desktop") else app
    if not _ID.match(name):
        raise DesktopError(f"{app!r} is not a desktop file id (the name of a .desktop file, without directories)")
    return name + ".desktop"


def _ids_in(applications: Path) -> Iterator[tuple[str, Path]]:
    """(id, path) of every entry under one applications directory: subdirectories join the id with '-'."""
    if not applications.is_dir():
        return
    for root, dirs, files in os.walk(applications):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".desktop"):
                rel = os.path.relpath(os.path.join(root, name), applications)
                yield rel.replace(os.sep, "-"), Path(root) / name


def _find_in(applications: Path, wanted: str) -> Path | None:
    direct = applications / wanted
    if direct.is_file():
        return direct
    return next((p for i, p in _ids_in(applications) if i == wanted), None)


def _read_entry(path: Path) -> tuple[bytes, DesktopEntry]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DesktopError(f"{path}: cannot be read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DesktopError(f"{path}: not UTF-8, which desktop entries must be") from None
    return data, DesktopEntry(text, str(path))


def _is_wrapper(path: Path) -> bool:
    try:
        return desktop.wrap_info(_read_entry(path)[1]) is not None
    except DesktopError:
        return False


def find_original(sc: Scope, wanted: str) -> Path | None:
    """The entry a wrap of `wanted` starts from: one moved aside by an earlier wrap, else the first of that id
    along the data directories that nsfw did not write."""
    moved = _find_in(sc.originals, wanted)
    if moved is not None:
        return moved
    for data in sc.search:
        path = _find_in(data / "applications", wanted)
        if path is None or _is_wrapper(path):
            continue  # a wrap (ours, or the admin's system-wide one) is never the original
        return path
    return None


@dataclass(frozen=True)
class Wrapped:
    id: str
    path: Path
    original: Path
    profile: str | None
    notes: tuple[str, ...] = ()


def wrap(sc: Scope, app: str, profile: str | None, launcher: str | None = None) -> Wrapped:
    """Write (or renew) the wrapped copy of one entry."""
    wanted = desktop_id(app)
    launcher = launcher or default_launcher()
    if not os.access(launcher, os.X_OK):
        raise DesktopError(f"nsfw's launcher {launcher} is missing or not executable (install nsfw: `make install`)")
    target = sc.applications / wanted
    original = find_original(sc, wanted)
    if original is None:
        where = ", ".join(str(d / "applications") for d in sc.search)
        raise DesktopError(f"no desktop entry {wanted} in {where} (see the ids with `ls` there)")
    if target.exists() and target != original and not _is_wrapper(target):
        # not on the search path (a custom $XDG_DATA_DIRS without /usr/local/share), yet where the copy goes
        raise DesktopError(f"{target} exists and nsfw did not write it: move it away first, then wrap again")
    data, _ = _read_entry(original)
    # A file of the caller's own stands where the copy goes: it is kept, moved aside, for unwrap to put back.
    moved = sc.originals / original.relative_to(sc.applications) if sc.applications in original.parents else None
    if moved is not None and moved.exists():
        raise DesktopError(f"{original} would be moved aside to {moved}, where a file already is: "
                           "move one of them away yourself, then wrap again")
    text = desktop.wrap(data.decode("utf-8"), source=str(moved or original), digest=desktop.sha256(data),
                        launcher=launcher, profile=profile)
    notes = []
    if moved is not None:
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.replace(original, moved)
        notes.append(f"your own {original} was moved to {moved} (unwrap puts it back)")
        original = moved
    _write(target, text)
    notes += _shadow_notes(sc, original)
    return Wrapped(wanted, target, original, profile, tuple(notes))


def _shadow_notes(sc: Scope, original: Path) -> list[str]:
    if sc.name != "system":
        return []
    ahead = [d for d in sc.search[:_index_of(sc.search, SYSTEM_DATA_DIR)] if d in original.parents]
    if ahead:
        return [f"{original} is in {ahead[0]}, which comes before {SYSTEM_DATA_DIR} in $XDG_DATA_DIRS: the "
                "system-wide copy does not shadow it; wrap it per user instead (without --system)"]
    return []


def _index_of(dirs: tuple[Path, ...], d: Path) -> int:
    return dirs.index(d) if d in dirs else len(dirs)


def _write(target: Path, text: str) -> None:
    """Atomically, so a menu never reads half an entry; 0644 like every other entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nsfw-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unwrap(sc: Scope, app: str) -> list[str]:
    """Remove the wrapped copy; put back an original that the wrap had moved aside. What was done, as lines."""
    wanted = desktop_id(app)
    target = sc.applications / wanted
    if not target.is_file():
        raise DesktopError(f"{wanted} is not wrapped in {sc.applications}")
    _, entry = _read_entry(target)
    info = desktop.wrap_info(entry)
    if info is None:
        raise DesktopError(f"{target} was not written by nsfw: not touching it")
    target.unlink()
    done = [f"removed {target}"]
    moved = Path(info.original)
    if sc.originals in moved.parents and moved.is_file():
        back = sc.applications / moved.relative_to(sc.originals)
        if back.exists():
            done.append(f"kept {moved}: {back} exists meanwhile")
        else:
            back.parent.mkdir(parents=True, exist_ok=True)
            os.replace(moved, back)
            done.append(f"put {back} back")
    return done


@dataclass(frozen=True)
class Status:
    id: str
    path: Path
    profile: str | None
    original: str
    state: str  # "unchanged", "changed" (the original changed since the wrap), "gone" (the original was removed)
    launcher: str | None  # the launcher its Exec calls


def wrapped(sc: Scope) -> list[Status]:
    """Every entry nsfw wrote in this scope."""
    out: list[Status] = []
    if not sc.applications.is_dir():
        return out
    for path in sorted(sc.applications.glob("*.desktop")):
        try:
            _, entry = _read_entry(path)
        except DesktopError:
            continue
        info = desktop.wrap_info(entry)
        if info is None:
            continue
        try:
            current = desktop.sha256(Path(info.original).read_bytes())
            state = "unchanged" if current == info.sha256 else "changed"
        except FileNotFoundError:
            state = "gone"
        except OSError:
            state = "unreadable"
        out.append(Status(path.name, path, info.profile, info.original, state, _launcher_of(entry)))
    return out


def _launcher_of(entry: DesktopEntry) -> str | None:
    try:
        args = desktop.split_exec(desktop.unescape(entry.get(desktop.MAIN_GROUP, "Exec") or ""))
    except DesktopError:
        return None
    return args[0].text if args else None


def sync(sc: Scope, launcher: str | None = None) -> list[str]:
    """Re-wrap entries whose original changed (or whose launcher moved); drop those whose original is gone."""
    launcher = launcher or default_launcher()
    done = []
    for st in wrapped(sc):
        name = st.id[:-len(".desktop")]
        if st.state == "gone":
            st.path.unlink()
            done.append(f"{name}: removed, its original {st.original} is gone")
        elif st.state == "changed" or st.launcher != launcher:
            try:
                data, _ = _read_entry(Path(st.original))
                text = desktop.wrap(data.decode("utf-8"), source=st.original, digest=desktop.sha256(data),
                                    launcher=launcher, profile=st.profile)
                _write(st.path, text)
            except (DesktopError, OSError) as e:
                done.append(f"{name}: left as it was, could not wrap it again: {e}")
                continue
            why = "its original changed" if st.state == "changed" else f"the launcher is now {launcher}"
            done.append(f"{name}: wrapped again, {why}")
    return done


def group_note(user: str, groups: list[int]) -> str | None:
    """Why launching a wrapped entry would ask for a password, when it would."""
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return f"there is no group {GROUP!r}: wrapped entries can start only once nsfw is installed (`make install`)"
    if gid not in groups:
        return (f"{user} is not in group {GROUP!r} yet, so wrapped entries cannot start: an admin runs "
                f"`adduser {user} {GROUP}`, then log out and in again")
    return None
