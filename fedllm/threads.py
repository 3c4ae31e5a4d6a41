"""How many CPU threads torch's operators use, scoped to a block of code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the calling thread's torch CPU ops on ``count`` intra-op threads, then restore the setting.

    The server's tensor work (validating uploads, aggregating) is elementwise and memory-bound on
    tensors of 10^4 to 10^6 elements: a second thread gains little, while on a busy machine
    (gunicorn's other threads and workers, other processes) each parallel region waits until every
    one of its threads gets a core -- up to 10× slower (``bench/aggregation.py``). With torch's
    OpenMP backend the setting is per thread, so the other request threads keep theirs.
    """
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
