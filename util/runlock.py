"""One training process per experiment folder: ``<save_path>/train.lock``.

The lock file holds the owner's host, process id and start time; a thread of the owner
touches it every ``HEARTBEAT_S`` seconds. A second run into the same folder is refused
while the owner lives. A lock left by a crashed run (kill -9, power loss) is taken over
with a warning: when it has not been touched for ``STALE_S`` seconds (any host: after a
container restart its process id may belong to another live process), and on the same host
at once when its process is gone or its process id is our own (a restarted container gave
us the id of the run that left it; a lock this process holds itself is still in use).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time

from util.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


_HELD: set[str] = set()   # the locks this process holds (their real paths)


class LockedError(UserError, RuntimeError):
    """Another live process trains into the same folder."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    return True


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"process {owner.get('pid')} on {owner.get('host')}, started {started}"


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock for the block."""

    def __init__(self, folder: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = os.path.join(folder, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ owner checks
    def stale_reason(self, owner: dict, age_s: float) -> str | None:
        """Why the lock of ``owner`` (last touched ``age_s`` ago) no longer holds, or None."""
        if age_s > self.stale_s:
            return f"it was last renewed {age_s:.0f} s ago (more than {self.stale_s:.0f} s)"
        if owner.get("host") == self.me["host"]:
            pid = owner.get("pid")
            if not isinstance(pid, int) or not pid_alive(pid):
                return f"its process {pid} is gone"
            if pid == self.me["pid"] and os.path.realpath(self.path) not in _HELD:
                return f"its process id {pid} is this process's own (left before a restart)"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise LockedError(f"cannot create {self.path} ({e.strerror or e}): the experiment folder must be "
                              f"writable (check its permissions and free space, or choose another save_path)") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        except OSError as e:
            raise LockedError(f"cannot create the experiment folder {os.path.dirname(self.path)} "
                              f"({e.strerror or e}); choose another save_path") from None
        for _ in range(3):   # create, or clear a stale lock and create again
            if self._create():
                break
            try:
                with open(self.path) as f:
                    owner = json.load(f)
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                continue                       # its owner just released it
            except (OSError, ValueError):
                owner, age = {}, float("inf")  # unreadable: a crash while it was being written
            reason = self.stale_reason(owner, age) if owner else "it is unreadable"
            if reason is None:
                raise LockedError(
                    f"{os.path.dirname(self.path)} is in use by another training run ({describe(owner)}); "
                    f"wait for it, stop it, or train into another folder (save_path / exp name). "
                    f"If that run is dead, delete {self.path}")
            log.warning("taking over the lock %s of an earlier run (%s): %s", self.path, describe(owner), reason)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        else:
            raise LockedError(f"could not take the lock {self.path}: another process keeps creating it")
        _HELD.add(os.path.realpath(self.path))
        self._thread = threading.Thread(target=self._beat, name="train.lock heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("could not renew %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            _HELD.discard(os.path.realpath(self.path))
            try:
                with open(self.path) as f:
                    mine = json.load(f) == self.me
            except (OSError, ValueError):
                mine = False
            if mine:
                os.remove(self.path)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
