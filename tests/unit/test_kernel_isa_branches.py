"""engine/kernels/linear.cpp, with its tiles (linear_tiles.h), compiles for CPUs other than this one.
The build is -march=native, so a machine only ever compiles its own CPU's branch of the tiles' #if
ladder (AVX-512 + AVX512-BF16, AVX-512, AVX2 + FMA, none); a branch broken for another CPU fails
every kernel there (they are one module), and the engines lose attention and the decode step as
well as the GEMM. This compiles the file (syntax and template instantiation, no code generated) for
a CPU without AVX2 and one with AVX512-BF16: with this machine's own build, every branch once.
"""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "engine" / "kernels"
CPUS = {"x86-64-v2": "no AVX2 (a QEMU default CPU, pre-Haswell)", "cooperlake": "AVX-512 with AVX512-BF16"}


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the kernels cannot be built here at all")
def test_linear_cpp_compiles_for_other_cpus():
    from torch.utils.cpp_extension import include_paths

    includes = [f"-isystem{p}" for p in include_paths()] + [f"-isystem{sysconfig.get_paths()['include']}"]
    flags = ["-fsyntax-only", "-std=c++20", "-O3", "-ffast-math", "-fopenmp", "-DTORCH_EXTENSION_NAME=isa_check",
             "-DTORCH_API_INCLUDE_EXTENSION_H", *includes]
    runs = {cpu: subprocess.Popen(["g++", f"-march={cpu}", *flags, str(KERNELS / "linear.cpp")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cpu in CPUS}  # both at once: each is ~25 s of parsing torch's headers
    failed = {}
    for cpu, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[f"{cpu} ({CPUS[cpu]})"] = out[-3000:]
    assert not failed, failed
