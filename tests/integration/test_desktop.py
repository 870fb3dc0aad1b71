"""`nsfw desktop` end to end, in the simulated world: a member of group nsfw starts wrapped menu entries through
the launcher and the sudoers drop-in, with no password, as themselves, in their sandbox, with their session; and
nothing of what they control (options, profiles, paths, environment) gets them root or root's reading rights.

Set-up, all undone at the end whatever happens: a root-owned copy of nsfw laid out as `make install` lays it
out (so the throwaway user can run the launcher from it, and sudo trusts it), the group `nsfw` with the test
user in it, and the repo's sudoers drop-in naming that copy, checked with visudo. Every command runs on the
world's simulated host; sudo resolves the host name from /etc/hosts and sends nothing anywhere.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nsfw import desktop

from .sandbox import PY, ROOT, baseline, settle, snapshot_diff

__all__ = ["baseline", "snapshot_diff"]  # fixtures, used by name
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="integration tests build namespaces: run as root")

GROUP = "nsfw"
SUDOERS = Path("/etc/sudoers.d/zz-nsfw-desktop-test")  # our own name: never the real drop-in (/etc/sudoers.d/nsfw)
ARTIFACTS = ROOT / "tests" / "artifacts"
TOOL_PATH = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=TOOL_PATH) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make test-deps installs it)")


# ---------------------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Install:
    root: Path  # a data root every user can read: the installed copy, the user's dirs, the apps
    nsfw: str  # LIBDIR/bin/nsfw: what sudoers allows
    launcher: str
    gid: int  # of group nsfw


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _world_readable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        mode = 0o755 if p.is_dir() or os.access(p, os.X_OK) else 0o644
        os.chmod(p, mode)


@pytest.fixture(scope="module")
def install(test_user: Any) -> Iterator[Install]:
    _need("sudo", "visudo", "setpriv")
    root = Path(tempfile.mkdtemp(prefix="nsfw-desktop-test-", dir="/tmp"))
    made_group = False
    try:
        lib = root / "lib" / "nsfw"
        for name in ("nsfw", "bin", "desktop-wrappers", "profiles"):
            _copy_tree(ROOT / name, lib / name)
        _world_readable(root)
        nsfw = str(lib / "bin" / "nsfw")
        try:
            gid = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
            made_group = True
            gid = grp.getgrnam(GROUP).gr_gid
        subprocess.run(["gpasswd", "-a", test_user.name, GROUP], check=True, capture_output=True)
        rendered = root / "sudoers"
        rendered.write_text((ROOT / "desktop-wrappers" / "nsfw.sudoers").read_text().replace("@NSFW@", nsfw))
        check = subprocess.run(["visudo", "-cf", str(rendered)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        shutil.copy(rendered, SUDOERS)
        os.chmod(SUDOERS, 0o440)
        home = root / "home"
        for d in ("data", "runtime", "apps"):
            (home / d).mkdir(parents=True)
        os.chmod(home / "runtime", 0o700)
        for p in [home, *home.rglob("*")]:
            os.chown(p, test_user.uid, test_user.gid)
        yield Install(root, nsfw, str(lib / "desktop-wrappers" / "nsfw-launch"), gid)
    finally:
        SUDOERS.unlink(missing_ok=True)
        subprocess.run(["gpasswd", "-d", test_user.name, GROUP], capture_output=True, check=False)
        if made_group:
            subprocess.run(["groupdel", GROUP], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _session_env(inst: Install, user: Any, **extra: str) -> dict[str, str]:
    """What a graphical session gives an app launched from its menu."""
    home = inst.root / "home"
    return {
        "PATH": f"{home / 'apps'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": user.home, "USER": user.name, "LOGNAME": user.name, "SHELL": "/bin/sh",
        "XDG_DATA_HOME": str(home / "data"), "XDG_DATA_DIRS": str(home / "system"),
        "XDG_RUNTIME_DIR": str(home / "runtime"),
        "DISPLAY": ":97", "XAUTHORITY": f"{user.home}/.Xauthority", "WAYLAND_DISPLAY": "wayland-0",
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={home / 'runtime'}/bus",
        "PULSE_SERVER": f"unix:{home / 'runtime'}/pulse/native",
        "LANG": "de_DE.UTF-8", "LC_TIME": "en_GB.UTF-8", "XDG_CURRENT_DESKTOP": "GNOME",
        "MY_SESSION_VAR": "a b \"c\" $d",
        **extra,
    }


def _user_cmd(user: Any, argv: list[str], env: dict[str, str]) -> list[str]:
    """argv as the user, with the user's groups (nsfw included), as a session would start it. The environment
    is set only once the ids are the user's (`env -i`): no root process of the harness ever sees it."""
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--",
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def _as_user(world: Any, user: Any, argv: list[str], env: dict[str, str], **kw: Any) -> Any:
    return world.run(_user_cmd(user, argv, env), env={"PATH": TOOL_PATH}, **kw)


