"""The only place that talks to libnftables. Rulesets arrive as JSON data and go in as one transaction.

A libnftables context talks to the network namespace its calling thread is in when it first sends, so callers
that load a sandbox's table enter that namespace first (netns.entered) and create the context inside.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .caps import CLONE_NEWNET, CLONE_NEWUSER, unshare
from .errors import SetupError


def _ctx(json_out: bool = True) -> Any:
    import nftables  # imported here: `nsfw check` and friends never need it

    nft = nftables.Nftables()
    nft.set_json_output(json_out)
    nft.set_handle_output(False)
    return nft


def apply(cmds: list[dict[str, Any]], what: str = "ruleset") -> None:
    """Load `cmds` in one transaction: all of it or none of it."""
    rc, _out, err = _ctx().json_cmd({"nftables": cmds})
    if rc != 0:
        raise SetupError(f"the kernel refused the {what}: {err.strip() or 'no reason given'} "
                         "(run `nsfw doctor`; is nf_tables available?)")


def delete_table(name: str, family: str = "inet") -> bool:
    """Remove a table by name. Absent already counts as done; never raises. True when something was removed."""
    try:
        rc, _out, _err = _ctx().json_cmd({"nftables": [{"delete": {"table": {"family": family, "name": name}}}]})
    except Exception:
        return False
    return bool(rc == 0)


def delete_tables(names: list[str], family: str = "inet") -> bool:
    """Remove many tables in one transaction (each costs the kernel a grace period otherwise)."""
    cmds = [{"delete": {"table": {"family": family, "name": n}}} for n in names]
    try:
        rc, _out, _err = _ctx().json_cmd({"nftables": cmds})
    except Exception:
        return False
    if rc != 0:  # one of them vanished meanwhile: fall back to one by one
        return any([delete_table(n, family) for n in names])
    return True


def tables(family: str = "inet") -> list[str]:
    rc, out, _err = _ctx().cmd(f"list tables {family}")
    if rc != 0 or not out:
        return []
    return [item["table"]["name"] for item in json.loads(out)["nftables"] if "table" in item]


def ruleset() -> list[dict[str, Any]]:
    """The current namespace's ruleset as JSON objects, without the metainfo header."""
    rc, out, err = _ctx().cmd("list ruleset")
    if rc != 0:
        raise SetupError(f"cannot read the ruleset: {err.strip()}")
    return [item for item in json.loads(out or '{"nftables": []}')["nftables"] if "metainfo" not in item]


def render(cmds: list[dict[str, Any]]) -> str:
    """`cmds` in nft's own syntax, as nft itself prints it after loading it into a throwaway network namespace
    (so what `nsfw rules` shows is exactly what the kernel would hold, and is known to load)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read)
            unshare(CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET)
            nft = _ctx(json_out=False)
            rc, _o, err = nft.json_cmd({"nftables": cmds})
            if rc == 0:
                rc, text, err = nft.cmd("list ruleset")
            os.write(write, (text if rc == 0 else "\0" + err).encode())
            code = 0
        except BaseException as e:
            os.write(write, f"\0{e}".encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    if data.startswith("\0") or not data:
        raise SetupError(f"cannot render the ruleset: {data[1:].strip() or 'no output'} "
                         "(use --json, or run as root where user namespaces are disabled)")
    return data


def named_counters(table: str, family: str = "inet") -> dict[str, dict[str, int]]:
    """{name: {"packets": N, "bytes": N}} for the named counters of `table` in the current namespace."""
    rc, out, _err = _ctx().cmd(f"list counters table {family} {table}")
    if rc != 0 or not out:
        return {}
    return {item["counter"]["name"]: {"packets": item["counter"]["packets"], "bytes": item["counter"]["bytes"]}
            for item in json.loads(out)["nftables"] if "counter" in item}
