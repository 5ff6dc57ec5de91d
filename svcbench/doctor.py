"""Preflight: what svcbench needs on this machine, what is missing, and how to install it.

`svcbench doctor --fix` installs what is missing on Debian/Ubuntu as root; beyond the
guest kernel's needs (its module index and FPU-state shim under /var/cache/svcbench, and
vm.max_map_count raised to 1,048,576 for large guest processes) it changes nothing else.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
NOT_ROOT = "run as root: svcbench makes network namespaces and their rules, which only root can"


def _which(cmd: str) -> bool:
    return shutil.which(cmd, path=SBIN_PATH) is not None


def _python_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _kernel_has_netns() -> bool:
    # What the kernel offers, whoever asks: lacking root is the "root" check's finding.
    return os.path.exists("/proc/self/ns/net")


@dataclass(frozen=True)
class Requirement:
    name: str
    why: str  # what needs it
    check: Callable[[], bool]
    apt: tuple[str, ...] = ()  # Debian packages that provide it
    pip: tuple[str, ...] = ()  # PyPI packages that provide it
    hint: str = ""  # what to do when no package manager can fix it

    @property
    def fix(self) -> str:
        if self.apt:
            return "apt-get install -y " + " ".join(self.apt)
        if self.pip:
            return f"{sys.executable} -m pip install " + " ".join(self.pip)
        return self.hint


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("root", "network namespaces, rules", lambda: os.geteuid() == 0,
                hint="run as root"),
    Requirement("netns", "the namespace cluster", _kernel_has_netns,
                hint="a kernel with CONFIG_NET_NS"),
    Requirement("ip", "namespaces and links", lambda: _which("ip"), apt=("iproute2",)),
    Requirement("iptables-nft", "iptables mode (nft backend)",
                lambda: _which("iptables-nft-restore"), apt=("iptables",)),
    Requirement("iptables-legacy", "iptables mode (legacy backend)",
                lambda: _which("iptables-legacy-restore"), apt=("iptables",)),
    Requirement("nft", "nftables mode", lambda: _which("nft"), apt=("nftables",)),
    Requirement("ipset", "IPVS and userspace modes", lambda: _which("ipset"), apt=("ipset",)),
    Requirement("conntrack", "stale UDP flow cleanup", lambda: _which("conntrack"),
                apt=("conntrack",)),
    Requirement("sysctl", "namespace settings", lambda: _which("sysctl"), apt=("procps",)),
    Requirement("chromium", "report tests (headless browser)", lambda: _which("chromium"),
                apt=("chromium",)),
    Requirement("pyroute2", "netlink", lambda: _python_module("pyroute2"), pip=("pyroute2",)),
    Requirement("yaml", "manifests", lambda: _python_module("yaml"), pip=("PyYAML",)),
    Requirement("rich", "progress and tables", lambda: _python_module("rich"), pip=("rich",)),
    Requirement("uvloop", "echo backends, userspace proxy", lambda: _python_module("uvloop"),
                pip=("uvloop",)),
    Requirement("pandas", "report", lambda: _python_module("pandas"), pip=("pandas",)),
)


# Prerequisites with their own check and fix (not one package): module, missing(), fix(echo).
COMPOSITE = (
    ("guest kernel (UML)", "IPVS mode (--kernel uml)", "clusters.uml_host", "uml_missing", "fix_uml"),
    ("bcc", "ebpf mode, kernel tracepoints", "bpf.setup", "bcc_missing", "fix_bcc"),
)


def _composite(module_name: str, attr: str):
    import importlib

    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        return None


@dataclass
class Finding:
    name: str
    why: str
    present: bool
    fix: str


def examine(requirements=REQUIREMENTS) -> list[Finding]:
    findings = [Finding(r.name, r.why, bool(r.check()), r.fix) for r in requirements]
    for name, why, module, missing_attr, _ in COMPOSITE:
        missing = _composite(module, missing_attr)
        if missing is None:
            continue
        problems = missing()
        findings.append(Finding(name, why, not problems,
                                "; ".join(problems + ["svcbench doctor --fix"]) if problems else ""))
    return findings


def fix(requirements=REQUIREMENTS, echo=print) -> list[Finding]:
    """Install every missing apt and pip package in one go each, then look again."""
    missing = [r for r in requirements if not r.check()]
    apt = sorted({p for r in missing for p in r.apt})
    pip = sorted({p for r in missing for p in r.pip})
    if apt:
        if os.geteuid() != 0 or not _which("apt-get"):
            echo("cannot install " + " ".join(apt) + ": needs root on Debian/Ubuntu (apt-get)")
        else:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            echo("$ apt-get update && apt-get install -y " + " ".join(apt))
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=True, env=env)
    if pip:
        echo(f"$ {sys.executable} -m pip install " + " ".join(pip))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip], check=True)
    importlib.invalidate_caches()
    for _, _, module, missing_attr, fix_attr in COMPOSITE:
        missing, fixer = _composite(module, missing_attr), _composite(module, fix_attr)
        if missing is not None and fixer is not None and missing():
            fixer(echo=echo)
    return examine(requirements)


def as_json(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]
