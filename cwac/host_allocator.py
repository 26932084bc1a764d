"""How the host's C allocator (glibc malloc) hands memory to torch's CPU tensors.

glibc serves every allocation above its mmap threshold (at most 32 MiB, and 128 KiB until freed
blocks raise it) with a fresh ``mmap`` and returns it to the kernel on ``free``. A CPU training
step allocates the same large buffers every step (the logits, the dense ``[vocab, d_model]``
gradient of the embedding, the gradients of every linear map), so every step pays a page fault
and a kernel zero-fill for each of their pages again. On the organism (SmolLM2-135M, 2 cores)
that cost shows up as ``aten::fill_`` of the embedding gradient at ~0.3 s a step and as
out-of-place gradient additions at ~13 ms per 3.5 MB map: a quarter of a CWAC step, whose
activation term makes a second embedding gradient and adds the two graphs' gradients of
layers 0..l* (docs/organism.md, "The host allocator").

``retain`` keeps freed memory in the process (``M_MMAP_MAX = 0``: large blocks come from the
heap, whose freed space malloc reuses; ``M_TRIM_THRESHOLD`` at its maximum: the heap's top is
not handed back), so the buffers of one step are the already-mapped pages of the next. glibc
still maps a block with ``mmap`` when the heap cannot grow, so no allocation fails for it. It
changes no number a step computes, only where its memory comes from, and so it is not part of
the config hash (``cwac.records.NON_SEMANTIC``). The price is a resident set that stays at its
peak. Intel's CPU-training guides reach the same effect with jemalloc or tcmalloc preloaded;
``retain`` needs nothing installed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

MODES = ("retain", "glibc")

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc's documented start values: 128 KiB trim and mmap thresholds, 65536 mmapped blocks at most
_DEFAULT = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_RETAIN = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}

_current: str | None = None   # None: never set by this module (glibc's own dynamic thresholds)


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "gnu_get_libc_version") else None


def set_host_allocator(mode: str) -> str | None:
    """Apply ``mode`` to glibc's malloc; returns the mode in force, or None where the C library is
    not glibc (nothing is changed there).

    ``retain``: the settings of the module doc. ``glibc``: glibc's own behaviour; in a process that
    never retained, nothing is called; after ``retain`` it restores glibc's documented start values
    (128 KiB thresholds, which also turns off glibc's dynamic mmap threshold: a close stand-in, used
    by benchmarks that switch within one process).
    """
    global _current
    if mode not in MODES:
        raise ValueError(f"host_allocator={mode!r} is not valid; valid values: {', '.join(MODES)}")
    lib = _libc()
    if lib is None:
        log.info("host_allocator=%s: the C library is not glibc; its allocator is left as it is", mode)
        return None
    if mode == "glibc" and _current is None:
        return mode
    for param, value in (_RETAIN if mode == "retain" else _DEFAULT).items():
        if lib.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"mallopt({param}, {value}) failed (host_allocator={mode})")
    _current = mode
    return mode


def current_host_allocator() -> str:
    """What this process runs with: ``retain`` or ``glibc``."""
    return _current or "glibc"
