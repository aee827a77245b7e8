"""Freed memory kept for the next tensors: a large tensor allocated after a larger one was freed takes its memory
instead of a fresh mapping faulted in page by page. Each case runs in its own process, so that the settings do
not reach the rest of the suite."""

import subprocess
import sys

import pytest

# Frees a 256 MB tensor, then prints the minor page faults of filling a 192 MB one. (A request of the very same
# size need not fit the freed block: torch's aligned allocation asks glibc for a little more.)
_SCRIPT = """
import resource, sys, torch
from metaspo_hf.models.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(64 * 1024 * 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(48 * 1024 * 1024)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 192 * 1024 * 1024 // 4096


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_large_tensor_is_reused_instead_of_faulted_in_again():
    kept, faults = _faults("keep")
    if kept != "True":
        pytest.skip("not glibc: the settings do not apply")
    _, faults_by_default = _faults("default")
    assert faults_by_default > PAGES // 2  # a fresh mapping: every page faulted in (what the settings remove)
    assert faults < PAGES // 20
