"""How service processes take memory from the kernel. On this project's VMs a page faulted in for
the first time is expensive, and with numpy's huge-page advice more so (a fresh 256 MiB numpy
array filled at 0.17 GB/s with it, 2.1 GB/s without):
- every service starts with numpy's huge-page advice off (common.service.main), before numpy loads;
- a cache store keeps the memory of dropped replicas for the next ones (keep_freed_memory), where
  glibc's defaults handed it back and the next replicas faulted it in again.
Both checked in a process of their own: they change process-wide state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter, the two settings tested unset unless given; its stdout."""
    base = {k: v for k, v in os.environ.items()  # and nothing else that changes what is measured
            if k not in ("NUMPY_MADVISE_HUGEPAGE", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "GLIBC_TUNABLES")
            and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         env={**base, **env}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_a_service_starts_with_numpy_huge_page_advice_off():
    # main() as `python -m cache_store` runs it, up to serving: the app is built (its modules import
    # numpy), then run() reports what numpy and OpenMP were told instead of binding a port
    code = """
        import os
        from common import service
        from common.protocol import ServiceKind
        from common.settings import CacheStoreSettings

        def report(app, settings, kind):
            import numpy
            core = numpy._core if hasattr(numpy, "_core") else numpy.core  # numpy 2, 1
            print(core.multiarray._get_madvise_hugepage(), os.environ["GOMP_SPINCOUNT"])

        service.run = report
        service.main(ServiceKind.CACHE_STORE, CacheStoreSettings, "a cache store", "cache_store.app:create_app", argv=[])
    """
    assert run(code) == "False 10000"
    assert run(code, NUMPY_MADVISE_HUGEPAGE="1") == "True 10000"  # an explicit setting wins


FAULTS_OF_A_ROUND = """
    import os, resource
    import numpy as np
    from common.service import keep_freed_memory

    kept = repr(keep_freed_memory(1 << 30)) if os.environ["MODE"] == "keep" else None

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def round_of_replicas():  # 16 replicas of 8 MiB received and held, then dropped together
        held = []
        for _ in range(16):
            a = np.empty(8 << 20, dtype=np.uint8)
            a.fill(1)
            held.append(a)
        del held[:]

    round_of_replicas()
    before = faults()
    round_of_replicas()
    print(kept, faults() - before)
"""


def thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.skipif(thp_always(), reason="huge pages for every mapping: a round faults few pages either way")
def test_a_cache_store_reuses_the_memory_of_dropped_replicas():
    pages = (16 * (8 << 20)) // 4096  # a second round in fresh memory faults in every page again
    kept, faults = run(FAULTS_OF_A_ROUND, NUMPY_MADVISE_HUGEPAGE="0", MODE="keep").split()
    default_kept, default_faults = run(FAULTS_OF_A_ROUND, NUMPY_MADVISE_HUGEPAGE="0", MODE="").split()
    assert kept == "''" and default_kept == "None"
    assert int(default_faults) > pages / 2, "glibc's defaults no longer hand the memory back: this test shows nothing"
    assert int(faults) < pages / 20
