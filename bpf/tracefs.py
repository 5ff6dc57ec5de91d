"""A Python child with tracefs mounted, for the bcc tracers (bench/trace.py, bpf/dropmon.py).

bcc finds tracepoints through tracefs, which a fresh host does not mount. The child runs in
a mount namespace of its own (`unshare --mount`, private propagation) that mounts tracefs
there: nothing changes in the host's mounts, and libbcc never loads into the caller's
process. It is a session leader, so `kill_child` takes down everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

REPO_ROOT = str(Path(__file__).resolve().parents[1])
TRACEFS = "/sys/kernel/tracing"


def start_child(module: str, args: Sequence[str], stderr: IO[str]) -> subprocess.Popen:
    """`python -m MODULE ARGS` with tracefs mounted; text pipes on stdin and stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    script = f'mount -t tracefs nodev {TRACEFS} && exec "$0" -m "$@"'
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
         module, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        start_new_session=True,
    )


def kill_child(proc: subprocess.Popen) -> None:
    """SIGKILL the child's session if it still runs, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
