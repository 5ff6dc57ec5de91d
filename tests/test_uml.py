"""The User-Mode-Linux guest runner: forwarding, records, gc, and one kept guest end to end.

The end-to-end test boots one guest (`up --kernel uml --mode ipvs`), drives it through the
same calls the CLI makes (forward, owns_run) with real traffic, and takes it down; every
other test runs on the host without a guest. Tests that need the guest skip with the
reason when User-Mode Linux is not installed (`svcbench doctor --fix` installs it).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusters import uml, uml_host
from svcbench import guest as forwarding

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 198.19.0.5
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
"""
SECOND = SERVICE.replace("name: echo,", "name: echo2,").replace("198.19.0.5", "198.19.0.6")


def _needs_guest() -> None:
    if os.environ.get("SVCBENCH_KERNEL") == "uml":
        pytest.skip("already inside a guest kernel")
    problems = uml_host.boot_problems()  # a low vm.max_map_count only limits how large it grows
    if problems:
        pytest.skip("no User-Mode-Linux guest: " + "; ".join(problems))


def _uml_processes(marker: str) -> list[int]:
    """Host processes whose command line mentions `marker` (a guest's folder)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and int(entry) != os.getpid():
                pids.append(int(entry))
    return pids


@pytest.fixture
def guest_dir(tmp_path, monkeypatch):
    """A private GUEST_DIR, so records of other people's guests are never touched."""
    path = tmp_path / "guests"
    monkeypatch.setattr(uml, "GUEST_DIR", str(path))
    return path


# --------------------------------------------------------------------------- host only


def test_forwarded_argv_drops_the_kernel_flag():
    assert forwarding.drop_kernel_flag(["up", "--kernel", "uml", "--mode", "ipvs"]) == ["up", "--mode", "ipvs"]
    assert forwarding.drop_kernel_flag(["bench", "--kernel=uml", "--modes", "ipvs"]) == ["bench", "--modes", "ipvs"]
    assert forwarding.flag_value(["probe", "--run", "abc123", "--count", "3"], "--run") == "abc123"
    assert forwarding.flag_value(["probe", "--run=abc123"], "--run") == "abc123"
    assert forwarding.flag_value(["probe"], "--run") is None
    assert forwarding.reads_stdin(["apply", "-f", "-"]) and not forwarding.reads_stdin(["apply", "-f", "x.yaml"])


def test_guest_environment_carries_basics_not_secrets(monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "secret")
    monkeypatch.setenv("SVCBENCH_DEBUG", "1")
    env = uml._guest_env({"EXTRA": "x"})
    assert "SOME_API_TOKEN" not in env
    assert env["SVCBENCH_DEBUG"] == "1" and env["EXTRA"] == "x"
    assert env["TMPDIR"] == "/run/tmp" and env["SVCBENCH_KERNEL"] == "uml"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == uml.REPO_ROOT
    assert "/usr/sbin" in env["PATH"].split(os.pathsep)


def test_missing_names_what_to_install(monkeypatch):
    monkeypatch.setattr(uml_host, "UML_KERNEL", "/nonexistent/linux.uml")
    assert any("apt-get install user-mode-linux" in m for m in uml_host.uml_missing())
    monkeypatch.setattr(uml_host, "UML_KERNEL", sys.executable)  # present, but its tree is not prepared
    monkeypatch.setattr(uml_host, "CACHE_DIR", "/nonexistent/cache")
    monkeypatch.setattr(uml_host, "module_version", lambda: "6.1.0")
    assert any("svcbench doctor --fix" in m for m in uml_host.uml_missing())


