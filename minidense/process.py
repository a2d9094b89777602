"""Process-wide settings that speed up training on the CPU, left to the program.

Importing minidense changes nothing outside minidense: not the environment, not the
umask, not the C library's allocator.  A library shares its process with other code
(PyTorch, a web server, a notebook), and these settings act on all of it, cannot always
be undone, and some only work when made before NumPy starts.  So the program chooses:
the training and evaluation commands (``python -m minidense.train``,
``python -m minidense.evaluate``, ``minidense-train``, ``minidense-evaluate``) make both
settings below, and so do the benchmarks that time minidense as those commands run it.
Your own training script can make them too:

    OPENBLAS_THREAD_TIMEOUT=4 python my_training.py     # in the shell, see below

    import minidense as md
    md.tune_process()                                   # first thing in the script

**malloc keeps freed memory** (``tune_process()``).  A large new array is mapped fresh
from the operating system, which zeroes each page on first touch: about the cost of
writing the array.  glibc's malloc maps every block over its threshold (128 KiB at
first) that way and unmaps it when it is freed, so a training step, which makes and
frees the same large activations and gradients step after step, pays that cost for
each of them every step.  ``tune_process`` asks malloc (``mallopt``) to serve blocks up
to 32 MiB, the most glibc accepts, from its heap (M_MMAP_THRESHOLD) and to keep freed
memory there for the next step rather than return it (M_TRIM_THRESHOLD of 1 GiB).  A
DenseNet's training step on 2 cores takes 0.80-0.85x the time.  The price: the process's
resident memory stays near its peak instead of shrinking between steps, for every
library in the process (PyTorch's CPU tensors come from the same malloc), and it cannot
be undone.  (The workspace, ``minidense/workspace.py``, does the same for the largest
temporaries of the CPU ops, within minidense.)

**OpenBLAS's threads spin briefly** (``OPENBLAS_THREAD_TIMEOUT=4``).  After each matrix
product OpenBLAS's threads keep spinning on their cores for up to about 0.1 s, waiting
for the next one; on a machine with few cores they take the cores that minidense's own
threads (``minidense/threads.py``) need for the element-wise passes between products.
``OPENBLAS_THREAD_TIMEOUT=4`` asks for the shortest spin: a ResNet-20 step on 2 cores
took 1.18x longer without it.  OpenBLAS reads the variable once, when it is loaded,
which is when NumPy is imported: before any line of a command's ``main`` can run, since
``minidense`` itself imports NumPy.  So when the variable is missing, a command sets it
and re-executes itself (``start_command``): the same interpreter, options and command
line, in the same process (``os.execv`` keeps the process id, standard input and output
and so the exit status its caller sees), now with OpenBLAS started with the short spin.
A value you set yourself is kept, and then nothing is re-executed.  It costs one more
start of Python and minidense (about 0.3 s) on Linux and macOS; on Windows the command
runs with OpenBLAS's default spin instead.  Another BLAS (MKL, Accelerate) ignores the
variable.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading

from . import workspace

# What a command needs in its environment before NumPy starts (see the module's
# docstring); the user's own values win.
COMMAND_ENVIRONMENT = {"OPENBLAS_THREAD_TIMEOUT": "4"}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
_KEEP_FREED_BYTES, _MMAP_THRESHOLD = 2 ** 30, 32 * 2 ** 20
# The user's own settings of those two thresholds, which tune_process leaves alone.
_USER_MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_USER_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")
_lock = threading.Lock()


def tune_process() -> bool:
    """Ask the C library's malloc to keep freed memory for the next training step (see
    the module's docstring for what it gains and costs); True if malloc agreed.

    It acts on the whole process, for good, and is meant for the program's start, not
    for a library.  It is recorded in ``md.workspace.freed_memory_kept``, the one place
    that says whether it was done.  A second call changes nothing: once malloc has
    agreed it returns True without asking again; otherwise it checks again, and gets
    the same answer unless the environment changed in between.

    It leaves malloc alone, and returns False:
    * without glibc (macOS, Windows, Alpine's musl): their allocators have other
      settings, which minidense does not touch;
    * when you have set either threshold yourself: ``MALLOC_TRIM_THRESHOLD_``,
      ``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.trim_threshold`` /
      ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES`` (your values stay);
    * with ``MINIDENSE_KEEP_FREED_MEMORY=0`` in the environment (for a command you
      cannot edit: ``MINIDENSE_KEEP_FREED_MEMORY=0 python -m minidense.train``).
    """
    with _lock:
        if workspace.freed_memory_kept:
            return True
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        if (os.environ.get("MINIDENSE_KEEP_FREED_MEMORY") == "0"
                or any(name in os.environ for name in _USER_MALLOC_SETTINGS)
                or any(name in tunables for name in _USER_TUNABLES)):
            return False
        mallopt = _glibc_mallopt()
        if mallopt is None:
            return False
        workspace.freed_memory_kept = bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES)
                                           and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
        return workspace.freed_memory_kept


def _glibc_mallopt():
    """glibc's ``mallopt`` as a ctypes function, or None without glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version   # glibc's own; musl has a mallopt that does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def command_environment(environ=None) -> dict:
    """A copy of ``environ`` (default: this process's) with ``COMMAND_ENVIRONMENT``'s
    variables added where it has none: the environment to start a process in that
    should run minidense as the commands do (the benchmarks' workers)."""
    environment = dict(os.environ if environ is None else environ)
    for name, value in COMMAND_ENVIRONMENT.items():
        environment.setdefault(name, value)
    return environment


def start_command() -> None:
    """Give a command's process the settings of the module's docstring: when a variable
    of ``COMMAND_ENVIRONMENT`` is missing, set it and re-execute the program (this call
    then does not return: the program starts again, finds it set, and goes on); then
    ``tune_process()``.

    Only for the program's own process, called once its options have been checked
    (so that a bad option is reported without a second start): the commands call it
    from ``main(program=True)``, which their entry points pass; a ``main(argv)``
    called in-process, as the tests do, changes nothing.  The re-execution runs
    ``sys.orig_argv`` again with this interpreter: the same ``-m module`` or script,
    interpreter options and arguments.  The variable itself tells the second start
    that it is one, so there is at most one re-execution."""
    missing = {name: value for name, value in COMMAND_ENVIRONMENT.items() if name not in os.environ}
    if missing and os.name == "posix" and sys.executable and getattr(sys, "orig_argv", None):
        os.environ.update(missing)
        for stream in (sys.stdout, sys.stderr):   # exec drops what Python has not written yet
            if stream is not None:
                stream.flush()
        try:
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        except OSError:   # the interpreter cannot be started again: run without the setting
            pass
    tune_process()
