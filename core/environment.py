"""Process environment variables set for a while and then put back as they were."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping


@contextlib.contextmanager
def temporary_environ(values: Mapping[str, str], *, keep_existing: bool = False) -> Iterator[None]:
    """Sets `values` in `os.environ` for the block, then restores every name to its old value (or unsets it).

    Args:
        values: variable name -> value to set.
        keep_existing: leave a variable that is already set as it is (`values` are then defaults).
    """
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items()
                       if not (keep_existing and saved[name] is not None)})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


THREAD_POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_children() -> contextlib.AbstractContextManager[None]:
    """Native thread pools of size 1 in the environment that spawned worker processes inherit (a pool of N
    processes on N cores, each with N threads, would oversubscribe them N times)."""
    return temporary_environ({name: "1" for name in THREAD_POOL_VARIABLES})
