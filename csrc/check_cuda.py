"""Compile-only check of csrc/augment.cu (no GPU needed): `make check-cuda`, run by CI wherever nvcc exists.

It compiles the CUDA translation unit with the same headers and ABI flags that torch.utils.cpp_extension.load
uses on a GPU machine, so CUDA code cannot silently stop building on GPU-less machines. Nothing is linked or run.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    nvcc = shutil.which("nvcc") or os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    if not os.path.exists(nvcc):
        print("check-cuda: nvcc not found; skipped")
        return 0
    includes = cpp_extension.include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
    # a minimal nvcc may lack the library headers (cusparse.h, ...) that ATen's CUDA headers include; the
    # nvidia-* wheels that come with a CUDA build of torch carry them
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    includes += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", os.path.join(HERE, "augment.cu"), "-o", os.path.join(tmp, "augment.cuda.o"),
               "-std=c++20", "-O3", "--use_fast_math", "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               "-DTORCH_EXTENSION_NAME=medssl_augment_cuda", "-D__CUDA_NO_HALF_OPERATORS__",
               "--expt-relaxed-constexpr", "-gencode", "arch=compute_90,code=sm_90",
               *[f"-I{p}" for p in includes]]
        print(" ".join(cmd[:6]), "... (sm_90)")
        r = subprocess.run(cmd)
        if r.returncode:
            print("check-cuda: FAILED to compile csrc/augment.cu", file=sys.stderr)
            return r.returncode
    print("check-cuda: csrc/augment.cu compiles for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
