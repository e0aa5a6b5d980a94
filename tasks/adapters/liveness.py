"""Which process runs a trial or a sweep, so a sweep on the same machine can tell at once that it is gone.

A process is named by host, boot, process id and start time (Linux's /proc/<pid>/stat, field 22): a pid reused
after the process died has another start time, and a reboot another boot id. Elsewhere (another host, no /proc)
nothing can be told, and the heartbeat rule alone decides.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path

KEYS = ("host", "boot", "pid", "started")


@cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None when there is no such live process (or no
    /proc). A zombie is gone: its parent may never reap it (deployments/processes.py reads /proc the same way;
    deployments/ imports nothing of tasks/)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # from field 3 on
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def this_process() -> dict[str, str]:
    """This process's name as stored with a trial (user attr ``process``) or a sweep run (``process.*`` tags)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": str(pid), "started": _start_time(pid) or ""}


def is_gone(process: dict[str, str]) -> bool:
    """True only when the process ran on this host since its last boot and is no longer there."""
    if not _boot_id() or not process.get("started") or not process.get("pid", "").isdigit():
        return False
    if process.get("host") != socket.gethostname() or process.get("boot") != _boot_id():
        return False
    return _start_time(int(process["pid"])) != process["started"]


def described(process: dict[str, str]) -> str:
    return f"process {process.get('pid', '?')} on {process.get('host', '?')}"
