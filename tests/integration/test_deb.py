"""The Debian package, end to end: `make deb`, `dpkg -i`, `apt-get -f install`, then nsfw from the installed files
only (`nsfw demo` in its simulated world, `nsfw check` of a shipped profile by name), then `dpkg -P`, after which
nothing of the package is left: its files, the group its postinst made, the systemd state of its timer.

This installs a package on the machine, so it guards it: it skips when an nsfw package is already known to dpkg,
when anything the package would install is already there (a `make install`'s /etc/sudoers.d/nsfw, /etc/nsfw), or
when apt has work pending of its own; apt never downloads anything (--no-download), and the package is purged
whatever happens. `nsfw demo` builds its own world of namespaces: the machine's own network is only read, to
check that it is as it was.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nsfw import __version__

ROOT = Path(__file__).resolve().parents[2]
DEB = ROOT / "build" / f"nsfw_{__version__}_all.deb"
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# What the package installs that must not be there before (else dpkg would take over somebody's files)
OURS = ("/usr/bin/nsfw", "/usr/bin/nsfw-launch", "/usr/lib/nsfw", "/usr/share/nsfw", "/etc/nsfw",
        "/etc/sudoers.d/nsfw", *(f"/lib/systemd/system/{u.name}" for u in sorted((ROOT / "systemd").iterdir())),
        "/var/lib/nsfw", "/usr/share/doc/nsfw")
SYSTEMD_STATE = ("/etc/systemd/system", "/var/lib/systemd/deb-systemd-helper-enabled",
                 "/var/lib/systemd/deb-systemd-helper-masked")
DEPENDS = ("python3", "python3-click", "python3-yaml", "python3-pyroute2", "python3-nftables", "nftables",
           "iproute2", "util-linux", "procps", "sudo", "adduser")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a Debian package: run as root"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None,
                       reason="needs dpkg-deb and apt-get (a Debian system)"),
]


def _run(argv: list[str], *, cwd: str | Path = "/", timeout: float = 120, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env or {"PATH": TOOL_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"})
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def _dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, waiting out another package operation that holds its lock (up to two minutes)."""
    deadline = time.monotonic() + 120
    while True:
        done = _run(["dpkg", *args], check=False)
        if done.returncode == 0 or "lock" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def _state() -> str:
    """dpkg's status of the package ("ii ", "rc "...): "" when dpkg knows nothing of it."""
    done = _run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "nsfw"], check=False)
    return done.stdout if done.returncode == 0 else ""


def _on_disk() -> bool:
    """Whether anything of the package is on the machine: installed, half-installed, or its conffiles."""
    return _state()[1:2] not in ("", "n")


def _group() -> bool:
    try:
        grp.getgrnam("nsfw")
    except KeyError:
        return False
    return True


def _systemd_leftovers() -> list[str]:
    found = []
    for top in SYSTEMD_STATE:
        for dirpath, dirnames, filenames in os.walk(top):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if "nsfw" in n]
    return sorted(found)


def _network_facts() -> dict[str, str]:
    """The machine's own network, read only: what `nsfw demo` must leave as it was."""
    facts = {"netns": _run(["ip", "netns", "list"]).stdout, "links": _run(["ip", "-o", "link", "show"]).stdout,
             "routes": _run(["ip", "route", "show", "table", "all"]).stdout}
    if shutil.which("nft"):
        facts["tables"] = _run(["nft", "list", "tables"], check=False).stdout
    for key in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        with open(f"/proc/sys/{key}") as f:
            facts[key] = f.read()
    return facts