def test_gc_removes_records_of_guests_that_are_gone(guest_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = uml.Guest.new("kept")
    gone.record.update(uml={"pid": dead.pid, "start": 1}, runs=["abc123"])
    gone.save()
    half = guest_dir / "g0badc0de"  # killed between mkdir and its first record
    half.mkdir()
    assert {g.id for g in uml.list_guests()} == {gone.id, half.name}
    assert not uml.owns_run("abc123") and not uml.owns_run(None)
    removed = uml.gc_guests()
    assert len(removed) == 2 and all("UML is not running" in line for line in removed)
    assert not any(guest_dir.iterdir())
    assert uml.gc_guests() == []


def test_forward_without_a_guest_names_the_run(guest_dir, capsys):
    assert forwarding.forward(["probe", "--run", "abc123", "--from", "external", "--to", "198.19.0.1:80"]) == 1
    assert "run abc123 lives in no running guest kernel" in capsys.readouterr().err


# --------------------------------------------------------------------------- with a guest


@pytest.mark.root
@pytest.mark.timeout(120)
def test_time_limit_kills_the_guest(guest_dir, monkeypatch, capfd):
    _needs_guest()
    monkeypatch.setattr(uml, "BOOT_TIMEOUT_S", 2.0)  # the host allows timeout + this much for boot
    started = time.monotonic()
    assert uml.run_in_guest(["--help"], timeout=1.0) == 124
    assert time.monotonic() - started < 30
    assert "time limit" in capfd.readouterr().err
    assert _uml_processes(str(guest_dir)) == []
    assert not any(guest_dir.iterdir())


def _forward(capfd, argv: list[str]) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = forwarding.forward(argv)
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.mark.root
@pytest.mark.timeout(600)
def test_kept_guest_up_probe_apply_down(tmp_path, monkeypatch, capfd):
    """`up --kernel uml` leaves a guest running its cluster; later commands run in it; `down` stops it."""
    _needs_guest()
    from clusters.netns import STATE_DIR, list_netns

    before = {g.id for g in uml.list_guests()}
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SERVICE.encode())))
    guest = None
    try:
        rc, out, err = _forward(capfd, ["up", "--kernel", "uml", "--mode", "ipvs", "--nodes", "1",
                                        "--pods-per-node", "2", "-f", "-", "--json"])
        assert rc == 0, err
        assert json.loads(out)["mode"] == "ipvs"
        run = json.loads(out)["run"]
        [guest] = [g for g in uml.list_guests() if g.id not in before]
        assert guest.runs == [run] and guest.uml_alive()
        assert uml.owns_run(run) and not uml.owns_run("ffffff")
        # The run lives in the guest's own /run: nothing of it on the host.
        assert list_netns(f"svb-{run}-") == [] and not os.path.exists(os.path.join(STATE_DIR, run))

        rc, out, err = _forward(capfd, ["probe", "--run", run, "--from", "node/node1", "--to", "198.19.0.5:80",
                                        "--count", "6", "--json"])
        assert rc == 0, err
        summary = json.loads(out)["summary"]
        assert summary["outcomes"] == {"ok": 6}
        assert set(summary["backends"]) == {"default/echo-node1-1", "default/echo-node1-2"}

        manifest = tmp_path / "second.yaml"
        manifest.write_text(SECOND)
        monkeypatch.chdir(tmp_path)  # a relative path works: the guest runs in the caller's folder
        rc, out, err = _forward(capfd, ["apply", "--run", run, "-f", "second.yaml"])
        assert rc == 0, err
        rc, out, err = _forward(capfd, ["probe", "--run", run, "--from", "pod/echo-node1-1", "--to", "198.19.0.6:80",
                                        "--count", "4", "--json"])
        assert rc == 0 and json.loads(out)["summary"]["outcomes"] == {"ok": 4}, err

        # A command that fails in the guest keeps its exit status and its message.
        rc, out, err = _forward(capfd, ["probe", "--run", run, "--from", "pod/nobody", "--to", "198.19.0.5:80"])
        assert rc == 2 and "nobody" in err

        rc, out, err = _forward(capfd, ["down", "--run", run])
        assert rc == 0 and f"cluster {run} removed" in out, err
        assert not guest.dir.exists() and not guest.uml_alive()
        assert not uml.owns_run(run)
        assert _uml_processes(str(guest.dir)) == []
    finally:
        for g in uml.list_guests():
            if g.id not in before:
                g.stop(grace=10)
