"""The entry points' choice of C allocator (sbs_jax/runtime/malloc.py)."""

import os
import subprocess
import sys

import pytest

from sbs_jax.runtime import malloc

_PROBE = ("import sys; from sbs_jax.runtime import malloc; malloc.ensure_preloaded(); "
          "print(malloc.active_allocator(), sys.argv[1:])")


def _probe(**env: str) -> str:
    result = subprocess.run([sys.executable, "-c", _PROBE, "--x", "y z"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **env}, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_choice_from_the_environment(tmp_path):
    assert malloc.chosen_allocator({"SBS_MALLOC": "system"}) is None
    with pytest.raises(FileNotFoundError, match="SBS_MALLOC='/no/such/libtcmalloc.so'"):
        malloc.chosen_allocator({"SBS_MALLOC": "/no/such/libtcmalloc.so"})
    assert malloc.find_allocator((str(tmp_path),)) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert malloc.find_allocator((str(tmp_path),)) == str(tmp_path / "libtcmalloc_minimal.so.4")


def test_system_leaves_the_process_alone():
    assert _probe(SBS_MALLOC="system") == "system ['--x', 'y z']"


@pytest.mark.skipif(malloc.find_allocator() is None, reason="no tcmalloc/jemalloc installed")
def test_the_process_reruns_once_on_the_installed_allocator():
    name = "tcmalloc" if "tcmalloc" in malloc.find_allocator() else "jemalloc"
    assert _probe(SBS_MALLOC="auto") == f"{name} ['--x', 'y z']"
    assert _probe(SBS_MALLOC=malloc.find_allocator()) == f"{name} ['--x', 'y z']"