def _installed_env(home: Path) -> dict[str, str]:
    """An environment that could lead nowhere near the checkout: no PYTHON*, a home of its own."""
    return {"PATH": TOOL_PATH, "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}


@dataclass
class Installed:
    files: list[str]  # `dpkg -L nsfw`, as installed
    group_before: bool  # whether group nsfw existed before the package came
    home: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    if _on_disk():
        pytest.skip(f"an nsfw package is on this machine (dpkg: {_state().strip()}): not touching it")
    present = [p for p in OURS if os.path.lexists(p)]
    if present:
        pytest.skip(f"already on this machine (a `make install`?), and the package would take it over: "
                    f"{', '.join(present)}")
    missing = [p for p in DEPENDS if not _run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", p],
                                              check=False).stdout.startswith("ii")]
    if missing:
        pytest.skip(f"the package's dependencies {', '.join(missing)} are not installed, and this test downloads "
                    "nothing (make deps installs them)")
    pending = _run(["apt-get", "-f", "install", "-s", "--no-download"], check=False)
    if re.search(r"^(Inst|Remv|Conf) ", pending.stdout, re.M):
        pytest.skip("apt has work pending that is not ours (apt-get -f install -s shows it)")

    _run(["make", "deb"], cwd=ROOT)
    assert DEB.is_file(), f"make deb did not write {DEB}"
    group_before = _group()
    try:
        done = _dpkg("-i", str(DEB))
        # Any dependency dpkg found missing comes from apt, from what it already has: nothing is downloaded.
        fixed = _run(["apt-get", "-f", "install", "-y", "--no-download", "-o", "DPkg::Lock::Timeout=120"],
                     check=False, timeout=300)
        assert done.returncode == 0 or fixed.returncode == 0, done.stdout + done.stderr + fixed.stdout + fixed.stderr
        assert _state().startswith("ii"), f"nsfw is not installed after dpkg -i and apt-get -f install: {_state()!r}"
        files = _run(["dpkg", "-L", "nsfw"]).stdout.splitlines()
        yield Installed(files, group_before, tmp_path_factory.mktemp("home"))
    finally:
        if _on_disk():
            _dpkg("-P", "nsfw")


# ---------------------------------------------------------------------------------------------- the package


def test_package_metadata(installed: Installed) -> None:
    fields = _run(["dpkg-deb", "-f", str(DEB), "Package", "Version", "Architecture", "Depends"]).stdout
    assert f"Version: {__version__}\n" in fields and "Architecture: all\n" in fields
    depends = {d.split()[0] for d in re.search(r"^Depends: (.*)$", fields, re.M).group(1).split(", ")}  # type: ignore[union-attr]
    assert set(DEPENDS) <= depends, f"Depends lacks {set(DEPENDS) - depends}"


def test_installed_layout(installed: Installed) -> None:
    files = set(installed.files)
    for path in ("/usr/bin/nsfw", "/usr/bin/nsfw-launch", "/usr/lib/nsfw/bin/nsfw",
                 "/usr/lib/nsfw/desktop-wrappers/nsfw-launch", "/usr/lib/nsfw/nsfw/cli.py",
                 "/usr/lib/nsfw/nsfw/resolver/server.py", "/usr/share/nsfw/profiles/default.yaml",
                 "/etc/nsfw/nsfw.yaml", "/etc/nsfw/profiles", "/etc/sudoers.d/nsfw",
                 "/lib/systemd/system/nsfw-gc.service", "/lib/systemd/system/nsfw-gc.timer",
                 "/usr/share/man/man1/nsfw.1.gz", "/usr/share/man/man5/nsfw-profile.5.gz",
                 "/usr/share/bash-completion/completions/nsfw", "/usr/share/zsh/vendor-completions/_nsfw",
                 "/usr/share/fish/vendor_completions.d/nsfw.fish", "/usr/share/doc/nsfw/copyright"):
        assert path in files, f"the package does not install {path}"
        assert os.path.exists(path), f"{path} is listed but missing"
    assert not os.path.exists("/usr/lib/nsfw/profiles"), "profiles beside the package would shadow /usr/share"
    for path in files:
        assert not path.startswith(("/usr/local", "/home", "/root", str(ROOT))), f"the package installs {path}"
    for source in (ROOT / "systemd").iterdir():
        unit = Path("/lib/systemd/system", source.name)
        assert str(unit) in files, f"the package does not install {unit}"
        assert "/usr/local" not in unit.read_text(), f"{unit} names /usr/local"
    unit_text = Path("/lib/systemd/system/nsfw-gc.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/nsfw gc$", unit_text, re.M), unit_text
    sudoers = Path("/etc/sudoers.d/nsfw")
    assert sudoers.stat().st_mode & 0o777 == 0o440
    assert "/usr/bin/nsfw run *" in sudoers.read_text()
    _run(["visudo", "-cqf", str(sudoers)])
    conffiles = _run(["dpkg-query", "-W", "-f=${Conffiles}", "nsfw"]).stdout
    assert "/etc/nsfw/nsfw.yaml" in conffiles and "/etc/sudoers.d/nsfw" in conffiles


