"""Instance ids, kernel object names and the address pool. Pure: callers pass in what the kernel said.

Kernel objects are named from a random instance id, never from profile text, so a profile cannot choose or
collide with the name of something it does not own.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PREFIX = "nsfw"  # every netns, link and host table nsfw creates starts with this
SANDBOX_IF = "eth0"  # the sandbox's end of the veth, inside its namespace
POOL4 = ipaddress.IPv4Network("10.213.0.0/16")
POOL6 = ipaddress.IPv6Network("fd6e:7366:7700::/48")  # a ULA: "nsfw" in hex
SLOT4_PREFIX = 30
SLOT6_PREFIX = 64


@dataclass(frozen=True)
class HostEnv:
    """What the host looked like at launch time."""

    addresses: tuple[IPAddress, ...] = ()  # every address of every host interface
    connected: tuple[IPNetwork, ...] = ()  # networks directly connected to the host
    routes: tuple[IPNetwork, ...] = ()  # every destination the host routes (default routes excluded)
    default6: bool = False  # the host has an IPv6 default route


@dataclass(frozen=True)
class Instance:
    id: str
    slot: int | None = None  # None for a `none` sandbox: it takes no addresses
    ipv6: bool = False
    pool4: ipaddress.IPv4Network = POOL4
    pool6: ipaddress.IPv6Network = POOL6

    @property
    def netns(self) -> str:
        return f"{PREFIX}-{self.id}"

    @property
    def veth(self) -> str:
        return f"{PREFIX}{self.id}"  # 12 characters, under IFNAMSIZ

    @property
    def table(self) -> str:
        return f"{PREFIX}-{self.id}"

    @property
    def gateway4(self) -> ipaddress.IPv4Interface:
        net = slot_net4(self._slot(), self.pool4)
        return ipaddress.IPv4Interface(f"{net.network_address + 1}/{net.prefixlen}")

    @property
    def address4(self) -> ipaddress.IPv4Interface:
        net = slot_net4(self._slot(), self.pool4)
        return ipaddress.IPv4Interface(f"{net.network_address + 2}/{net.prefixlen}")

    @property
    def gateway6(self) -> ipaddress.IPv6Interface | None:
        if not self.ipv6:
            return None
        net = slot_net6(self._slot(), self.pool6)
        return ipaddress.IPv6Interface(f"{net.network_address + 1}/{net.prefixlen}")

    @property
    def address6(self) -> ipaddress.IPv6Interface | None:
        if not self.ipv6:
            return None
        net = slot_net6(self._slot(), self.pool6)
        return ipaddress.IPv6Interface(f"{net.network_address + 2}/{net.prefixlen}")

    def _slot(self) -> int:
        if self.slot is None:
            raise ValueError(f"sandbox {self.id} has no network slot")
        return self.slot


def new_id() -> str:
    return secrets.token_hex(4)


def slot_net4(slot: int, pool: ipaddress.IPv4Network = POOL4) -> ipaddress.IPv4Network:
    size = 1 << (32 - SLOT4_PREFIX)
    return ipaddress.IPv4Network((int(pool.network_address) + slot * size, SLOT4_PREFIX))


def slot_net6(slot: int, pool: ipaddress.IPv6Network = POOL6) -> ipaddress.IPv6Network:
    size = 1 << (128 - SLOT6_PREFIX)
    return ipaddress.IPv6Network((int(pool.network_address) + slot * size, SLOT6_PREFIX))


def slots(pool: ipaddress.IPv4Network = POOL4) -> int:
    return 1 << (SLOT4_PREFIX - pool.prefixlen)


def allocate_slot(used: Iterable[int], routes: Iterable[IPNetwork], pool: ipaddress.IPv4Network = POOL4,
                  pool6: ipaddress.IPv6Network = POOL6, taken: Iterable[IPNetwork] = ()) -> int | None:
    """The lowest slot that no sandbox holds and whose subnets overlap nothing the host routes, nor any address
    a running sandbox recorded (whatever pool it came from)."""
    busy = set(used)
    avoid = [r for r in (*routes, *taken) if r.prefixlen > 0]
    for slot in range(min(slots(pool), 1 << (SLOT6_PREFIX - pool6.prefixlen))):
        if slot in busy:
            continue
        n4, n6 = slot_net4(slot, pool), slot_net6(slot, pool6)
        if not any(n4.overlaps(r) if r.version == 4 else n6.overlaps(r) for r in avoid):
            return slot
    return None