def _as_user_popen(world: Any, user: Any, argv: list[str], env: dict[str, str], **kw: Any) -> Any:
    return world.popen(_user_cmd(user, argv, env), env={"PATH": TOOL_PATH}, **kw)


def _write_entry(inst: Install, user: Any, name: str, text: str) -> None:
    system = inst.root / "home" / "system" / "applications"
    system.mkdir(parents=True, exist_ok=True)
    (system / name).write_text(text)
    _world_readable(inst.root / "home" / "system")


def _wrap(world: Any, inst: Install, user: Any, app: str, *args: str) -> desktop.DesktopEntry:
    """`nsfw desktop wrap` run by the user, without sudo; the wrapped entry it wrote."""
    env = _session_env(inst, user)
    done = _as_user(world, user, [inst.nsfw, "desktop", "wrap", app, *args], env)
    assert done.returncode == 0, done.stderr
    path = Path(env["XDG_DATA_HOME"]) / "applications" / f"{app}.desktop"
    assert path.stat().st_uid == user.uid
    return desktop.DesktopEntry(path.read_text(), str(path))


def _exec_argv(entry: desktop.DesktopEntry, group: str = desktop.MAIN_GROUP, **launch: Any) -> list[str]:
    """What a desktop environment runs for the entry: its Exec line, field codes expanded."""
    args = desktop.split_exec(desktop.unescape(entry.get(group, "Exec") or ""))
    return desktop.expand(args, desktop.Launch(**launch))


REPORT = r"""
import json, os, socket, sys
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print(json.dumps({
    "argv": sys.argv[1:],
    "uid": [int(x) for x in status["Uid"].split()], "gid": [int(x) for x in status["Gid"].split()],
    "groups": sorted(int(x) for x in status["Groups"].split()),
    "caps": [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
    "nnp": status["NoNewPrivs"].strip(),
    "netns": os.readlink("/proc/self/ns/net"),
    "links": sorted(name for _, name in socket.if_nameindex()),
    "env": dict(os.environ),
}))
"""


@pytest.fixture(scope="module")
def report_app(install: Install) -> Path:
    d = install.root / "home" / "apps" / "my app"
    d.mkdir(parents=True)
    script = d / "report.py"
    script.write_text(REPORT)
    _world_readable(install.root / "home" / "apps")
    return script


def _host_netns(world: Any) -> str:
    return str(world.run(["readlink", "/proc/self/ns/net"]).stdout.strip())


# ---------------------------------------------------------------------------------------------- the launch


