"""Running test modules' `guest_` tests inside a User-Mode-Linux guest kernel, for modes this
host's kernel lacks (IPVS). A module's host-side test calls `guest_junit(__file__, tmp_path)`
and asserts on the JUnit report of its own guest tests (the guest writes it over hostfs).

A boot costs 5-10 s, so the modules in SHARED_BOOT share one per pytest session: the first of
their host tests to run boots the guest for all of them the session holds (pass `request`),
the others read its report."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from clusters.uml import run_in_guest
from clusters.uml_host import uml_missing

IN_GUEST = os.environ.get("SVCBENCH_KERNEL") == "uml"
TESTS = Path(__file__).resolve().parent
# tests/test_agent.py's IPVS case adds ~4 s to test_ipvs.py's boot instead of ~14 s of its own
SHARED_BOOT = (TESTS / "test_ipvs.py", TESTS / "test_agent.py")

_booted: dict[Path, tuple[list[Path], int, Path]] = {}  # file -> (boot's files, exit, JUnit)


def guest_junit(test_file: str, tmp_path: Path, request: pytest.FixtureRequest | None = None
                ) -> str:
    """Run the module's `guest_` tests in a guest (one boot per session for SHARED_BOOT);
    the JUnit XML of its test cases. Skips inside the guest and where no guest can boot;
    fails when one of the module's guest tests fails or none ran."""
    if IN_GUEST:
        pytest.skip("already inside the guest kernel")
    problems = uml_missing()
    if problems:
        pytest.skip("no User-Mode-Linux guest: " + "; ".join(problems))
    path = Path(test_file).resolve()
    if path not in _booted:
        files = [path]
        if path in SHARED_BOOT:
            held = ({Path(item.path).resolve() for item in request.session.items}
                    if request is not None else set(SHARED_BOOT))
            files = [f for f in SHARED_BOOT if f in held or f == path]
        junit = tmp_path / "guest-junit.xml"  # written by the guest, read here
        rc = run_in_guest(["-p", "no:cacheprovider", "-q", "-rs", "-k", "guest_",
                           f"--junitxml={junit}", *map(str, files)],
                          module="pytest", timeout=600)
        _booted.update(dict.fromkeys(files, (files, rc, junit)))
    files, rc, junit = _booted[path]
    assert junit.exists(), f"the guest wrote no report (pytest exited {rc}); output is above"
    cases = _cases(ET.parse(junit).getroot())
    mine = cases.get(path, [])
    assert mine, f"none of {path.name}'s guest tests ran (pytest exited {rc}); output is above"
    failed = [c.get("name") for c in mine if c.find("failure") is not None
              or c.find("error") is not None]
    assert not failed, f"{path.name}'s guest tests {failed} failed; their output is above"
    # not ours: pytest failed only where another module's guest test failed
    others_failed = any(c.find("failure") is not None or c.find("error") is not None
                        for f, cs in cases.items() if f != path for c in cs)
    assert rc == 0 or others_failed, f"pytest in the guest exited {rc}; its output is above"
    suite = ET.Element("testsuite", name=f"guest: {path.name}", tests=str(len(mine)))
    suite.extend(mine)
    return ET.tostring(suite, encoding="unicode")


def _cases(root: ET.Element) -> dict[Path | None, list[ET.Element]]:
    """The report's test cases by the file they belong to (classname tests.test_x[.Class])."""
    by_file: dict[Path | None, list[ET.Element]] = {}
    for case in root.iter("testcase"):
        parts = case.get("classname", "").split(".")
        found = None
        for n in range(len(parts), 0, -1):
            candidate = TESTS.parent.joinpath(*parts[:n]).with_suffix(".py")
            if candidate.is_file():
                found = candidate
                break
        by_file.setdefault(found, []).append(case)
    return by_file
