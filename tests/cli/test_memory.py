"""cli.memory: large tensors freed and made again reuse mapped pages instead of faulting in fresh ones."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cli.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# A 256 MB tensor made, filled and freed, then a 192 MB one: page faults of the second (49,152 pages of 4 KiB).
_CHILD = """
import json, resource, sys, torch
from cli.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
def faults(megabytes):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(megabytes * 1024 * 1024 // 4)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(256)
print(json.dumps({"applied": applied, "faults": faults(192)}))
"""

def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


# Fault counts assume 4 KiB pages: with transparent huge pages always on, a 192 MB block is ~100 faults either way.
glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or _huge_pages_always(),
                                reason="mallopt settings are glibc's; fault counts need 4 KiB pages")


def _second_round(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_freed_large_tensor_is_reused_without_page_faults():
    default = _second_round("off")
    kept = _second_round("on")
    assert kept["applied"] is True
    assert default["faults"] > 40_000  # glibc's default: mmap'd afresh, every page faulted in again
    assert kept["faults"] < 5_000


@glibc_only
def test_fmprobe_system_malloc_leaves_the_defaults():
    result = _second_round("on", FMPROBE_SYSTEM_MALLOC="1")
    assert result["applied"] is False
    assert result["faults"] > 40_000


def test_trim_threshold_must_fit_a_c_int():
    with pytest.raises(ValueError, match="C int"):
        keep_freed_memory(trim_threshold=1 << 40)


def test_probe_py_applies_it_as_a_command_only():
    source = (ROOT / "probe.py").read_text()
    script_block = source[source.index('if __name__ == "__main__":'):]
    assert "keep_freed_memory()" in script_block and "keep_freed_memory()" not in source.replace(script_block, "")