def test_wrapped_entry_starts_the_app_in_its_sandbox_as_the_member(world: Any, install: Install,
                                                                   test_user: Any, report_app: Path) -> None:
    quoted = str(report_app).replace("\\", "\\\\\\\\").replace('"', '\\\\"')
    _write_entry(install, test_user, "org.example.Report.desktop", f"""\
[Desktop Entry]
Type=Application
Name=Report
Name[de]=Bericht
Exec={PY} -I "{quoted}" --title "a \\\\"quoted\\\\" title" --cost="\\\\$5" %U
TryExec={PY}
DBusActivatable=true
Actions=second;

[Desktop Action second]
Name=Second
Exec={PY} -I "{quoted}" --second %f
""")
    entry = _wrap(world, install, test_user, "org.example.Report", "--profile", "offline")
    assert entry.get(desktop.MAIN_GROUP, "DBusActivatable") == "false"
    assert entry.get(desktop.MAIN_GROUP, "Name", "de") == "Bericht"
    urls = ("https://example.org/a b", "--profile=/etc/shadow")  # what a user may open: still just arguments
    argv = _exec_argv(entry, urls=urls)
    assert argv[:4] == [install.launcher, "--profile", "offline", "--"]
    env = _session_env(install, test_user)
    done = _as_user(world, test_user, argv, env, timeout=60)
    settle(world)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["argv"] == ["--title", 'a "quoted" title', "--cost=$5", *urls]
    assert out["uid"] == [test_user.uid] * 4 and out["gid"] == [test_user.gid] * 4
    assert out["groups"] == sorted({*test_user.groups, install.gid})
    assert all(int(c, 16) == 0 for c in out["caps"]) and out["nnp"] == "1"
    assert out["links"] == ["lo"] and out["netns"] != _host_netns(world)  # `offline`: its own namespace
    session_keys = ("DISPLAY", "XAUTHORITY", "WAYLAND_DISPLAY", "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS",
                    "PULSE_SERVER", "LANG", "LC_TIME", "XDG_CURRENT_DESKTOP", "MY_SESSION_VAR", "HOME", "PATH")
    assert {k: out["env"].get(k) for k in session_keys} == {k: env[k] for k in session_keys}
    assert not {k for k in out["env"] if k.startswith("SUDO_")}  # the session's environment, not sudo's
    assert "no X server answers" in done.stderr  # DISPLAY=:97 exists nowhere: said, not fatal
    # the FIFO that carried the environment is gone
    assert os.listdir(env["XDG_RUNTIME_DIR"]) == []

    action = _exec_argv(entry, "Desktop Action second", files=("/tmp/x y.txt",))
    done = _as_user(world, test_user, action, env, timeout=60)
    settle(world)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["argv"] == ["--second", "/tmp/x y.txt"]


def test_launch_from_inside_a_sandbox_stays_in_it(world: Any, install: Install, test_user: Any,
                                                 report_app: Path) -> None:
    # a sandboxed app opening a wrapped entry (a link clicked in a mail client): sudo cannot work under
    # no_new_privs, so the command starts in the caller's sandbox, under the caller's (stricter) rules
    _write_entry(install, test_user, "inner.desktop",
                 f"[Desktop Entry]\nType=Application\nName=I\nExec={PY} -I \"{report_app}\" inner %u\n")
    entry = _wrap(world, install, test_user, "inner", "--profile", "default")
    argv = _exec_argv(entry, urls=("https://example.org/",))
    outer = ["sudo", "-n", install.nsfw, "run", "-p", "offline", "--", "sh", "-c",
             'readlink /proc/self/ns/net; exec "$@"', "sh", *argv]
    done = _as_user(world, test_user, outer, _session_env(install, test_user), timeout=60)
    settle(world)
    assert done.returncode == 0, done.stderr
    netns, report = done.stdout.split("\n", 1)
    out = json.loads(report)
    assert out["netns"] == netns and out["links"] == ["lo"] and out["uid"][0] == test_user.uid
    assert out["argv"] == ["inner", "https://example.org/"]
    assert "started from inside a sandbox" in done.stderr


def test_launch_failure_is_reported_and_nothing_runs(world: Any, install: Install, test_user: Any,
                                                     report_app: Path) -> None:
    _write_entry(install, test_user, "broken.desktop",
                 f"[Desktop Entry]\nType=Application\nName=B\nExec={PY} -I {report_app}\n")
    entry = _wrap(world, install, test_user, "broken", "--profile", "no-such-profile")
    done = _as_user(world, test_user, _exec_argv(entry), _session_env(install, test_user))
    assert done.returncode == 125 and "no-such-profile" in done.stderr and done.stdout == ""


