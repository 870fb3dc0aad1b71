"""The only place that talks to libnftables. Rulesets arrive as JSON data and go in as one transaction.

A libnftables context talks to the network namespace its calling thread is in when it first sends, so callers
that load a sandbox's table enter that namespace first (netns.entered) and create the context inside.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from itertools import pairwise
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


# Plain interval sets with more elements than this have them spelt here, exactly as `nft list` would, instead of
# loaded into the kernel and listed back: that round trip cost `nsfw rules` most of a second for a 100,000-line
# blocklist. Smaller sets, and everything else, still come from nft itself.
PYTHON_ELEMENTS = 1000
_ADDR_TYPES = {"ipv4_addr": (socket.AF_INET, 32), "ipv6_addr": (socket.AF_INET6, 128)}
_SET_KEYS = {"family", "table", "name", "type", "flags", "elem"}
# nft's line breaks in a set's elements (src/expression.c, calculate_delim): two IPv4 addresses a line, one IPv6
_WRAP = ",\n\t\t\t     "


def _elem_span(elem: Any, family: int, bits: int) -> tuple[int, int]:
    pton, value = socket.inet_pton, int.from_bytes
    if isinstance(elem, str):
        lo = value(pton(family, elem), "big")
        return lo, lo
    if set(elem) == {"prefix"} and set(elem["prefix"]) == {"addr", "len"}:
        lo, length = value(pton(family, elem["prefix"]["addr"]), "big"), elem["prefix"]["len"]
        host = (1 << (bits - length)) - 1 if type(length) is int and 0 <= length <= bits else -1
        if host < 0 or lo & host:
            raise ValueError("not a network")
        return lo, lo | host
    if set(elem) == {"range"} and len(elem["range"]) == 2:
        lo, hi = (value(pton(family, a), "big") for a in elem["range"])
        if lo > hi:
            raise ValueError("an empty range")
        return lo, hi
    raise ValueError("not an address, prefix or range")


def format_elements(elems: list[Any], type_name: str) -> str | None:
    """The `elements = { ... }` line(s) that `nft list` prints for a plain interval set of addresses holding
    `elems` (as libnftables JSON spells them), or None where that cannot be told without the kernel: elements
    that overlap or touch (the kernel refuses or joins them), or that are not addresses, prefixes or ranges."""
    if type_name not in _ADDR_TYPES:
        return None
    family, bits = _ADDR_TYPES[type_name]
    try:
        spans = sorted(_elem_span(e, family, bits) for e in elems)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not spans or any(a[1] + 1 >= b[0] for a, b in pairwise(spans)):
        return None
    # as nft lists an interval set: sorted, each interval as an address, a prefix if it is one, else a range
    ntop, width = socket.inet_ntop, bits // 8
    parts: list[str] = []
    append = parts.append
    for lo, hi in spans:
        size = hi - lo + 1
        first = ntop(family, lo.to_bytes(width, "big"))
        if size & (size - 1) or lo & (size - 1):
            append(f"{first}-{ntop(family, hi.to_bytes(width, 'big'))}")
        elif size == 1:
            append(first)
        else:
            append(f"{first}/{bits + 1 - size.bit_length()}")
    if family == socket.AF_INET:
        body = _WRAP.join(", ".join(parts[i:i + 2]) for i in range(0, len(parts), 2))
    else:
        body = _WRAP.join(parts)
    return f"\t\telements = {{ {body} }}\n"


def _python_sets(cmds: list[dict[str, Any]], above: int) -> dict[tuple[str, str, str], str]:
    """(family, table, set) -> its elements as nft lists them, for the plain address sets larger than `above`
    that format_elements can spell exactly; none at all when some command adds elements on its own."""
    if any(isinstance(obj, dict) and "element" in obj for c in cmds for obj in c.values()):
        return {}
    out: dict[tuple[str, str, str], str] = {}
    for cmd in cmds:
        spec = cmd.get("add", {}).get("set")
        if (isinstance(spec, dict) and set(spec) == _SET_KEYS and spec["flags"] == ["interval"]
                and isinstance(spec["elem"], list) and len(spec["elem"]) > above
                and isinstance(spec["type"], str)):
            text = format_elements(spec["elem"], spec["type"])
            if text is not None:
                out[spec["family"], spec["table"], spec["name"]] = text
    return out


def _splice(listing: str, family: str, table: str, name: str, elements: str) -> str | None:
    """`listing` with `elements` put into the (empty) set's block, where nft prints them: last."""
    start = listing.find(f"table {family} {table} {{\n")
    if start < 0:
        return None
    end_of_table = listing.find("\n}\n", start)
    head = listing.find(f"\n\tset {name} {{\n", start)
    if head < 0 or head > end_of_table:
        return None
    close = listing.find("\n\t}\n", head + 1)
    if close < 0 or close > end_of_table or "elements = " in listing[head:close]:
        return None
    return listing[:close + 1] + elements + listing[close + 1:]


