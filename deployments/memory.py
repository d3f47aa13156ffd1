"""Process memory of a Serve replica: the glibc heap trimmer, and opt-in diagnostics (tracemalloc, gc, malloc stats).

Why a trimmer: under load the ingress's live memory (Python objects, glibc blocks in use) stays flat, yet
its RSS climbed ~2.5 MB/min in a 10-minute soak, levelling off. The growth was free heap that glibc keeps:
the replica has ~40 threads (Ray's core worker, gRPC, Serve's loops) spread over up to 8 malloc arenas
per core, and free() hands back only the top of an arena's heap, never free chunks in its middle.
`malloc_trim(0)` gives those back too (it released the whole 30 MB of growth), so `start_trimmer()` calls
it every CONSILIUM_MALLOC_TRIM_S seconds (default 60, 0 turns it off). RSS then follows live memory, which is
what a leak alarm or an OOM budget needs to watch. See docs/reliability.md, "Soak".

Diagnostics: off unless CONSILIUM_TRACEMALLOC is set in the replica's environment (a number of frames,
or 1 for the default); `report()` works either way and then leaves tracemalloc out. The ingress exposes
`report()` as a deployment method, reached only through a Serve DeploymentHandle (never over HTTP), so a
bench can ask for it mid-soak:

    serve.get_deployment_handle("router", app).memory_report.remote().result()

Each report compares against the previous one (the first against the moment tracemalloc started), so two
reports bracket a stretch of load and show what was allocated in it and is still alive.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import functools
import gc
import os
import threading
import time
import tracemalloc
from typing import Any

ENV = "CONSILIUM_TRACEMALLOC"
DEFAULT_FRAMES = 12
TRIM_ENV = "CONSILIUM_MALLOC_TRIM_S"
DEFAULT_TRIM_S = 60.0

_lock = threading.Lock()
_last_snapshot: tracemalloc.Snapshot | None = None
_last_types: collections.Counter[str] | None = None
_trimmer: _Trimmer | None = None


def configure() -> None:
    """What a replica calls once at start: the heap trimmer (unless turned off) and tracing if asked for."""
    start_trimmer()
    maybe_start_tracing()


def maybe_start_tracing() -> bool:
    """Start tracemalloc when CONSILIUM_TRACEMALLOC asks for it (it costs the replica CPU: diagnosis only)."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "0") or tracemalloc.is_tracing():
        return tracemalloc.is_tracing()
    frames = int(value) if value.isdigit() and int(value) > 1 else DEFAULT_FRAMES
    tracemalloc.start(frames)
    return True


def trim_interval_s() -> float:
    """CONSILIUM_MALLOC_TRIM_S: seconds between heap trims; 0 turns the trimmer off."""
    raw = os.environ.get(TRIM_ENV, "").strip()
    if not raw:
        return DEFAULT_TRIM_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value == 0 or 0.01 <= value <= 86400):
        raise ValueError(f"{TRIM_ENV}={raw!r}: want seconds between heap trims, 0.01 to 86400, or 0 for off")
    return value


