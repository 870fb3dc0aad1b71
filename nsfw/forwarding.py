"""Host forwarding for `nat` sandboxes: turned on when one needs it, after recording what it was, and put
back as nsfw found it when the last sandbox is gone."""

from __future__ import annotations

import os

from . import compile as rules
from . import netns, nft, state
from .errors import NsfwError


def enable(ipv6: bool) -> None:
    """Turn on forwarding for the sandboxes, remembering first what it was, so the last sandbox can put it back.
    Where nsfw had to turn it on, a guard table keeps the host from forwarding anything else."""
    with state.locked():
        saved = state.load_forwarding() or {}
        before = dict(saved)
        if "ipv4" not in saved:
            saved["ipv4"] = netns.read_sysctl("net.ipv4.ip_forward") or "0"
        if ipv6 and "ipv6" not in saved:
            saved["ipv6"] = netns.read_sysctl("net.ipv6.conf.all.forwarding") or "0"
            # forwarding=1 makes the kernel ignore router advertisements where accept_ra=1; 2 keeps them
            saved["accept_ra"] = [i for i in _interfaces() if netns.read_sysctl(f"net.ipv6.conf.{i}.accept_ra") == "1"]
        if saved != before:
            state.save_forwarding(saved)
        netns.write_sysctl("net.ipv4.ip_forward", "1")
        if ipv6:
            for iface in saved.get("accept_ra", []):
                netns.write_sysctl(f"net.ipv6.conf.{iface}.accept_ra", "2")
            netns.write_sysctl("net.ipv6.conf.all.forwarding", "1")
        families = [f for f, key in (("ipv4", "ipv4"), ("ipv6", "ipv6")) if saved.get(key) == "0"]
        if families:
            nft.apply(rules.guard_ruleset(families), "forwarding guard")


def _interfaces() -> list[str]:
    try:
        return sorted(i for i in os.listdir("/proc/sys/net/ipv6/conf") if i not in ("all", "default"))
    except FileNotFoundError:
        return []


def restore() -> None:
    """With no sandbox left, put forwarding back as nsfw found it. Caller holds the lock. Never raises."""
    saved = state.load_forwarding()
    if saved is None:
        return
    try:
        if "ipv6" in saved:
            netns.write_sysctl("net.ipv6.conf.all.forwarding", saved["ipv6"])
            for iface in saved.get("accept_ra", []):
                if netns.read_sysctl(f"net.ipv6.conf.{iface}.accept_ra") is not None:
                    netns.write_sysctl(f"net.ipv6.conf.{iface}.accept_ra", "1")
        netns.write_sysctl("net.ipv4.ip_forward", saved["ipv4"])
    except NsfwError:
        return
    nft.delete_table(rules.GUARD_TABLE)
    state.drop_forwarding()
