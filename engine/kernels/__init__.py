"""Kernels we compile ourselves, once per machine, on first use (torch's C++ extension builder and
ninja; cached under $TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default; `python -m
engine.kernels` builds them ahead, as scripts/install.sh does). A loader returns None when its
kernel cannot be had (no compiler, a failed build): the caller then takes its PyTorch path, which
computes the same thing, slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # fast-math: vector exp (glibc libmvec); OpenMP: parallel.h


SOURCES = ("paged_attention.cpp", "pointwise.cpp", "linear.cpp", "decode.cpp", "bind.cpp")
# not compiled on their own, but a change to one builds anew
HEADERS = ("parallel.h", "silu.h", "linear_tiles.h", "tensor.h", "kernels.h", "decode.h")


@functools.cache
def paged_attention():
    """The module of our CPU kernels: attention (`paged_decode_attention`, `causal_attention`, in
    paged_attention.cpp) and a layer's fused small ops (`rms_norm`, `add_rms_norm`, `rope_`,
    `silu_and_mul`, in pointwise.cpp), the GEMM of the linears (`pack_linear`, `linear`, in
    linear.cpp; `pack_gate_up`, `gate_up_order` and `linear_silu_mul` for an MLP's gate/up with its
    activation) and a decode step's layers in one call (`DecodeStack`, in decode.cpp), bound to
    Python in bind.cpp, built for this CPU (-march=native: its name hashes the CPU's flags, the
    sources and where they live, so another CPU, an edited source or another checkout builds
    anew); or None."""
    try:
        from torch.utils.cpp_extension import load

        sources = [HERE / name for name in SOURCES]
        # the path too: ninja rebuilds a build folder whose source moved, so each checkout keeps its own
        key = b"".join(s.read_bytes() + str(s).encode() for s in sources + [HERE / h for h in HEADERS]) + " ".join(FLAGS).encode() + _cpu_flags().encode()
        tag = hashlib.sha256(key).hexdigest()[:12]
        name = f"dejavu_paged_attention_{tag}"
        start = time.monotonic()
        with building(Path(_build_directory(name))):
            module = load(name, [str(s) for s in sources], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
        log.info("CPU kernels ready (%.1f s)", time.monotonic() - start)
        return module
    except Exception as exc:  # noqa: BLE001 - any build problem: the PyTorch path still works
        log.warning("CPU kernels unavailable: attention runs through SDPA (decode gathers the KV for it) and "
                    "a layer's small ops through PyTorch, slower: %s: %s", type(exc).__name__, exc)
        return None


@contextlib.contextmanager
def building(folder: Path):
    """Hold the build of the extension in `folder` for this process.

    torch's own build lock is a file made with O_EXCL (`folder/lock`): a build killed midway
    (SIGTERM or SIGKILL to a service or scripts/install.sh while it compiled, the OOM killer) leaves
    it behind, and every later load waits on it forever. Ours is an flock, which the kernel drops
    when its holder dies. Every build of ours takes it before torch's, so a torch lock found while
    we hold ours was left by a dead build: removed, with a warning. Several processes starting at
    once (`dejavu up`) still build once: the others wait here, then find the build done. Where no
    flock can be had (a file system without it), the build goes on without ours, as before."""
    with contextlib.ExitStack() as held:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fh = held.enter_context(open(folder / "dejavu.flock", "a"))
            fcntl.flock(fh, fcntl.LOCK_EX)  # let go when fh closes, or when this process dies
        except OSError as exc:
            log.warning("no build lock in %s (%s): building without it", folder, exc)
        else:
            stale = folder / "lock"
            if stale.exists():
                log.warning("removing %s, left by a kernel build that was killed midway", stale)
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
        yield


def _build_directory(name: str) -> str:
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, verbose=False)  # where load() builds (private, in torch since 1.x)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return ""

