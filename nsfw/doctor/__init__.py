"""`nsfw doctor`: what this machine needs for nsfw and what gets in its way, each with the fix.

Every check returns a `Check`; `main` prints one line per check, the fix under each that is not ok, and exits 0
only when no check failed (warnings do not fail). Nothing here changes the machine: kernel features are tried in
a forked child that first moves into a throwaway network namespace (as `nft.render` does), and everything else
is read from /proc, /run and the kernel's ruleset.

The firewall part is also what `nsfw run` calls at launch (`launch_blockers()`): see `firewall`.

  (here)      run_checks(), the report, main()
  check       Check, what a check returns
  ruleset     the packets a sandbox sends and receives; a ruleset indexed from nft JSON or iptables -S text
  evaluation  how a base chain ends for one packet: evaluate()
  firewall    findings, with each firewall's fix; forward_blockers(), launch_blockers()
  kernel      namespaces, veth and nf_tables tried for real; versions
  resolver    what the sandboxes' resolver will ask; port 53
  host        root, the firewall checks, forwarding, rp_filter, IPv6, leftovers, config

Every public name of these modules can be imported from `nsfw.doctor` itself, and is imported only when asked
for: `nsfw run`'s `from nsfw.doctor import launch_blockers` loads `firewall` and what it needs, never the
checks. Importing the package is cheap for the same reason: pyroute2, libnftables and the compiler are imported
by the checks that use them.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (as nsfw.resolver): type checkers take it as True
if TYPE_CHECKING:
    from collections.abc import Sequence

    # What `__getattr__` below serves at run time, for type checkers
    from .check import *  # noqa: F403
    from .check import Check
    from .evaluation import *  # noqa: F403
    from .firewall import *  # noqa: F403
    from .host import *  # noqa: F403
    from .kernel import *  # noqa: F403
    from .resolver import *  # noqa: F403
    from .ruleset import *  # noqa: F403

# firewall first: what `nsfw run` asks for is found there, and loading it loads ruleset and evaluation anyway.
# No module may be named like a name it serves: importing it would set the package's attribute to the module.
_MODULES = ("firewall", "ruleset", "evaluation", "check", "host", "kernel", "resolver")


def __getattr__(name: str) -> object:
    """A public name of the modules above, imported the first time it is asked for."""
    if not name.startswith("_"):
        for module in _MODULES:
            # __import__, not importlib.import_module: `python3 -X importtime` shows (and times) only the former
            __import__(f"{__name__}.{module}")
            found = sys.modules[f"{__name__}.{module}"]
            if name in found.__all__:
                value = getattr(found, name)
                globals()[name] = value  # the next lookup is an ordinary one
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_checks() -> list[Check]:
    from .check import ROOT_ONLY, Check, _guard
    from .host import (
        _firewall_checks,
        _forwarding,
        _ipv6,
        _leftovers,
        _rp_filter,
        check_root,
        config_check,
    )
    from .kernel import kernel_checks, probe_kernel, version_checks
    from .resolver import _port53, _resolver

    root = os.geteuid() == 0
    checks = [check_root()]
    checks += _guard("kernel", lambda: kernel_checks(probe_kernel()))
    checks += _guard("versions", version_checks)
    checks += _guard("forwarding", lambda: [_forwarding()])
    if root:
        checks += _guard("firewall", _firewall_checks)
    else:
        checks += [Check(n, "warn", "not checked: reading the ruleset needs root", "sudo nsfw doctor")
                   for n in ROOT_ONLY[:2]]
    checks += _guard("rp_filter", lambda: [_rp_filter()])
    checks += _guard("ipv6", lambda: [_ipv6()])
    checks += _guard("resolver", lambda: [_resolver(), _port53()])
    checks += _guard("leftovers", lambda: [_leftovers(root)])
    checks += _guard("config", lambda: [config_check()])
    return checks


MARK = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


def render(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks) if checks else 0
    lines = []
    for c in checks:
        lines.append(f"{MARK[c.status]:<5} {c.name:<{width}}  {c.detail}")
        if c.status != "ok" and c.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        lines.append(f"\n{failed} problem(s) stop nsfw here" + (f"; {warned} warning(s)" if warned else "") + ".")
    else:
        lines.append("\nnsfw can run here" + (f" ({warned} warning(s))" if warned else "") + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    checks = run_checks()
    sys.stdout.write(render(checks))
    sys.stdout.flush()
    return 1 if any(c.status == "fail" for c in checks) else 0
