"""One trainer per MODEL_DIR: an advisory lock on MODEL_DIR/train.lock.

Two trainers writing one MODEL_DIR interleave checkpoints, logs and run_config.json. The lock is
`fcntl.flock` on `MODEL_DIR/train.lock`, taken by process 0 (the processes of one multi-process
job share MODEL_DIR and act as one trainer; each of them learns whether it was taken). The
kernel drops a flock when its holder exits, however it exits (SIGKILL included), so a lock is
never stale; the file keeps the last holder's host and pid for the refusal message. Taking the
lock also creates MODEL_DIR, so a MODEL_DIR that is a file or not writable is refused here in
one line.

Limits: flock is only as good as the filesystem's. Local disks, and NFSv4 (Linux emulates flock
with NFS byte-range locks, seen by every client), work. gcsfuse and other FUSE mounts of object
stores, and NFS mounted with `nolock`, lock per machine only: two machines can still both
train. gs:// and other non-local paths get no lock (a line on stderr says so).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Self

import jax

from sbs_jax.runtime import distributed

LOCK_FILE = "train.lock"


class ModelDirError(ValueError):
    """MODEL_DIR cannot be used (held by another trainer, a file, not writable); the message
    names it."""


class RunLock:
    """MODEL_DIR's trainer lock: `acquire()` (ModelDirError when refused), then release it by
    leaving `with lock:` (or by exiting)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self._file = None

    def acquire(self) -> Self:
        """Takes the lock (on process 0; every process must call this)."""
        problem = None
        if jax.process_index() == 0:
            try:
                self._take()
            except ModelDirError as exc:
                problem = str(exc)
        if distributed.value_of_process_0(int(problem is not None)):
            raise ModelDirError(problem or f"MODEL_DIR={self.model_dir}: process 0 could not "
                                "take its trainer lock (see process 0's log)")
        return self

    def _take(self) -> None:
        if "://" in self.model_dir:
            print(f"sbs_jax.train.run_lock: MODEL_DIR={self.model_dir} is not a local path: no "
                  "trainer lock (make sure one trainer writes it)", file=sys.stderr, flush=True)
            return
        if os.path.exists(self.model_dir) and not os.path.isdir(self.model_dir):
            raise ModelDirError(f"MODEL_DIR={self.model_dir} is a file, not a folder")
        path = os.path.join(self.model_dir, LOCK_FILE)
        try:
            os.makedirs(self.model_dir, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115  (held open while training)
        except OSError as exc:
            raise ModelDirError(f"MODEL_DIR={self.model_dir} cannot be written "
                                f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise ModelDirError(
                f"MODEL_DIR={self.model_dir} is in use by another trainer ({holder}, holding "
                f"{path}); wait for it to finish, stop it, or use another MODEL_DIR") from None
        except OSError as exc:  # a filesystem without flock support
            handle.close()
            raise ModelDirError(f"MODEL_DIR={self.model_dir}: cannot lock {path} "
                                f"({exc.strerror or exc})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