def render(cmds: list[dict[str, Any]], python_above: int = PYTHON_ELEMENTS) -> str:
    """`cmds` in nft's own syntax, as nft itself prints it after loading it into a throwaway network namespace
    (so what `nsfw rules` shows is what the kernel would hold, and is known to load). The elements of plain
    address sets larger than `python_above` are spelt by format_elements instead, as nft would list them
    (tests/integration/test_compile_kernel.py holds the two equal), and the kernel gets those sets empty."""
    big = _python_sets(cmds, python_above)
    if not big:
        return _kernel_render(cmds)
    bare = []
    for cmd in cmds:
        spec = cmd.get("add", {}).get("set")
        if isinstance(spec, dict) and (spec.get("family"), spec.get("table"), spec.get("name")) in big:
            cmd = {"add": {"set": {k: v for k, v in spec.items() if k != "elem"}}}
        bare.append(cmd)
    listing: str | None = _kernel_render(bare)
    for (family, table, name), elements in big.items():
        listing = _splice(listing, family, table, name, elements) if listing is not None else None
    return listing if listing is not None else _kernel_render(cmds)


def _kernel_render(cmds: list[dict[str, Any]]) -> str:
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


# nf_tables' netlink messages, for named_counters (<linux/netfilter/nf_tables.h>, <linux/netlink.h>)
_NETLINK_NETFILTER = 12
_NFT_MSG_GETOBJ = (10 << 8) | 19  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETOBJ
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NFTA_OBJ_TABLE, _NFTA_OBJ_NAME, _NFTA_OBJ_TYPE, _NFTA_OBJ_DATA = 1, 2, 3, 4
_NFTA_COUNTER_BYTES, _NFTA_COUNTER_PACKETS = 1, 2
_NFT_OBJECT_COUNTER = 1
_FAMILIES = {"inet": 1, "ip": 2, "ip6": 10}


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, i)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[i + 4:i + length]  # less NLA_F_NESTED and NLA_F_NET_BYTEORDER
        i += (length + 3) & ~3
    return out


def named_counters(table: str, family: str = "inet") -> dict[str, dict[str, int]]:
    """{name: {"packets": N, "bytes": N}} for the named counters of `table` in the current namespace.

    One netlink dump of the table's counter objects. libnftables' `list counters` first fetches the whole
    ruleset of the namespace (chains, rules, sets and their elements): 0.5-0.9 ms a sandbox, most of `nsfw ps`
    with a hundred of them. Empty when the table or the namespace cannot be read."""
    request = struct.pack("=BBH", _FAMILIES[family], 0, 0) + _attr(_NFTA_OBJ_TABLE, table.encode() + b"\0") + \
        _attr(_NFTA_OBJ_TYPE, struct.pack(">I", _NFT_OBJECT_COUNTER))
    out: dict[str, dict[str, int]] = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER) as sock:
            sock.send(struct.pack("=IHHII", 16 + len(request), _NFT_MSG_GETOBJ, _NLM_F_REQUEST | _NLM_F_DUMP, 1,
                                  0) + request)
            while True:
                data, i = sock.recv(65536), 0
                while i + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, i)
                    if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                        return out
                    attrs = _attrs(data[i + 20:i + length])  # past the header and nfgenmsg
                    body = _attrs(attrs.get(_NFTA_OBJ_DATA, b""))
                    name = attrs.get(_NFTA_OBJ_NAME, b"").rstrip(b"\0").decode(errors="replace")
                    if name and _NFTA_COUNTER_PACKETS in body and _NFTA_COUNTER_BYTES in body:
                        out[name] = {"packets": int.from_bytes(body[_NFTA_COUNTER_PACKETS], "big"),
                                     "bytes": int.from_bytes(body[_NFTA_COUNTER_BYTES], "big")}
                    i += (length + 3) & ~3
                if not data:
                    return out
    except OSError:
        return {}
