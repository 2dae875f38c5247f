"""One driver per sweep directory: DIR/.sweep.lock names the driver (pid, host, start time) while it runs.

A second driver on a directory whose driver is alive is refused, naming the holder; a lock left by a driver
that died (same host, no such process) is taken over. A lock from another host cannot be checked from here:
it is refused, and the message says which file to remove once that driver is known to be gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

__all__ = ["SweepLocked", "sweep_lock", "LOCK_NAME"]

LOCK_NAME = ".sweep.lock"


class SweepLocked(RuntimeError):
    """Another live driver holds the sweep directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (exited, not yet reaped) is not a driver
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def sweep_lock(out_dir: str):
    """Holds DIR/.sweep.lock for the block; raises SweepLocked if a live driver holds it."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                # A driver that died: take its lock over (remove it and race for a fresh one).
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            if not holder:  # being written by a driver that is starting right now
                time.sleep(0.1)
                continue
            where = (
                "this host"
                if host == me["host"]
                else f"host {host} (not checkable from here; remove {path} once that driver is gone)"
            )
            raise SweepLocked(
                f"{out_dir} is being swept by pid {pid} on {where}, since {holder.get('started')}"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise SweepLocked(f"{out_dir}: could not take {path} (another driver keeps taking it)")
    try:
        yield
    finally:
        if _read(path).get("pid") == me["pid"] and _read(path).get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
