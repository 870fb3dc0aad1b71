"""Where named network namespaces live, and entering one: the half of netns.py that needs no pyroute2, so that
`nsfw ps` and the keeper do not pay for importing it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .caps import CLONE_NEWNET, setns

NETNS_DIR = "/run/netns"


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the body inside namespace `name`: sockets created there stay bound to it after we return."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target, CLONE_NEWNET)
        try:
            yield
        finally:
            setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)
