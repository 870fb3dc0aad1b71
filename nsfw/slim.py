"""The entry point that a sandbox's long-lived nsfw processes exec into, to shed what the launch imported.

A sandbox keeps three nsfw processes for as long as it runs: the supervisor, the keeper and the resolver.
Forked from a process that loaded pyroute2, click, yaml and the rest, each holds about 24 MiB that is not
shared for long (reference counting writes to every object a process touches, which un-shares its page).
The same pid, children and fds in a fresh interpreter that imports only what the job needs costs a fraction
of that. So, once a launch is done with them:

- the supervisor, COMMAND having run for waiter.GRACE, becomes `slim.py waiter` (nsfw/waiter.py): built-in
  modules only; it goes on relaying signals to COMMAND, hands the sandbox to the keeper and exits with
  COMMAND's status;
- the keeper, GRACE after it said "ready", becomes `slim.py keeper` (nsfw/slimkeeper.py): it goes on
  granting names (nftables loaded on the first grant), watching the supervisor, lingering and killing, and
  imports the full nsfw only to remove the sandbox at the end;
- the resolver, once bound and unprivileged, becomes `slim.py resolver` (nsfw/resolver/entry.py): the
  resolver package alone.

    python3 -IS HOME/nsfw/slim.py KIND ARG...

-I: as bin/nsfw, no environment variable or user directory can slip code into the process; the package's
directory goes on sys.path here instead. Only built-in modules are imported before the job's own module.
"""

import sys


def main() -> None:
    home = __file__.rsplit("/", 2)[0]  # HOME/nsfw/slim.py; the caller passes an absolute path
    sys.path.insert(0, home)
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind == "waiter":
        from nsfw import waiter

        waiter.main(sys.argv[2:])
    elif kind == "keeper":
        from nsfw import slimkeeper

        slimkeeper.main(sys.argv[2:])
    elif kind == "resolver":
        from nsfw.resolver import entry

        entry.main(sys.argv[2:])
    raise SystemExit(f"nsfw/slim.py: unknown kind {kind!r}")


if __name__ == "__main__":
    main()