def test_postinst(installed: Installed) -> None:
    assert _group(), "postinst did not create group nsfw"
    assert Path("/usr/lib/nsfw/nsfw/__pycache__").is_dir(), "postinst did not byte-compile the modules"
    if shutil.which("deb-systemd-helper"):
        for wants in ("timers.target.wants/nsfw-gc.timer", "multi-user.target.wants/nsfw-warm.service"):
            assert Path("/etc/systemd/system", wants).is_symlink(), f"postinst did not enable {wants}"


# ---------------------------------------------------------------------------------------------- nsfw, installed


def test_version_from_installed_files(installed: Installed) -> None:
    done = _run(["/usr/bin/nsfw", "--version"], env=_installed_env(installed.home))
    assert done.stdout.strip() == f"nsfw, version {__version__}"


def test_shipped_profiles_come_from_usr_share(installed: Installed) -> None:
    """The search path ends in /usr/share/nsfw/profiles, and nothing of the checkout is on it."""
    done = _run(["/usr/bin/nsfw", "check", "no-such-profile-here"], env=_installed_env(installed.home),
                check=False)
    assert done.returncode == 1
    assert f"{installed.home}/.config/nsfw/profiles:/etc/nsfw/profiles:/usr/share/nsfw/profiles " in done.stderr, \
        done.stderr
    assert str(ROOT) not in done.stderr


def test_check_shipped_profile_by_name(installed: Installed) -> None:
    done = _run(["/usr/bin/nsfw", "check", "firefox", "offline"], env=_installed_env(installed.home))
    assert done.stdout.split("\n")[:2] == ["firefox: ok", "offline: ok"], done.stdout + done.stderr
    rules = _run(["/usr/bin/nsfw", "rules", "default"], env=_installed_env(installed.home))
    assert "table inet nsfw" in rules.stdout


def test_demo_from_installed_files(installed: Installed) -> None:
    before = _network_facts()
    done = _run(["/usr/bin/nsfw", "demo"], env=_installed_env(installed.home), timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for profile in ("default", "web", "lan-only", "offline"):
        assert re.search(rf"^{re.escape(profile)} +(reached|blocked|no)", done.stdout, re.M), done.stdout
    assert "reached" in done.stdout and "blocked" in done.stdout
    assert _network_facts() == before, "the demo changed the machine's own network"


def test_man_and_completion_installed(installed: Installed) -> None:
    env = {**_installed_env(installed.home), "MANPAGER": "cat", "MANWIDTH": "80"}
    assert _run(["man", "-w", "nsfw"], env=env).stdout.strip() == "/usr/share/man/man1/nsfw.1.gz"
    assert _run(["man", "-w", "5", "nsfw-profile"], env=env).stdout.strip() == "/usr/share/man/man5/nsfw-profile.5.gz"
    completion = _run(["/usr/bin/nsfw"], env={**_installed_env(installed.home), "_NSFW_COMPLETE": "bash_complete",
                                              "COMP_WORDS": "nsfw run -p fire", "COMP_CWORD": "3"})
    assert completion.stdout.split() == ["plain,firefox", "plain,firefox-esr"], completion.stdout + completion.stderr


# ---------------------------------------------------------------------------------------------- and gone again


def test_purge_leaves_nothing(installed: Installed) -> None:
    done = _dpkg("-P", "nsfw")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not _on_disk(), f"dpkg still has nsfw after purge: {_state()!r}"
    left = [p for p in installed.files if os.path.lexists(p) and not os.path.isdir(p)]
    assert not left, f"purge left files of the package: {left}"
    left = [p for p in (*OURS, "/usr/share/man/man1/nsfw.1.gz") if os.path.lexists(p)]
    assert not left, f"purge left {left}"
    assert _group() == installed.group_before, \
        "group nsfw " + ("was removed, though the package did not make it" if installed.group_before else
                         "made by postinst is still there")
    assert not _systemd_leftovers(), f"systemd state of nsfw's units left: {_systemd_leftovers()}"
