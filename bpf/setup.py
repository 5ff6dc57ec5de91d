"""What bcc needs on this machine, and the fix `svcbench doctor --fix` applies.

bcc compiles against kernel headers it finds at /lib/modules/$(uname -r)/build (and
.../source). Kernels without a Debian headers package (custom or cloud kernels) can use
Debian's generic `linux-headers-<arch>`: the programs here use uapi headers only, which
change compatibly. Debian's `python3-bpfcc` lives in the system interpreter's
dist-packages; any CPython 3 can import it once that directory is on sys.path.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from collections.abc import Callable

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
BCC_PACKAGE = "python3-bpfcc"
MODULES_DIR = "/lib/modules"
HEADERS_DIR = "/usr/src"


def _release() -> str:
    return os.uname().release


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _generic_headers() -> tuple[str, str] | None:
    """The newest Debian (arch, common) header trees under /usr/src, if any."""
    trees = sorted(glob.glob(os.path.join(HEADERS_DIR, f"linux-headers-*-{_arch()}")))
    for tree in reversed(trees):
        common = tree[: -len(_arch())] + "common"
        if os.path.isdir(common):
            return tree, common
    return None


def bcc_import():
    """Import bcc, from Debian's dist-packages when this interpreter (a venv) lacks it."""
    try:
        import bcc  # type: ignore[import-not-found]

        return bcc
    except ImportError:
        if os.path.isdir(os.path.join(DIST_PACKAGES, "bcc")) and DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)  # appended: the venv's own packages keep priority
        import bcc  # type: ignore[import-not-found]

        return bcc


def headers_package(release: str) -> str:
    """Debian's headers for this exact kernel if it has them, else the generic ones."""
    exact = subprocess.run(["apt-cache", "show", f"linux-headers-{release}"],
                           capture_output=True, text=True)
    return f"linux-headers-{release}" if exact.returncode == 0 else f"linux-headers-{_arch()}"


def bcc_missing() -> list[str]:
    """What keeps bcc from compiling here, one sentence each with the fix; empty = ready."""
    problems = []
    if not os.path.isfile(os.path.join(DIST_PACKAGES, "bcc", "__init__.py")):
        try:
            bcc_import()
        except ImportError:
            problems.append(f"bcc's Python module is missing: apt-get install {BCC_PACKAGE}")
    build = os.path.join(MODULES_DIR, _release(), "build")
    if not os.path.isdir(os.path.join(build, "include")):
        generic = _generic_headers()
        fix = (
            f"ln -s {generic[0]} {build}; ln -s {generic[1]} {os.path.dirname(build)}/source"
            if generic
            else f"apt-get install linux-headers-{_arch()}, then link {build} to it"
        )
        problems.append(f"no kernel headers for {_release()} at {build}: {fix}")
    elif not os.path.isdir(os.path.join(MODULES_DIR, _release(), "source")) and os.path.islink(build):
        generic = _generic_headers()
        target = generic[1] if generic else "the matching linux-headers-*-common tree"
        problems.append(f"bcc needs {MODULES_DIR}/{_release()}/source next to build: ln -s {target} "
                        f"{MODULES_DIR}/{_release()}/source")
    return problems


def apt_install(packages: list[str], echo: Callable[[str], None]) -> None:
    """apt-get update (a fresh machine may have no package lists), then install."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for argv in (["apt-get", *lock, "update", "-qq"],
                 ["apt-get", *lock, "install", "-y", "--no-install-recommends", *packages]):
        echo("$ " + " ".join(argv))
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"{' '.join(argv[:1] + argv[3:5])} failed:\n{tail}")


def fix_bcc(echo: Callable[[str], None] = print) -> list[str]:
    """Install python3-bpfcc and usable kernel headers; returns the changes made.

    Changes only: the two Debian packages (and what apt pulls in with them), and the
    /lib/modules/<release>/{build,source} links when no headers are there already.
    """
    if os.geteuid() != 0:
        raise PermissionError("fixing bcc needs root (apt-get and /lib/modules)")
    done: list[str] = []
    release = _release()
    build = os.path.join(MODULES_DIR, release, "build")
    source = os.path.join(MODULES_DIR, release, "source")
    packages = []
    if not os.path.isfile(os.path.join(DIST_PACKAGES, "bcc", "__init__.py")):
        packages.append(BCC_PACKAGE)
    if not os.path.isdir(os.path.join(build, "include")):
        packages.append(headers_package(release))
    if packages:
        apt_install(packages, echo)
        done.append(f"installed {' '.join(packages)}")
    if not os.path.isdir(os.path.join(build, "include")):
        generic = _generic_headers()
        if generic is None:
            raise RuntimeError(f"no linux-headers-*-{_arch()} tree under {HEADERS_DIR} to link {build} to")
        os.makedirs(os.path.dirname(build), exist_ok=True)
        for link, target in ((build, generic[0]), (source, generic[1])):
            if os.path.islink(link):
                os.unlink(link)  # a dangling or wrong link of an earlier fix
            if not os.path.exists(link):
                echo(f"$ ln -s {target} {link}")
                os.symlink(target, link)
                done.append(f"linked {link} -> {target}")
    elif os.path.islink(build) and not os.path.exists(source):
        generic = _generic_headers()
        if generic:
            echo(f"$ ln -s {generic[1]} {source}")
            os.symlink(generic[1], source)
            done.append(f"linked {source} -> {generic[1]}")
    return done
