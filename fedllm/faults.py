"""Deterministic crash points for the reliability tests.

``FEDLLM_FAULT_POINT=name`` (or ``name:N`` for the N-th time the point is reached in a process)
makes the process die with SIGKILL at that point, as ``kill -9`` would: with
``FEDLLM_FAULT_SCOPE=group`` (the default) the whole process group goes, i.e. the gunicorn
master and all workers; with ``worker`` only the current process. ``FEDLLM_FAULT_ONCE=FILE`` makes the point fire only
once across all processes (the first to create FILE dies), so a respawned worker goes on.
Unset, a point costs one string comparison.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_SPEC = os.environ.get("FEDLLM_FAULT_POINT", "")
_NAME, _, _NTH = _SPEC.partition(":")
_SCOPE = os.environ.get("FEDLLM_FAULT_SCOPE", "group")
_ONCE = os.environ.get("FEDLLM_FAULT_ONCE", "")
_hits: Counter[str] = Counter()

# Every point, so tests can loop over them.
POINTS = (
    "upload.streaming",  # part of an upload's body is on disk
    "upload.stored",  # the update file is in place, its row not yet committed
    "upload.committed",  # the update is committed, the 202 not yet sent
    "aggregate.loaded",  # the round's updates are read, nothing written
    "aggregate.global_written",  # the new global file is written, its state file not yet
    "aggregate.files_written",  # all files of the new version written, nothing committed
    "aggregate.committed",  # the new version is committed, old files not yet cleaned up
    "atomic_write.before_rename",  # a temporary file is complete and fsynced, not yet renamed
)


def fault_point(name: str) -> None:
    if name != _NAME:
        return
    _hits[name] += 1
    if _NTH and _hits[name] != int(_NTH):
        return
    if _ONCE:
        try:
            os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if _SCOPE == "group":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