def test_single_instance_warning(world: Any, install: Install, test_user: Any) -> None:
    apps = install.root / "home" / "apps"
    shutil.copy("/bin/sleep", apps / "fakeapp")
    _world_readable(apps)
    _write_entry(install, test_user, "fakeapp.desktop", "[Desktop Entry]\nType=Application\nName=F\nExec=fakeapp 0\n")
    entry = _wrap(world, install, test_user, "fakeapp", "--profile", "offline")
    env = _session_env(install, test_user)
    outside = _as_user_popen(world, test_user, ["fakeapp", "60"], env)
    try:
        for _ in range(100):
            if world.run(["pgrep", "-u", str(test_user.uid), "-x", "fakeapp"]).returncode == 0:
                break
            time.sleep(0.05)
        done = _as_user(world, test_user, _exec_argv(entry), env)
        settle(world)
        assert done.returncode == 0, done.stderr
        assert "fakeapp already runs outside nsfw as you" in done.stderr
        assert "Quit fakeapp first" in done.stderr
    finally:
        outside.kill()
        outside.wait()
    done = _as_user(world, test_user, _exec_argv(entry), env)
    settle(world)
    assert done.returncode == 0 and "already runs outside" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- privileges


def _sudo(world: Any, user: Any, *argv: str, env: dict[str, str] | None = None) -> Any:
    return _as_user(world, user, ["sudo", "-n", *argv], env or {"PATH": TOOL_PATH, "HOME": user.home})


