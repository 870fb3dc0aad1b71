"""/etc/nsfw/nsfw.yaml: the machine's settings, validated like profiles (file, key, line, fix). Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from . import profile as profiles
from .errors import ProfileError, ProfileErrors
from .names import POOL4, POOL6, SLOT4_PREFIX, SLOT6_PREFIX

PATH = Path("/etc/nsfw/nsfw.yaml")
KEYS = ("pool",)
POOL_KEYS = ("ipv4", "ipv6")


@dataclass(frozen=True)
class Config:
    pool4: ipaddress.IPv4Network = POOL4
    pool6: ipaddress.IPv6Network = POOL6


def parse(text: str, file: str = str(PATH)) -> Config:
    data, errors = profiles.parse_mapping(text.encode(), file)
    if data is None:
        raise ProfileErrors(errors)
    pool4, pool6 = POOL4, POOL6
    for key in data:
        if key not in KEYS:
            errors.append(ProfileError(file, str(key), f"unknown key '{key}'", profiles.suggest(str(key), KEYS)))
    pool = data.get("pool", {}) or {}
    if not isinstance(pool, dict):
        errors.append(ProfileError(file, "pool", "must be a mapping", "write pool: {ipv4: 10.213.0.0/16}"))
        pool = {}
    for key, value in pool.items():
        if key not in POOL_KEYS:
            errors.append(ProfileError(file, f"pool.{key}", f"unknown key '{key}'",
                                       profiles.suggest(str(key), POOL_KEYS)))
            continue
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError:
            errors.append(ProfileError(file, f"pool.{key}", f"'{value}' is not a network",
                                       "write a CIDR with no host bits, e.g. 10.213.0.0/16"))
            continue
        if key == "ipv4":
            if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > SLOT4_PREFIX - 2:
                errors.append(ProfileError(file, "pool.ipv4", f"'{value}' is not an IPv4 network of /28 or wider",
                                           f"each sandbox takes a /{SLOT4_PREFIX}: give e.g. 10.213.0.0/16"))
                continue
            pool4 = net
        else:
            if not isinstance(net, ipaddress.IPv6Network) or net.prefixlen > SLOT6_PREFIX - 2:
                errors.append(ProfileError(file, "pool.ipv6", f"'{value}' is not an IPv6 network of /62 or wider",
                                           f"each sandbox takes a /{SLOT6_PREFIX}: give e.g. fd00:1234:5678::/48"))
                continue
            pool6 = net
    if errors:
        raise ProfileErrors(errors)
    return Config(pool4, pool6)


def load(path: Path = PATH) -> Config:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ProfileErrors([ProfileError(str(path), "", f"cannot be read: {e.strerror}",
                                          "check its permissions")]) from e
    return parse(text, str(path))
