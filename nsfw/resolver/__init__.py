"""The sandbox's policy resolver: one process per `nat` sandbox, on the host side, unprivileged.

It answers every DNS query the sandbox sends by name policy (`policy.Policy`), asks the host's upstream
resolvers (`upstream`), caches, and calls the supervisor's `grant` for every address it hands out before the
answer leaves (`server.serve`, `server.Grant`). The resolver process imports `nsfw.resolver.server` alone,
and that import is kept cheap: no `typing`, `re`, `json` or `dataclasses` at run time (about 4 ms of every
resolver's start, on top of the 5 ms that socket, selectors and ipaddress take).
"""

from __future__ import annotations

import collections

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers take it as True
if TYPE_CHECKING:
    from typing import NamedTuple as NamedTuple
else:
    class _NamedTupleMeta(type):
        """Run-time stand-in for `typing.NamedTuple`'s class syntax: the same class statement makes a
        `collections.namedtuple` (fields from the annotations, in order; defaults from the values; methods,
        properties and the docstring copied), while type checkers see the real `typing.NamedTuple`."""

        def __new__(mcs, name, bases, ns):  # type: ignore[no-untyped-def]
            if not bases:
                return super().__new__(mcs, name, bases, ns)
            fields = tuple(ns.get("__annotations__", {}))
            defaults = tuple(ns[f] for f in fields if f in ns)
            cls = collections.namedtuple(name, fields, defaults=defaults, module=ns["__module__"])
            for key, value in ns.items():
                if key not in fields and key not in ("__annotations__", "__module__", "__qualname__"):
                    setattr(cls, key, value)
            cls.__qualname__ = ns.get("__qualname__", name)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        pass
