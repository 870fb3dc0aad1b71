"""bench/nfq: the userspace-firewall baseline for bench/datapath, built on the `netfilterqueue` package.

Run inside the namespace whose new TCP connections an iptables NFQUEUE rule hands to queue 0 (the SYN of each
connection, as OpenSnitch queues new connections only). For every packet it gives a verdict from Python:
  verdict   accept at once (the cost of the round trip through userspace alone)
  proc      first find the process that owns the connection, as OpenSnitch's /proc fallback does: the socket's
            inode from /proc/net/tcp (by the packet's source address and port), then the process holding that
            inode among /proc/*/fd, then its executable; then accept
Prints "ready" once bound, then runs until SECONDS pass (a bound) or it is killed; on exit prints a JSON line
{"packets": N, "found": N}.

usage: nfq.py verdict|proc SECONDS           (as root, with the bench venv's python: make bench builds it)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading


def _tcp_inode(src: str, sport: int) -> int | None:
    """The inode of the local TCP socket bound to src:sport, from /proc/net/tcp (this namespace's sockets)."""
    want = f"{struct.unpack('<I', socket.inet_aton(src))[0]:08X}:{sport:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want:
                return int(fields[9])
    return None


def _owner(inode: int) -> tuple[int, str] | None:
    """The first process with an fd on socket:[inode], and its executable."""
    target = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return int(entry), os.readlink(f"/proc/{entry}/exe")
            except OSError:
                continue
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("verdict", "proc"):
        print(__doc__, file=sys.stderr)
        return 64
    from netfilterqueue import NetfilterQueue

    lookup = argv[0] == "proc"
    counts = {"packets": 0, "found": 0}

    def on_packet(pkt: object) -> None:
        counts["packets"] += 1
        if lookup:
            data = pkt.get_payload()  # type: ignore[attr-defined]
            ihl = (data[0] & 0x0F) * 4
            src = socket.inet_ntoa(data[12:16])
            sport = struct.unpack("!H", data[ihl:ihl + 2])[0]
            inode = _tcp_inode(src, sport)
            if inode is not None and _owner(inode) is not None:
                counts["found"] += 1
        pkt.accept()  # type: ignore[attr-defined]

    nfq = NetfilterQueue()
    nfq.bind(0, on_packet, max_len=4096)
    stop = threading.Timer(float(argv[1]), lambda: os.kill(os.getpid(), signal.SIGTERM))
    stop.daemon = True
    stop.start()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print("ready", flush=True)
    try:
        nfq.run()
    except KeyboardInterrupt:
        pass
    finally:
        nfq.unbind()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
