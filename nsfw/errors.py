"""One exception hierarchy; the CLI catches NsfwError once and turns it into a message and an exit status."""

from __future__ import annotations


class NsfwError(Exception):
    """A failure the user can act on. str() is the whole message, fix included.

    exit_code None means "the command's own failure status" (125 for `nsfw run`, 1 elsewhere)."""

    exit_code: int | None = None


class ProfileError(NsfwError):
    """A profile that cannot be used: names the file, the key (or line) and what would fix it."""

    def __init__(self, file: str, key: str, problem: str, fix: str = "") -> None:
        self.file, self.key, self.problem, self.fix = file, key, problem, fix
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}" + (f" ({fix})" if fix else ""))


class ProfileErrors(NsfwError):
    """Every problem found in one or more profiles, reported together."""

    def __init__(self, errors: list[ProfileError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class SetupError(NsfwError):
    """The sandbox could not be built; nothing was started and everything built so far was removed."""


class PrivilegeError(NsfwError):
    """nsfw lacks a privilege it needs, or was asked for one it must not grant."""