class _Trimmer:
    """A daemon thread that calls malloc_trim(0) every interval_s and keeps count of what it gave back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self.released_mb = 0.0  # RSS before minus after, summed: what the trims gave back to the OS
        self.last_ms = 0.0  # how long the last trim took (it holds glibc's arena locks meanwhile)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consilium-malloc-trim", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            before, t0 = rss_mb(), time.perf_counter()
            if not malloc_trim():
                continue  # nothing to give back (or not glibc)
            self.last_ms = (time.perf_counter() - t0) * 1000
            self.released_mb += max(0.0, before - rss_mb())
            self.trims += 1  # last: a reader that sees this trim counted sees what it released too

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def state(self) -> dict[str, Any]:
        return {
            "interval_s": self.interval_s,
            "running": self._thread.is_alive(),
            "trims": self.trims,
            "released_mb": round(self.released_mb, 2),
            "last_ms": round(self.last_ms, 2),
        }


def start_trimmer(interval_s: float | None = None) -> bool:
    """Start the heap trimmer once per process (interval from CONSILIUM_MALLOC_TRIM_S unless given).

    False where it is off (interval 0) or pointless: a libc without malloc_trim (musl, macOS).
    """
    global _trimmer
    interval = trim_interval_s() if interval_s is None else interval_s
    with _lock:
        if _trimmer is not None:
            return True
        if interval <= 0 or not _has_malloc_trim():
            return False
        _trimmer = _Trimmer(interval)
        return True


def stop_trimmer() -> None:
    """Stop the trimmer thread (tests; a replica keeps it for its lifetime)."""
    global _trimmer
    with _lock:
        if _trimmer is not None:
            _trimmer.stop()
            _trimmer = None


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; 0.0 where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_breakdown_mb() -> dict[str, float]:
    """RSS split (Linux /proc/self/status): anonymous (heap, stacks) vs file-backed (code) vs shared memory."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[key.removeprefix("Rss").lower() + "_mb"] = round(int(value.split()[0]) / 1024, 2)
                elif key == "Threads":  # native threads too: each may get its own glibc arena
                    out["threads"] = int(value)
    except (OSError, ValueError, IndexError):
        pass
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def _has_malloc_trim() -> bool:
    libc = _libc()
    return libc is not None and hasattr(libc, "malloc_trim")


def malloc_stats() -> dict[str, float] | None:
    """glibc's heap, in MB: bytes live in malloc'd blocks (in_use) against free bytes it keeps (free)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return {
        "arena_mb": round(m.arena / 2**20, 2),  # main + thread arenas, sbrk'd/mmap'd for small blocks
        "mmap_mb": round(m.hblkhd / 2**20, 2),  # large blocks mmap'd one by one
        "in_use_mb": round((m.uordblks + m.hblkhd) / 2**20, 2),
        "free_mb": round(m.fordblks / 2**20, 2),
    }


def malloc_trim() -> bool:
    """Give glibc's free heap pages back to the OS, in every arena; True if any were released."""
    return _has_malloc_trim() and bool(_libc().malloc_trim(0))


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def report(top: int = 15, trim: bool = False) -> dict[str, Any]:
    """Memory now, and what grew since the previous report: Python objects by type, allocations by traceback."""
    global _last_snapshot, _last_types
    with _lock:
        gc.collect()
        out: dict[str, Any] = {"rss_mb": round(rss_mb(), 2), **rss_breakdown_mb(), "malloc": malloc_stats()}
        if trim:
            out["malloc_trim"] = malloc_trim()
            out["rss_after_trim_mb"] = round(rss_mb(), 2)
            out["malloc_after_trim"] = malloc_stats()
        types = _type_counts()
        out["gc_objects"] = sum(types.values())
        out["gc_garbage"] = len(gc.garbage)
        try:
            out["asyncio_tasks"] = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop in this thread
            out["asyncio_tasks"] = None
        if _last_types is not None:
            grown = (types - _last_types).most_common(top)
            out["types_grown"] = [[name, n] for name, n in grown]
        _last_types = types
        out["trimmer"] = _trimmer.state() if _trimmer is not None else None
        out["tracemalloc"] = tracemalloc.is_tracing()
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            out["traced_mb"], out["traced_peak_mb"] = round(current / 2**20, 2), round(peak / 2**20, 2)
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
            )
            if _last_snapshot is not None:
                stats = snap.compare_to(_last_snapshot, "traceback")
                out["traced_growth_kb"] = round(sum(s.size_diff for s in stats) / 1024, 1)
                out["top_growth"] = [
                    {
                        "kb": round(s.size_diff / 1024, 1),
                        "blocks": s.count_diff,
                        # allocation site first
                        "traceback": [f"{f.filename}:{f.lineno}" for f in reversed(list(s.traceback))],
                    }
                    for s in stats[:top]
                ]
            _last_snapshot = snap
        return out
