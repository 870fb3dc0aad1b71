"""`nsfw desktop`: rewriting real-world .desktop files (tests/data/desktop/), finding and writing them along the
XDG directories, the launcher's argument handling, and the session checks of `nsfw run`. No root, no network."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nsfw import desktop, launcher, session
from nsfw import desktop_store as store
from nsfw.desktop import Arg, DesktopEntry, DesktopError, Launch

DATA = Path(__file__).resolve().parent.parent / "data" / "desktop"
FIXTURES = sorted(DATA.glob("*.desktop"))
LAUNCHER = "/usr/local/lib/nsfw/desktop-wrappers/nsfw-launch"
VALIDATE = shutil.which("desktop-file-validate")
SAMPLE = Launch(files=("/home/u/a b.html", "/home/u/c.txt"), urls=("https://example.org/?q=1&x=%41",),
                icon="app-icon", name="The App", location="/usr/share/applications/app.desktop")


def _wrap(path: Path, profile: str | None = "web") -> str:
    data = path.read_bytes()
    return desktop.wrap(data.decode(), source=str(path), digest=desktop.sha256(data), launcher=LAUNCHER,
                        profile=profile)


def _exec_groups(entry: DesktopEntry) -> list[str]:
    return [g for g in entry.groups() if (g == desktop.MAIN_GROUP or g.startswith(desktop.ACTION_PREFIX))
            and entry.get(g, "Exec") is not None]


# ---------------------------------------------------------------------------------------------- string values


@pytest.mark.parametrize(("raw", "value"), [
    (r"a\sb", "a b"), (r"a\nb", "a\nb"), (r"a\tb", "a\tb"), (r"a\rb", "a\rb"), (r"a\\b", "a\\b"),
    (r"a\\sb", "a\\sb"), (r"\;kept", r"\;kept"), ("trailing\\", "trailing\\"), (r"\\\\", "\\\\"),
])
def test_unescape(raw: str, value: str) -> None:
    assert desktop.unescape(raw) == value


def test_escape_round_trips() -> None:
    rng = random.Random(7)
    for _ in range(500):
        value = "".join(rng.choice("ab \\\n\t\r%\"$s") for _ in range(rng.randrange(12)))
        assert desktop.unescape(desktop.escape(value)) == value


# ---------------------------------------------------------------------------------------------- Exec


@pytest.mark.parametrize(("command", "args"), [
    ("app", ["app"]),
    ("  app   -x\t%U ", ["app", "-x", "%U"]),
    ('"/opt/My App/app" --a="b c"', ["/opt/My App/app", "--a=b c"]),
    (r'sh -c "echo \"hi\" \$HOME \`x\` \\"', ["sh", "-c", 'echo "hi" $HOME `x` \\']),
    ('""', [""]),
    ('a"b c"d', ["ab cd"]),
    (r'"keep \n backslash"', [r"keep \n backslash"]),
    ("flatpak run org.x.Y @@u %U @@", ["flatpak", "run", "org.x.Y", "@@u", "%U", "@@"]),
])
def test_split_exec(command: str, args: list[str]) -> None:
    assert [a.text for a in desktop.split_exec(command)] == args


def test_split_exec_marks_quoted_arguments() -> None:
    assert desktop.split_exec('a "%f" %f') == [Arg("a"), Arg("%f", quoted=True), Arg("%f")]


@pytest.mark.parametrize("command", ['app "open', 'app "a\\"'])
def test_split_exec_refuses_an_open_quote(command: str) -> None:
    with pytest.raises(DesktopError, match="never closed"):
        desktop.split_exec(command)


def test_quote_arg_round_trips() -> None:
    rng = random.Random(11)
    alphabet = "aZ09 \t\n\"'\\><~|&;$*?#()`%=-/."
    for _ in range(2000):
        args = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(8))) for _ in range(rng.randrange(1, 5))]
        line = desktop.join_exec(args)
        # a literal argument never expands: % is doubled, and expand() gives back exactly the text
        assert desktop.expand(desktop.split_exec(line), SAMPLE) == args, line


def test_expand_field_codes() -> None:
    args = desktop.split_exec("app %i --caption %c --desktop-file %k --ratio=100%% %F")
    assert desktop.expand(args, SAMPLE) == [
        "app", "--icon", "app-icon", "--caption", "The App", "--desktop-file", SAMPLE.location, "--ratio=100%",
        "/home/u/a b.html", "/home/u/c.txt"]
    assert desktop.expand(desktop.split_exec("app %u"), SAMPLE) == ["app", SAMPLE.urls[0]]
    assert desktop.expand(desktop.split_exec("app %U %d %D %n %N %v %m"), Launch()) == ["app"]
    assert desktop.expand(desktop.split_exec("app --file=%f"), Launch(files=("x",))) == ["app", "--file=x"]


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_parse_render_is_lossless(path: Path) -> None:
    text = path.read_text()
    assert DesktopEntry(text).render() == text


def test_parse_keeps_crlf_and_missing_final_newline() -> None:
    text = "[Desktop Entry]\r\nType=Application\r\nName=x\r\nExec=x"
    assert DesktopEntry(text).render() == text
    wrapped = desktop.wrap(text, source="/x.desktop", digest="0", launcher=LAUNCHER, profile=None)
    assert "\r\nExec=" + LAUNCHER + " -- x\r\n" in wrapped


@pytest.mark.parametrize(("text", "problem"), [
    ("Name=x\n[Desktop Entry]\n", "neither"),
    ("[Other]\nName=x\n[Desktop Entry]\n", "first group"),
    ("[Desktop Entry]\nthis is not a key\n", "neither"),
    ("[Desktop Entry]\nName=\x00\n", "NUL"),
])
def test_parse_errors(text: str, problem: str) -> None:
    with pytest.raises(DesktopError, match=problem):
        DesktopEntry(text, "t.desktop")


def test_localized_keys_are_told_apart() -> None:
    e = DesktopEntry((DATA / "firefox-esr.desktop").read_text())
    assert e.get("Desktop Entry", "Comment", "de") == "Im Internet surfen"
    assert e.get("Desktop Entry", "Comment", "sr@latin") == "Pregledajte veb"
    assert e.value("Desktop Entry", "Comment") == "Browse the World Wide Web"


# ---------------------------------------------------------------------------------------------- wrapping


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_exec_gets_the_launcher_and_keeps_the_original_intact(path: Path) -> None:
    original = DesktopEntry(path.read_text())
    wrapped = DesktopEntry(_wrap(path))
    prefix = [LAUNCHER, "--profile", "web", "--"]
    groups = _exec_groups(wrapped)
    assert desktop.MAIN_GROUP in groups
    for group in groups:
        before = desktop.split_exec(desktop.unescape(original.get(group, "Exec") or ""))
        after = desktop.split_exec(desktop.unescape(wrapped.get(group, "Exec") or ""))
        assert [a.text for a in after[:4]] == prefix
        assert after[4:] == before  # the same arguments, field codes and quoting
        assert desktop.original_args(wrapped, group) == before
        # what a desktop environment runs: the launcher, then exactly what the original would have run
        assert desktop.expand(after, SAMPLE) == prefix + desktop.expand(before, SAMPLE)
        # the raw text of the original's value follows the prefix verbatim
        assert (wrapped.get(group, "Exec") or "").endswith(" -- " + (original.get(group, "Exec") or ""))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_every_other_line_is_kept(path: Path) -> None:
    original = path.read_text().splitlines()
    wrapped = _wrap(path).splitlines()
    changed = ("Exec=", "DBusActivatable=", "Actions=")
    kept = [line for line in original if not line.startswith(changed)]
    rest = [line for line in wrapped if not line.startswith(changed) and not line.startswith("X-Nsfw-")]
    dropped = path.name == "org.gnome.Nautilus.desktop"  # its action without Exec goes (see below)
    if not dropped:
        assert rest[2:] == kept  # after nsfw's two comment lines, in the same order
    assert set(rest) >= set(kept) - {"[Desktop Action search]", "Name=Search Files", "Name[de]=Dateien suchen"}
    # the non-launched group of kde4-kviewer keeps its Exec as it was
    if path.name == "kde4-kviewer.desktop":
        assert "Exec=this group is not launched: left alone" in wrapped


@pytest.mark.skipif(VALIDATE is None, reason="desktop-file-validate is missing (make test-deps installs it)")
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
@pytest.mark.parametrize("profile", ["web", None, "/home/u/My Profiles/10% off.yaml"])
def test_result_passes_desktop_file_validate(path: Path, profile: str | None, tmp_path: Path) -> None:
    out = tmp_path / path.name
    out.write_text(_wrap(path, profile))
    done = subprocess.run([str(VALIDATE), str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in done.stdout


def test_profile_with_reserved_characters_is_quoted() -> None:
    wrapped = DesktopEntry(_wrap(DATA / "vlc.desktop", "/home/u/My Profiles/10% \"off\".yaml"))
    args = desktop.split_exec(desktop.unescape(wrapped.get(desktop.MAIN_GROUP, "Exec") or ""))
    assert desktop.expand(args, Launch())[:4] == [LAUNCHER, "--profile", '/home/u/My Profiles/10% "off".yaml', "--"]
    assert wrapped.value(desktop.MAIN_GROUP, desktop.KEY_PROFILE) == '/home/u/My Profiles/10% "off".yaml'


def test_dbus_activation_is_turned_off() -> None:
    wrapped = DesktopEntry(_wrap(DATA / "org.gnome.Calculator.desktop"))
    assert wrapped.get(desktop.MAIN_GROUP, "DBusActivatable") == "false"
    assert wrapped.get(desktop.MAIN_GROUP, "X-GNOME-UsesNotifications") == "true"


def test_an_action_that_only_dbus_could_start_is_dropped() -> None:
    wrapped = DesktopEntry(_wrap(DATA / "org.gnome.Nautilus.desktop"))
    assert "Desktop Action search" not in wrapped.groups()
    assert wrapped.get(desktop.MAIN_GROUP, "Actions") == "new-window;"
    assert "Desktop Action new-window" in wrapped.groups()


def test_tryexec_icon_translations_and_unknown_keys_are_kept() -> None:
    wrapped = DesktopEntry(_wrap(DATA / "vlc.desktop"))
    assert wrapped.get(desktop.MAIN_GROUP, "TryExec") == "/usr/bin/vlc"
    assert wrapped.get(desktop.MAIN_GROUP, "Icon") == "vlc"
    assert wrapped.get(desktop.MAIN_GROUP, "Name", "ja") == "VLCメディアプレイヤー"
    assert wrapped.get(desktop.MAIN_GROUP, "X-KDE-Protocols") == "ftp,http,https,mms,rtmp,rtsp,sftp,smb"


def test_the_wrap_is_recorded() -> None:
    path = DATA / "steam.desktop"
    info = desktop.wrap_info(DesktopEntry(_wrap(path)))
    assert info == desktop.WrapInfo(str(path), desktop.sha256(path.read_bytes()), "web")
    assert desktop.wrap_info(DesktopEntry(_wrap(path, None))) == desktop.WrapInfo(
        str(path), desktop.sha256(path.read_bytes()), None)
    assert desktop.wrap_info(DesktopEntry(path.read_text())) is None


def test_a_wrapped_entry_is_not_wrapped_again() -> None:
    with pytest.raises(DesktopError, match="already written by nsfw"):
        desktop.wrap(_wrap(DATA / "steam.desktop"), source="x", digest="0", launcher=LAUNCHER, profile=None)


@pytest.mark.parametrize(("text", "problem"), [
    ("[Desktop Entry]\nType=Link\nName=x\nURL=https://example.org\n", "not an application"),
    ("[Desktop Entry]\nType=Application\nName=x\nDBusActivatable=true\n", "D-Bus activation"),
    ("[Desktop Entry]\nType=Application\nName=x\n", "no Exec"),
    ("[Desktop Entry]\nType=Application\nName=x\nExec=\n", "empty Exec"),
    ("[Desktop Entry]\nType=Application\nName=x\nExec=app \"open\n", "never closed"),
    ("[Desktop Entry]\nType=Application\nName=x\nExec=app\nHidden=true\n", "Hidden"),
])
def test_entries_that_cannot_be_wrapped(text: str, problem: str) -> None:
    with pytest.raises(DesktopError, match=problem):
        desktop.wrap(text, source="t.desktop", digest="0", launcher=LAUNCHER, profile=None)


@pytest.mark.parametrize("profile", ["", "-x", "--environment=/etc/shadow", "a\nExec=evil"])
def test_profiles_that_could_be_misread_are_refused(profile: str) -> None:
    with pytest.raises(DesktopError, match="not a profile"):
        _wrap(DATA / "steam.desktop", profile)


def test_the_original_cannot_forge_the_record() -> None:
    text = ("[Desktop Entry]\nType=Application\nName=x\nExec=app\n[Desktop Action a]\nName=a\nExec=app -a\n"
            .replace("Name=x\n", "Name=x\nX-Nsfw-Profile-Extra=1\n"))
    wrapped = DesktopEntry(desktop.wrap(text, source="/o.desktop", digest="d", launcher=LAUNCHER, profile="p"))
    assert wrapped.get(desktop.MAIN_GROUP, "X-Nsfw-Profile-Extra") is None
    assert desktop.wrap_info(wrapped) == desktop.WrapInfo("/o.desktop", "d", "p")


HOSTILE_EXECS = [
    "--profile=/etc/shadow app",
    "--environment /root/.bashrc app",
    "-- app",
    "--new app",
    '"--profile" root app',
    "app -- --profile x",
    "sudo -u root app",
    'app "--environment=/etc/shadow"',
    "app %U --profile=x",
]


@pytest.mark.parametrize("command", HOSTILE_EXECS)
def test_nothing_in_the_original_becomes_an_option_of_nsfw(command: str) -> None:
    text = f"[Desktop Entry]\nType=Application\nName=x\nExec={command}\n"
    wrapped = DesktopEntry(desktop.wrap(text, source="/o.desktop", digest="d", launcher=LAUNCHER, profile="p"))
    argv = desktop.expand(desktop.split_exec(desktop.unescape(wrapped.get(desktop.MAIN_GROUP, "Exec") or "")),
                          Launch(urls=("--profile=/etc/shadow",)))
    original = desktop.expand(desktop.split_exec(command), Launch(urls=("--profile=/etc/shadow",)))
    assert argv[0] == LAUNCHER
    request = launcher.parse_args(argv[1:])
    assert request == launcher.Request("p", tuple(original))
    run = launcher.run_argv(request, "/usr/local/bin/nsfw", "/run/user/1000/env", root=False)
    assert run[:6] == [launcher.SUDO, "-n", "--", "/usr/local/bin/nsfw", "run", "--profile=p"]
    assert run[6:8] == ["--environment=/run/user/1000/env", "--"]
    assert run[8:] == original


# ---------------------------------------------------------------------------------------------- the launcher


@pytest.mark.parametrize(("args", "request_"), [
    (["--", "app", "-x"], launcher.Request(None, ("app", "-x"))),
    (["--profile", "web", "--", "app"], launcher.Request("web", ("app",))),
    (["--profile=-odd", "--", "--", "x"], launcher.Request("-odd", ("--", "x"))),
])
def test_launcher_parses_only_before_the_separator(args: list[str], request_: launcher.Request) -> None:
    assert launcher.parse_args(args) == request_


@pytest.mark.parametrize("args", [[], ["app"], ["--profile", "x"], ["--"], ["--bogus", "--", "app"]])
def test_launcher_usage_errors(args: list[str]) -> None:
    with pytest.raises(launcher.UsageError):
        launcher.parse_args(args)


def test_launcher_as_root_needs_no_sudo() -> None:
    argv = launcher.run_argv(launcher.Request(None, ("app",)), "/n", "/e", root=True)
    assert argv == ["/n", "run", "--environment=/e", "--", "app"]


def test_launcher_private_dir(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    d = launcher.private_dir({"XDG_RUNTIME_DIR": str(runtime)})
    assert Path(d).parent == runtime and (os.stat(d).st_mode & 0o777) == 0o700
    runtime.chmod(0o755)  # not private: not used
    assert Path(launcher.private_dir({"XDG_RUNTIME_DIR": str(runtime)})).parent != runtime


def test_launcher_fifo_serves_once_then_vanishes(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    fifo = launcher.EnvironmentFifo({"XDG_RUNTIME_DIR": str(runtime), "A": "1 2", "LANG": "de_DE.UTF-8"})
    assert (os.stat(fifo.path).st_mode & 0o777) == 0o600
    fifo.start()
    with open(fifo.path, "rb") as f:
        data = f.read()
    fifo.thread.join(5)
    assert session.parse_environment(data, "x") == {"XDG_RUNTIME_DIR": str(runtime), "A": "1 2",
                                                    "LANG": "de_DE.UTF-8"}
    assert not os.path.exists(fifo.dir)


def test_launcher_knows_when_it_is_inside_a_sandbox(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nNoNewPrivs:\t1\nSeccomp:\t0\n")
    assert launcher.inside_a_sandbox(str(status))
    status.write_text("Name:\tx\nNoNewPrivs:\t0\n")
    assert not launcher.inside_a_sandbox(str(status))
    assert not launcher.inside_a_sandbox(str(tmp_path / "missing"))


def test_launcher_collects_only_nsfw_and_sudo_lines() -> None:
    pending, notes = bytearray(), []  # type: ignore[var-annotated]
    launcher._own_lines(b"app: hello\nnsfw: warning: x\nsu", pending, notes)
    launcher._own_lines(b"do: a password is required\npartial", pending, notes)
    assert notes == ["nsfw: warning: x", "sudo: a password is required"]
    assert bytes(pending) == b"partial"


# ---------------------------------------------------------------------------------------------- the session


def test_environment_round_trip() -> None:
    env = {"A": "1", "EMPTY": "", "SPACES": " a b ", "NL": "x\ny", "EQ": "a=b", "BYTES": os.fsdecode(b"\xff\xfe")}
    assert session.parse_environment(session.encode_environment(env), "f") == env


@pytest.mark.parametrize("data", [b"NOEQUALS\0", b"=value\0", b"A=1\0" + b"B=" + b"x" * (1 << 18)])
def test_environment_parse_errors(data: bytes) -> None:
    with pytest.raises(session.SessionError, match="NAME=VALUE"):
        session.parse_environment(data, "f")


def test_unreadable_environment_names_the_file() -> None:
    def denied(path: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(session.SessionError, match="/root/x: cannot be read by you: Permission denied"):
        session.read_environment("/root/x", denied)


@pytest.mark.parametrize(("value", "kind", "number", "path"), [
    (":0", "local", 0, "/tmp/.X11-unix/X0"),
    (":1.0", "local", 1, "/tmp/.X11-unix/X1"),
    ("unix:12", "local", 12, "/tmp/.X11-unix/X12"),
    ("unix/:3", "local", 3, "/tmp/.X11-unix/X3"),
    ("localhost:10.0", "loopback", 10, None),
    ("127.0.0.1:10", "loopback", 10, None),
    ("[::1]:10", "loopback", 10, None),
    ("tcp/localhost:2", "loopback", 2, None),
    ("example.org:0", "remote", 0, None),
    ("/run/user/1000/xsock", "socket", None, "/run/user/1000/xsock"),
    ("/tmp/launch-x/org.xquartz:0", "socket", 0, "/tmp/launch-x/org.xquartz"),
])
def test_parse_display(value: str, kind: str, number: int | None, path: str | None) -> None:
    d = session.parse_display(value)
    assert d is not None and (d.kind, d.number, d.path) == (kind, number, path)


def test_parse_display_nonsense() -> None:
    assert session.parse_display("nonsense") is None


def test_display_abstract_only_is_refused() -> None:
    refusal, warnings = session.display_problem({"DISPLAY": ":5"}, connect=lambda p: False,
                                                abstract=lambda: {"/tmp/.X11-unix/X5"})
    assert refusal is not None and "only through the abstract socket @/tmp/.X11-unix/X5" in refusal
    assert "-nolisten unix" in refusal and not warnings


def test_display_through_its_socket_file_is_fine() -> None:
    seen = []
    refusal, warnings = session.display_problem({"DISPLAY": ":5"}, connect=lambda p: seen.append(p) or True,
                                                abstract=lambda: {"/tmp/.X11-unix/X5"})
    assert (refusal, warnings, seen) == (None, [], ["/tmp/.X11-unix/X5"])


def test_display_other_cases_only_warn() -> None:
    def never(path: str) -> bool:
        return False

    refusal, warnings = session.display_problem({"DISPLAY": ":7"}, connect=never, abstract=set)
    assert refusal is None and "no X server answers" in warnings[0]
    refusal, warnings = session.display_problem({"DISPLAY": "localhost:10.0"}, connect=never, abstract=set)
    assert refusal is None and "loopback" in warnings[0]
    refusal, warnings = session.display_problem({"DBUS_SESSION_BUS_ADDRESS": "unix:abstract=/tmp/dbus-x,guid=1"},
                                                connect=never, abstract=set)
    assert refusal is None and "session bus" in warnings[0]
    assert session.display_problem({}, connect=never, abstract=set) == (None, [])


def test_abstract_sockets_parses_proc_net_unix(tmp_path: Path) -> None:
    table = tmp_path / "unix"
    table.write_text("Num       RefCount Protocol Flags    Type St Inode Path\n"
                     "0000: 00000002 00000000 00010000 0001 01 1 @/tmp/.X11-unix/X0\n"
                     "0000: 00000002 00000000 00010000 0001 01 2 /tmp/.X11-unix/X0\n"
                     "0000: 00000003 00000000 00000000 0001 03 3\n")
    assert session.abstract_sockets(str(table)) == {"/tmp/.X11-unix/X0"}


@pytest.mark.parametrize(("cmdline", "name"), [
    (["/usr/lib/firefox-esr/firefox-esr", "-new-window"], "firefox-esr"),
    (["/usr/bin/python3", "-I", "/usr/bin/meld", "a"], "meld"),
    (["sh", "-c", "x"], "x"),
    ([], ""),
])
def test_program_name(cmdline: list[str], name: str) -> None:
    assert session._program_name(cmdline) == name


def test_same_app_outside_finds_the_users_own_copy(tmp_path: Path) -> None:
    app = tmp_path / "fakeapp"
    shutil.copy("/bin/sleep", app)
    proc = subprocess.Popen([str(app), "30"])
    try:
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
        hits = session.same_app_outside(["fakeapp", "1"], env, os.getuid())
        assert (proc.pid, "fakeapp") in hits
        assert session.same_app_outside(["fakeapp"], env, os.getuid() + 1) == []
        warning = session.single_instance_warning(hits)
        assert warning is not None and "already runs outside nsfw" in warning and str(proc.pid) in warning
        assert session.same_app_outside(["definitely-not-running-here"], env, os.getuid()) == []
    finally:
        proc.kill()
        proc.wait()


def test_check_warns_about_a_running_copy_only_in_a_graphical_session(tmp_path: Path) -> None:
    app = tmp_path / "guiapp"
    shutil.copy("/bin/sleep", app)
    proc = subprocess.Popen([str(app), "30"])
    try:
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
        assert session.check(["guiapp"], env, os.getuid()) == []
        warnings = session.check(["guiapp"], {**env, "WAYLAND_DISPLAY": "wayland-0"}, os.getuid())
        assert len(warnings) == 1 and "guiapp already runs outside nsfw" in warnings[0]
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- the store


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    home, system = tmp_path / "home", tmp_path / "usr-share"
    (system / "applications" / "kde4").mkdir(parents=True)
    for name in ("firefox-esr.desktop", "vlc.desktop", "steam.desktop"):
        shutil.copy(DATA / name, system / "applications" / name)
    shutil.copy(DATA / "kde4-kviewer.desktop", system / "applications" / "kde4" / "kviewer.desktop")
    home.mkdir()
    return {"XDG_DATA_HOME": str(home / "data"), "XDG_DATA_DIRS": f"{tmp_path / 'local-share'}:{system}",
            "HOME": str(home)}


def _scope(env: dict[str, str]) -> store.Scope:
    return store.scope(False, env, env["HOME"])


def test_store_wrap_list_unwrap(dirs: dict[str, str]) -> None:
    sc = _scope(dirs)
    done = store.wrap(sc, "firefox-esr", "web", launcher=store.default_launcher())
    assert done.path == Path(dirs["XDG_DATA_HOME"]) / "applications" / "firefox-esr.desktop"
    assert done.original == Path(dirs["XDG_DATA_DIRS"].split(":")[1]) / "applications" / "firefox-esr.desktop"
    assert (os.stat(done.path).st_mode & 0o777) == 0o644
    wrapped = DesktopEntry(done.path.read_text())
    assert desktop.original_args(wrapped)[0].text == "/usr/lib/firefox-esr/firefox-esr"
    store.wrap(sc, "kde4-kviewer.desktop", None, launcher=store.default_launcher())  # an id from a subdirectory
    listed = {st.id: (st.profile, st.state) for st in store.wrapped(sc)}
    assert listed == {"firefox-esr.desktop": ("web", "unchanged"), "kde4-kviewer.desktop": (None, "unchanged")}
    assert store.unwrap(sc, "firefox-esr") == [f"removed {done.path}"]
    assert not done.path.exists()
    with pytest.raises(DesktopError, match="not wrapped"):
        store.unwrap(sc, "firefox-esr")


def test_store_rewrap_changes_the_profile_and_never_wraps_a_wrap(dirs: dict[str, str]) -> None:
    sc = _scope(dirs)
    store.wrap(sc, "vlc", "a", launcher=store.default_launcher())
    again = store.wrap(sc, "vlc", "b", launcher=store.default_launcher())
    entry = DesktopEntry(again.path.read_text())
    assert desktop.wrap_info(entry) is not None and desktop.wrap_info(entry).profile == "b"  # type: ignore[union-attr]
    assert desktop.original_args(entry) == desktop.split_exec("/usr/bin/vlc --started-from-file %U")


def test_store_system_wrap_is_not_taken_as_the_original(dirs: dict[str, str], tmp_path: Path) -> None:
    local = tmp_path / "local-share" / "applications"
    local.mkdir(parents=True)
    data = (DATA / "steam.desktop").read_bytes()
    (local / "steam.desktop").write_text(desktop.wrap(data.decode(), source="/usr/share/applications/steam.desktop",
                                                      digest="x", launcher=LAUNCHER, profile="admin"))
    done = store.wrap(_scope(dirs), "steam", "mine", launcher=store.default_launcher())
    assert done.original.parent.parent.name == "usr-share"


def test_store_users_own_entry_is_moved_aside_and_back(dirs: dict[str, str]) -> None:
    sc = _scope(dirs)
    own = sc.applications / "steam.desktop"
    own.parent.mkdir(parents=True)
    own.write_text((DATA / "steam.desktop").read_text().replace("Name=Steam", "Name=My Steam"))
    done = store.wrap(sc, "steam", None, launcher=store.default_launcher())
    assert done.original == sc.originals / "steam.desktop" and "moved" in done.notes[0]
    assert DesktopEntry(done.path.read_text()).get(desktop.MAIN_GROUP, "Name") == "My Steam"
    store.wrap(sc, "steam", "p", launcher=store.default_launcher())  # again: the moved file is still the original
    assert desktop.wrap_info(DesktopEntry(own.read_text())).original == str(sc.originals / "steam.desktop")  # type: ignore[union-attr]
    store.unwrap(sc, "steam")
    assert DesktopEntry(own.read_text()).get(desktop.MAIN_GROUP, "Name") == "My Steam"
    assert not (sc.originals / "steam.desktop").exists()


def test_store_never_overwrites_a_file_it_did_not_write(tmp_path: Path) -> None:
    system = tmp_path / "share"
    (system / "applications").mkdir(parents=True)
    shutil.copy(DATA / "vlc.desktop", system / "applications" / "vlc.desktop")
    sc = store.Scope("system", tmp_path / "local", (system,))  # the target directory is not on the search path
    sc.applications.mkdir(parents=True)
    foreign = sc.applications / "vlc.desktop"
    foreign.write_text("[Desktop Entry]\nType=Application\nName=other\nExec=other\n")
    with pytest.raises(DesktopError, match="nsfw did not write it"):
        store.wrap(sc, "vlc", None, launcher=store.default_launcher())
    assert "Name=other" in foreign.read_text()


def test_store_sync(dirs: dict[str, str]) -> None:
    sc = _scope(dirs)
    system = Path(dirs["XDG_DATA_DIRS"].split(":")[1]) / "applications"
    for app in ("firefox-esr", "vlc", "steam"):
        store.wrap(sc, app, "web", launcher=store.default_launcher())
    assert store.sync(sc, launcher=store.default_launcher()) == []
    (system / "vlc.desktop").write_text((system / "vlc.desktop").read_text().replace("--started-from-file",
                                                                                     "--started-from-file --new"))
    (system / "steam.desktop").unlink()
    assert {st.id: st.state for st in store.wrapped(sc)} == {
        "firefox-esr.desktop": "unchanged", "vlc.desktop": "changed", "steam.desktop": "gone"}
    done = store.sync(sc, launcher=store.default_launcher())
    assert done == ["steam: removed, its original " + str(system / "steam.desktop") + " is gone",
                    "vlc: wrapped again, its original changed"]
    vlc = DesktopEntry((sc.applications / "vlc.desktop").read_text())
    assert [a.text for a in desktop.original_args(vlc)] == ["/usr/bin/vlc", "--started-from-file", "--new", "%U"]
    assert desktop.wrap_info(vlc).profile == "web"  # type: ignore[union-attr]
    assert {st.id: st.state for st in store.wrapped(sc)} == {"firefox-esr.desktop": "unchanged",
                                                             "vlc.desktop": "unchanged"}


@pytest.mark.parametrize("app", ["../../etc/passwd", "a/b", ".hidden", "-x", "x\ny"])
def test_store_refuses_ids_that_are_paths(app: str, dirs: dict[str, str]) -> None:
    with pytest.raises(DesktopError, match="not a desktop file id"):
        store.wrap(_scope(dirs), app, None, launcher=store.default_launcher())


def test_store_unknown_app_and_foreign_file(dirs: dict[str, str]) -> None:
    sc = _scope(dirs)
    with pytest.raises(DesktopError, match="no desktop entry nope.desktop"):
        store.wrap(sc, "nope", None, launcher=store.default_launcher())
    sc.applications.mkdir(parents=True)
    (sc.applications / "mine.desktop").write_text("[Desktop Entry]\nType=Application\nName=m\nExec=m\n")
    with pytest.raises(DesktopError, match="not written by nsfw"):
        store.unwrap(sc, "mine")


def test_store_scopes() -> None:
    user = store.scope(False, {}, "/home/u")
    assert user.applications == Path("/home/u/.local/share/applications")
    assert user.search == (Path("/home/u/.local/share"), Path("/usr/local/share"), Path("/usr/share"))
    system = store.scope(True, {"XDG_DATA_DIRS": "relative:/opt/share"}, "/root")
    assert system.applications == Path("/usr/local/share/applications") and system.search == (Path("/opt/share"),)


def test_cli_desktop_end_to_end(dirs: dict[str, str]) -> None:
    env = {**os.environ, **dirs, "PATH": "/usr/bin:/bin"}
    root = Path(__file__).resolve().parents[2]

    def nsfw(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(root / "bin" / "nsfw"), "desktop", *args], env=env,
                              capture_output=True, text=True, check=False)

    done = nsfw("wrap", "--profile", "web", "firefox-esr", "vlc", "nope")
    assert done.returncode == 1, done.stderr
    assert "firefox-esr.desktop: wrapped with profile web" in done.stdout and "nope" in done.stderr
    listed = nsfw("list")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["APP", "PROFILE", "SCOPE", "ORIGINAL", "FROM"]
    assert lines[1].split()[:4] == ["firefox-esr", "web", "user", "unchanged"]
    assert nsfw("sync").stderr.strip() == "every wrapped entry is up to date"
    assert nsfw("unwrap", "vlc").returncode == 0
    assert "vlc" not in nsfw("list").stdout
