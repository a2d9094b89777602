"""Writing files atomically: ``atomic_write``, used by every writer in minidense
(``md.save``, the training command's checkpoints and metrics, the dataset caches,
``md.to_dot``, the profiler's trace).

It imports nothing from minidense, so that any module may use it without an import
cycle (the profiler is imported by the engine, the engine by ``io``).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

# os.open's flags for the temporary file: write only, and fail if the name exists rather
# than write into someone else's file; binary on Windows, where the C library would
# otherwise translate newlines.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """A file object for ``path``: written to a temporary file in the same folder,
    which replaces ``path`` in one step when the block succeeds and is removed when it
    fails (``path`` is then left as it was).  ``mode``: "wb" or "w"."""
    path = Path(path)
    # Created with mode 0o666, as open() creates files, so that the kernel applies the
    # process's umask (and a folder's default ACL) itself: the file gets the usual
    # permissions without the umask being read, let alone changed.  (tempfile.mkstemp
    # would make it 0o600, and restoring the usual mode would need the umask, which
    # os.umask can only read by setting it, for every thread of the process at once.)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, _CREATE, 0o666)
            break
        except FileExistsError:   # another writer's temporary file: draw another name
            continue
    else:
        raise FileExistsError(f"atomic_write: no free temporary name for {path}")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