def test_member_may_run_nsfw_run_and_nothing_else(world: Any, install: Install, test_user: Any) -> None:
    done = _sudo(world, test_user, install.nsfw, "run", "-p", "offline", "--", "id", "-u")
    settle(world)
    assert done.returncode == 0 and done.stdout.strip() == str(test_user.uid), done.stderr
    refused = [
        [install.nsfw, "demo"],
        [install.nsfw, "gc"],
        [install.nsfw, "--version", "run"],
        ["/usr/bin/id", "-u"],
        [PY, install.nsfw, "run", "--", "id"],
        ["-u", "nobody", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["-g", "root", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["-E", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["--preserve-env=PYTHONPATH", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["--preserve-env=DISPLAY", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["LD_PRELOAD=/nonexistent/evil.so", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["NSFW_TEST_FAIL_AT=record", install.nsfw, "run", "-p", "offline", "--", "id"],
        ["-s"],
        ["-i"],
    ]
    env = {"PATH": TOOL_PATH, "HOME": test_user.home, "PYTHONPATH": "/tmp", "DISPLAY": ":0"}
    for argv in refused:
        done = _sudo(world, test_user, *argv, env=env)
        assert done.returncode != 0 and "uid=0" not in done.stdout and done.stdout.strip() != "0", (argv, done)
        assert "sudo:" in done.stderr, (argv, done.stderr)


def test_command_cannot_regain_root(world: Any, install: Install, test_user: Any) -> None:
    tries = ("sudo -n id -u; su -c 'id -u' root </dev/null; "
             f"{PY} -c 'import os; os.setuid(0)'; "
             f"{PY} -c 'import os; print(\"euid\", os.geteuid())'")
    done = _sudo(world, test_user, install.nsfw, "run", "-p", "offline", "--", "sh", "-c", tries)
    settle(world)
    assert f"euid {test_user.uid}" in done.stdout, done.stdout + done.stderr
    assert "0" not in done.stdout.replace(f"euid {test_user.uid}", "").split(), done.stdout
    assert "no new privileges" in done.stderr or "effective uid is not 0" in done.stderr, done.stderr
    assert "PermissionError" in done.stderr


def test_files_the_member_cannot_read_stay_unread(world: Any, install: Install, test_user: Any) -> None:
    secret_dir = install.root / "secret"
    secret_dir.mkdir()
    secret = secret_dir / "environment"
    secret.write_bytes(b"SECRET=top-secret-value\0")
    profile = secret_dir / "secret.yaml"
    profile.write_text("# top-secret-value\nnetwork: none\n")
    for p in (secret, profile):
        os.chmod(p, 0o600)  # root's
    link = install.root / "home" / "runtime" / "link"
    link.symlink_to(secret)
    try:
        offline = ["--profile=offline"]
        for opts in ([*offline, f"--environment={secret}"], [*offline, f"--environment={link}"],
                     [*offline, "--environment=/etc/shadow"], [*offline, "--environment=/proc/1/environ"],
                     [f"--profile={profile}"], ["--profile=/etc/shadow"]):
            done = _sudo(world, test_user, install.nsfw, "run", *opts, "--", "env")
            assert done.returncode == 125, (opts, done.stdout, done.stderr)
            assert "cannot be read by you" in done.stderr or "Permission denied" in done.stderr, done.stderr
            assert "top-secret" not in done.stdout + done.stderr and "root:" not in done.stdout + done.stderr
        # root itself may read its own files: the refusal above is the user's permissions, not a blanket one
        done = world.run([install.nsfw, "run", f"--environment={secret}", "-p", "offline", "--", "env"])
        settle(world)
        assert done.returncode == 0 and "SECRET=top-secret-value" in done.stdout, done.stderr
    finally:
        link.unlink()
        shutil.rmtree(secret_dir)


EVIL_SO = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    FILE *f = fopen("@MARK@", "a");
    if (f) { fprintf(f, "%d\n", (int)geteuid()); fclose(f); }
}
"""


def test_environment_variables_reach_no_root_process(world: Any, install: Install, test_user: Any) -> None:
    evil = install.root / "evil"
    (evil / "profiles").mkdir(parents=True)
    marks = evil / "marks"
    marks.mkdir()
    for name in ("sitecustomize.py", "yaml.py", "click.py"):
        (evil / name).write_text(f"import os\nopen('{marks}/py-' + str(os.geteuid()), 'w').close()\n")
    (evil / "profiles" / "offline.yaml").write_text("network: nat\ndefault: allow\n")  # a look-alike
    preload = "/nonexistent/evil.so"
    cc = shutil.which("cc")
    if cc is not None:
        (evil / "evil.c").write_text(EVIL_SO.replace("@MARK@", f"{marks}/so"))
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(evil / "evil.so"), str(evil / "evil.c")], check=True)
        preload = str(evil / "evil.so")
    _world_readable(evil)
    os.chmod(marks, 0o777)
    (marks / "so").touch(mode=0o666)
    os.chmod(marks / "so", 0o666)  # whoever loads the library can say so, root or the user
    hostile = {"PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "yaml.py"), "PYTHONHOME": str(evil),
               "PYTHONUSERBASE": str(evil), "LD_PRELOAD": preload, "LD_LIBRARY_PATH": str(evil),
               "NSFW_TEST_FAIL_AT": "record", "NSFW_TEST_KILL_AT": "netns", "NSFW_PROFILE_PATH": str(evil / "profiles"),
               "XDG_CONFIG_HOME": str(evil), "SUDO_UID": "0", "PKEXEC_UID": "0"}
    try:
        count_links = f"{PY} -I -c 'import socket; print(len(socket.if_nameindex()))'"
        # 1. in the caller's environment, through sudo: dropped by env_reset
        env = {"PATH": TOOL_PATH, "HOME": test_user.home, **hostile}
        done = _as_user(world, test_user, ["sudo", "-n", install.nsfw, "run", "-p", "offline", "--", "sh", "-c",
                                           f"id -u; {count_links}"], env)
        settle(world)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(test_user.uid), "1"]  # as the user; the shipped `offline`: only lo
        # 2. in the --environment file: they reach COMMAND, which runs as the user anyway, and nothing else
        env_file = install.root / "home" / "runtime" / "env"
        env_file.write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in {**hostile, "PATH": TOOL_PATH}.items()))
        os.chown(env_file, test_user.uid, test_user.gid)
        os.chmod(env_file, 0o600)
        done = _sudo(world, test_user, install.nsfw, "run", f"--environment={env_file}", "-p", "offline", "--",
                     "sh", "-c", f"id -u; echo $PKEXEC_UID; {count_links}")
        settle(world)
        env_file.unlink()
        assert done.returncode == 0, done.stderr
        lines = done.stdout.split()
        assert lines[:2] == [str(test_user.uid), "0"] and lines[-1] == "1", done.stdout
        marked = sorted(os.listdir(marks))
        assert all(m in (f"py-{test_user.uid}", "so") for m in marked), marked
        if cc is not None:  # the library was loaded, and only ever by the user's own processes
            assert set((marks / "so").read_text().split()) == {str(test_user.uid)}
    finally:
        shutil.rmtree(evil)


def test_member_cannot_touch_another_users_sandbox(world: Any, install: Install, test_user: Any) -> None:
    # root runs a sandbox of the same profile: the member must neither join it nor change it
    other = world.popen([install.nsfw, "run", "-p", "offline", "--", "sh", "-c", "echo ready; exec sleep 60"],
                        env={"PATH": TOOL_PATH}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "ready"
        recs = [json.loads(c) for c in world.run(["sh", "-c", "cat /run/nsfw/sandboxes/*.json"]).stdout
                .replace("}\n{", "}\x00{").split("\x00") if c.strip()]
        (rec,) = recs
        sleep_pid = int(world.run(["pgrep", "-P", str(other.pid), "-x", "sleep"]).stdout.split()[0])
        their_ns = world.run(["readlink", f"/proc/{sleep_pid}/ns/net"]).stdout.strip()
        pids = " ".join(str(p) for p in (rec["supervisor_pid"], rec["keeper_pid"], sleep_pid) if p)
        attack = (f"readlink /proc/self/ns/net; kill -9 {pids}; "
                  f"nsenter --net=/run/netns/{rec['netns']} true; ip netns del {rec['netns']}; "
                  f"rm -f /run/nsfw/sandboxes/{rec['id']}.json; true")
        done = _sudo(world, test_user, install.nsfw, "run", "-p", "offline", "--", "sh", "-c", attack)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[0] != their_ns  # a sandbox of its own
        assert "Operation not permitted" in done.stderr
        assert world.run(["kill", "-0", str(sleep_pid)]).returncode == 0  # theirs still runs, untouched
        assert world.run(["ls", f"/run/netns/{rec['netns']}"]).returncode == 0
        assert world.run(["ls", f"/run/nsfw/sandboxes/{rec['id']}.json"]).returncode == 0
    finally:
        world.run(["kill", "-TERM", str(other.pid)])
        other.communicate(timeout=30)
        settle(world)


# ---------------------------------------------------------------------------------------------- X11


def _free_display() -> int:
    for n in range(90, 200):
        if not os.path.exists(f"/tmp/.X{n}-lock") and not os.path.exists(f"/tmp/.X11-unix/X{n}"):
            return n
    raise AssertionError("no free X display number")


@pytest.fixture
def xvfb(request: pytest.FixtureRequest, world: Any, install: Install, test_user: Any) -> Iterator[dict[str, str]]:
    """Xvfb on the world's host, with a cookie in the user's XAUTHORITY. Param: extra Xvfb arguments."""
    _need("Xvfb", "xauth", "xwininfo", "xwd", "xclock")
    extra: list[str] = getattr(request, "param", [])
    n = _free_display()
    auth = install.root / "home" / "runtime" / "Xauthority"
    subprocess.run(["xauth", "-f", str(auth), "add", f":{n}", ".", os.urandom(16).hex()], check=True,
                   capture_output=True)
    os.chown(auth, test_user.uid, test_user.gid)
    os.chmod(auth, 0o600)
    server = world.popen(["Xvfb", f":{n}", "-screen", "0", "480x360x24", "-nolisten", "tcp", "-auth", str(auth),
                          *extra], env={"PATH": TOOL_PATH}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env = {"DISPLAY": f":{n}", "XAUTHORITY": str(auth), "PATH": TOOL_PATH}
    try:
        for _ in range(100):
            if world.run(["xwininfo", "-root"], env=env).returncode == 0:
                break
            assert server.poll() is None, server.communicate()[1]
            time.sleep(0.1)
        else:
            raise AssertionError("Xvfb did not come up")
        yield env
    finally:
        server.terminate()
        server.communicate(timeout=20)
        auth.unlink(missing_ok=True)


def _xwd_to_png(data: bytes) -> tuple[bytes, set[tuple[int, int, int]]]:
    """A 24/32-bit TrueColor XWD screenshot as PNG, and the set of colours in it (to tell it from a blank)."""
    header = struct.unpack(">25I", data[:100])
    header_size, width, height = header[0], header[4], header[5]
    byte_order, bpp, bytes_per_line, ncolors = header[7], header[11], header[12], header[19]
    masks = header[14:17]
    if bpp not in (24, 32):
        raise AssertionError(f"unexpected XWD depth {bpp}")
    pixels = data[header_size + 12 * ncolors:]
    order = "little" if byte_order == 0 else "big"
    step = bpp // 8
    shifts = [(m & -m).bit_length() - 1 for m in masks]
    rows, colours = [], set()
    for y in range(height):
        line = pixels[y * bytes_per_line:y * bytes_per_line + width * step]
        row = bytearray()
        for x in range(width):
            v = int.from_bytes(line[x * step:(x + 1) * step], order)
            rgb = tuple((v & m) >> s for m, s in zip(masks, shifts, strict=True))
            colours.add(rgb)
            row += bytes(rgb)
        rows.append(b"\0" + bytes(row))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + chunk(b"IEND", b""))
    return png, colours


XCLOCK = ("[Desktop Entry]\nType=Application\nName=Clock\nName[de]=Uhr\nIcon=xclock\n"
          "Exec=xclock -geometry 220x220+40+40 -bg white -fg black -hd red -hl red -update 1\n")


def _xclock_window(world: Any, xenv: dict[str, str]) -> bool:
    return '"xclock"' in world.run(["xwininfo", "-root", "-tree"], env=xenv).stdout


def test_x11_app_from_a_wrapped_entry_opens_its_window(world: Any, install: Install, test_user: Any,
                                                       xvfb: dict[str, str]) -> None:
    _write_entry(install, test_user, "xclock.desktop", XCLOCK)
    entry = _wrap(world, install, test_user, "xclock", "--profile", "offline")
    env = _session_env(install, test_user, DISPLAY=xvfb["DISPLAY"], XAUTHORITY=xvfb["XAUTHORITY"])
    launch = _as_user_popen(world, test_user, _exec_argv(entry), env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if _xclock_window(world, xvfb):
                break
            assert launch.poll() is None, launch.communicate()
            time.sleep(0.1)
        else:
            raise AssertionError("no xclock window appeared")
        time.sleep(1.5)  # the first tick drawn
        # the client is the user's, in a sandbox: a network namespace of its own with only loopback
        pid = world.run(["pgrep", "-u", str(test_user.uid), "-x", "xclock"]).stdout.split()[0]
        assert world.run(["readlink", f"/proc/{pid}/ns/net"]).stdout.strip() != _host_netns(world)
        assert world.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-o", "link"]).stdout.count(": ") == 2
        shot = world.run(["xwd", "-root", "-silent"], env=xvfb, text=False)
        assert shot.returncode == 0, shot.stderr
        png, colours = _xwd_to_png(shot.stdout)
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "desktop-xvfb-xclock.png").write_bytes(png)
        assert (255, 255, 255) in colours and (0, 0, 0) in colours and len(colours) >= 3, sorted(colours)[:10]
    finally:
        launch.terminate()  # the launcher relays it through sudo and nsfw to xclock
        out, err = launch.communicate(timeout=30)
        settle(world)
    assert launch.returncode in (0, 143, 128 + 15), err
    assert not _xclock_window(world, xvfb)


@pytest.mark.parametrize("xvfb", [["-nolisten", "unix"]], indirect=True)
def test_display_reachable_only_through_an_abstract_socket_is_refused(world: Any, install: Install,
                                                                      test_user: Any, xvfb: dict[str, str]) -> None:
    n = xvfb["DISPLAY"][1:]
    assert not os.path.exists(f"/tmp/.X11-unix/X{n}")  # no socket file: only @/tmp/.X11-unix/XN on the host
    _write_entry(install, test_user, "xclock.desktop", XCLOCK)
    entry = _wrap(world, install, test_user, "xclock", "--profile", "offline")
    env = _session_env(install, test_user, DISPLAY=xvfb["DISPLAY"], XAUTHORITY=xvfb["XAUTHORITY"])
    done = _as_user(world, test_user, _exec_argv(entry), env, timeout=60)
    settle(world)
    assert done.returncode == 125, done.stderr
    assert f"reachable only through the abstract socket @/tmp/.X11-unix/X{n}" in done.stderr
    assert "-nolisten unix" in done.stderr
    assert not _xclock_window(world, xvfb)
    assert world.run(["pgrep", "-u", str(test_user.uid), "-x", "xclock"]).returncode == 1
    # and the same for `nsfw run` from a terminal, whose environment has the display
    done = world.run([install.nsfw, "run", "-p", "offline", "--", "xclock"], env=xvfb)
    settle(world)
    assert done.returncode == 125 and "abstract socket" in done.stderr, done.stderr
