"""Running a test module's `guest_` tests inside one User-Mode-Linux guest kernel, for modes
this host's kernel lacks (IPVS). The host-side test calls `guest_junit(__file__, tmp_path)`
and asserts on the JUnit report the guest wrote (shared over hostfs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clusters.uml import run_in_guest
from clusters.uml_host import uml_missing

IN_GUEST = os.environ.get("SVCBENCH_KERNEL") == "uml"


def guest_junit(test_file: str, tmp_path: Path) -> str:
    """Boot a guest, run the module's `guest_` tests there; their JUnit XML. Skips inside
    the guest and where no guest can boot; fails when pytest in the guest fails."""
    if IN_GUEST:
        pytest.skip("already inside the guest kernel")
    problems = uml_missing()
    if problems:
        pytest.skip("no User-Mode-Linux guest: " + "; ".join(problems))
    junit = tmp_path / "guest-junit.xml"  # written by the guest, read here
    rc = run_in_guest(["-p", "no:cacheprovider", "-q", "-rs", "-k", "guest_",
                       f"--junitxml={junit}", test_file], module="pytest", timeout=600)
    assert rc == 0, f"the guest tests failed (pytest exited {rc}); their output is above"
    return junit.read_text()
