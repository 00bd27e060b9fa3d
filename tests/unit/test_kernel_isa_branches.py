"""engine/kernels/linear.cpp, with its tiles (linear_tiles.h), paged_attention.cpp and pointwise.cpp
compile for CPUs other than this one. The build is -march=native, so a machine only ever compiles
its own CPU's branch of the tiles' #if ladder (AVX512-FP16, AVX-512 + AVX512-BF16, AVX-512, AVX2 +
FMA, none), of the attention's (its tiles; bf16 prompt attention on VDPBF16PS, or not) and of SiLU's
bf16 widening (AVX-512 or not); a branch broken for another CPU fails every kernel there (they are
one module), and the engines lose attention and the decode step as well as the GEMM. This compiles the three files
(to object code, unoptimized, thrown away) for a CPU without AVX2, one with AVX2
and no AVX-512, one with AVX512-BF16 and one with AVX512-FP16: every branch, whatever this machine's
own build takes.
"""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "engine" / "kernels"
SOURCES = ("linear.cpp", "paged_attention.cpp", "pointwise.cpp")  # the files with #if branches by CPU
CPUS = {"x86-64-v2": "no AVX2 (a QEMU default CPU, pre-Haswell)", "haswell": "AVX2 + FMA, no AVX-512",
        "cooperlake": "AVX-512 with AVX512-BF16",
        "sapphirerapids": "AVX512-FP16 too (the float32 prefill tiles, bf16 on widened weights)"}


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the kernels cannot be built here at all")
def test_the_kernels_compile_for_other_cpus():
    from torch.utils.cpp_extension import include_paths

    includes = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
    # code generated (-O0: quick), not -fsyntax-only: an intrinsic of an ISA extension the -march
    # lacks only fails where GCC inlines it, which -fsyntax-only never does (an AVX512-VL store in the
    # AVX512-FP16 branch passed it for -march=x86-64-v3 -mavx512f -mavx512fp16, a CPU with FP16 and no
    # VL; the CPUs below all have VL, so this catches such a slip in the branches they take)
    flags = ["-c", "-o", "/dev/null", "-std=c++20", "-O0", "-ffast-math", "-fopenmp", *includes]
    failed = {}
    for source in SOURCES:  # a file's compiles at once, one per CPU, each ~5-8 s
        runs = {cpu: subprocess.Popen(["g++", f"-march={cpu}", *flags, str(KERNELS / source)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for cpu in CPUS}
        try:
            for cpu, proc in runs.items():
                out, _ = proc.communicate(timeout=300)
                if proc.returncode != 0:
                    failed[f"{source} for {cpu} ({CPUS[cpu]})"] = out[-3000:]
        finally:  # a compile that timed out, and the one beside it
            for proc in runs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert not failed, failed
