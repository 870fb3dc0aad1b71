"""The world's map: namespaces, links, addresses, ports, paths, the zone its DNS serves, probe exit codes.

What `world.py` documents in its help, as names the rest of the world and the tests use.
"""

from __future__ import annotations

from typing import Any

HOST, INET, LAN = "host", "inet", "lan"
UPLINK, LANLINK = "uplink0", "lan0"
HOST_UPLINK4, HOST_UPLINK6 = "198.18.0.2", "2001:db8:ff::2"
GATEWAY4, GATEWAY6 = "198.18.0.1", "2001:db8:ff::1"
HOST_LAN4, HOST_LAN6 = "10.77.0.1", "fd77::1"
LAN4, LAN6 = "10.77.0.10", "fd77::10"
RESOLVER = "192.0.2.53"

INET4_ADDRS: tuple[str, ...] = (
    "192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.53", "198.51.100.20", "203.0.113.30", "203.0.113.53",
)
INET6_ADDRS: tuple[str, ...] = ("2001:db8::10", "2001:db8::20", "2001:db8::53")
INET_ADDRS: tuple[str, ...] = INET4_ADDRS + INET6_ADDRS
LAN_ADDRS: tuple[str, ...] = (LAN4, LAN6)

TCP_PORTS: tuple[int, ...] = (22, 53, 80, 443, 853, 8080)
UDP_PORTS: tuple[int, ...] = (53, 123, 443, 9999)
HOST_TCP_PORTS: tuple[int, ...] = (631, 8631)
HOST_UDP_PORTS: tuple[int, ...] = (9999,)
DNS_PORT = 53

DEFAULT_TTL = 30
# Short, so that a cache in front of the world's DNS does not make a test wait for a negative answer to expire.
NEGATIVE_TTL = 5

RUN_DIR = "/run/world"
DNS_LOG = f"{RUN_DIR}/dns.log"
ZONE_FILE = f"{RUN_DIR}/zone.json"
PIDS_FILE = f"{RUN_DIR}/pids"
RESOLV_CONF = "/etc/resolv.conf"
NSFW_RUN_DIR = "/run/nsfw"

PYTHON = "/usr/bin/python3"
# Where the world looks for ip, nft, unshare and nsenter, whatever PATH it was given.
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_TIMEOUT_ENV = "NSFW_PROBE_TIMEOUT"
PROBE_KINDS = ("tcp", "udp", "dns", "query", "resolve", "tcpname")

# probe exit codes
REACHED, REFUSED, TIMEOUT, BLOCKED, OTHER, USAGE = 0, 1, 2, 3, 4, 64

Record = dict[str, Any]
Zone = dict[str, Record]

# A name maps to {"A": [...], "AAAA": [...], "ttl": N} or {"CNAME": "target", "ttl": N}; "*.x" is a wildcard.
DEFAULT_ZONE: Zone = {
    "allowed.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
    "other.test": {"A": ["198.51.100.20"], "AAAA": ["2001:db8::20"]},
    "cdn.test": {"A": ["203.0.113.30"]},
    "short.test": {"A": ["192.0.2.12"], "ttl": 2},
    "rebind.test": {"A": ["10.77.0.10"]},
    "multi.test": {"A": ["192.0.2.10", "198.51.100.20"]},
    "www.cname.test": {"CNAME": "other.test"},
    "chain.test": {"CNAME": "c1.chain.test"},
    "c1.chain.test": {"CNAME": "c2.chain.test"},
    "c2.chain.test": {"A": ["203.0.113.30"], "AAAA": ["2001:db8::20"]},
    "v6only.test": {"AAAA": ["2001:db8::20"]},
    "*.wild.test": {"A": ["192.0.2.11"]},
}


class WorldError(RuntimeError):
    """The world could not be built, or is no longer there."""
