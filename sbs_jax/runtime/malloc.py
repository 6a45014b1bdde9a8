"""Run a command-line job on tcmalloc (or jemalloc) when one is installed.

XLA:CPU takes every step's temporaries (GBs for a T5 train step) from the C allocator. glibc
returns blocks that large to the kernel after each step, so the next step page-faults them in
again; tcmalloc keeps them for the next step (compare with SBS_MALLOC=system). TPU VM and GPU
images preload tcmalloc for the same reason.
An allocator has to be chosen before the process starts, so the entry points re-execute
themselves once with it in LD_PRELOAD.

SBS_MALLOC selects: `auto` (default: the first of `CANDIDATES` found in the usual library
folders, else the system allocator), `system` (never preload), or a library's path. With
tcmalloc, TCMALLOC_RELEASE_RATE defaults to 0: a training job's working set recurs every step.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "SBS_MALLOC"
_DONE_VAR = "SBS_MALLOC_PRELOADED"
CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")


def find_allocator(library_dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """Path of the first installed library of `CANDIDATES`, or None."""
    for name in CANDIDATES:
        for folder in library_dirs:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def chosen_allocator(environ: dict[str, str] | None = None) -> str | None:
    """The library SBS_MALLOC asks for (None: the system allocator)."""
    choice = (os.environ if environ is None else environ).get(ENV_VAR, "auto").strip()
    if choice == "system":
        return None
    if choice == "auto":
        return find_allocator()
    if not os.path.isfile(choice):
        raise FileNotFoundError(
            f"{ENV_VAR}={choice!r}: no such library (use 'auto', 'system' or a .so path)")
    return choice


def ensure_preloaded() -> None:
    """Re-execute this process (same interpreter, same command line) with the chosen allocator
    in LD_PRELOAD. Call first thing in a command-line `main`; a no-op when nothing is chosen,
    when it is already preloaded, or on the re-executed run."""
    if os.environ.get(_DONE_VAR) or active_allocator() != "system":
        return
    library = chosen_allocator()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (library, preload) if p))
    if "tcmalloc" in os.path.basename(library):
        # Keep freed pages: by default tcmalloc hands them back to the kernel gradually, and
        # once another allocator-heavy library (PyTorch) shares the process, every step faults
        # its temporaries in again.
        env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    env[_DONE_VAR] = library
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def active_allocator() -> str:
    """The allocator library mapped into this process ('system' when none of ours is)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"
