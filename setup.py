"""Build the moe package: the C core (csrc/) and its NumPy binding (csrc/binding/).

All csrc/**/*.c files go into one extension, moe._C.  The CPU tile kernels are
compiled for several instruction sets (by #pragma in their files) and chosen
at run time, so the build never assumes the build machine's CPU.

The CUDA backend (cuda/*.cu) is compiled by nvcc into a plain shared library
next to it, moe/_moe_cuda.so, which the core loads at run time when it is
there (csrc/runtime/cuda_loader.c): the package installs and works without CUDA.
  MOE_CUDA=0      skip it;  MOE_CUDA=1  a missing nvcc is an error;
  (unset)         build it when nvcc is found (CUDA_HOME, PATH, /usr/local/cuda);
  MOE_CUDA_ARCH   e.g. "80;90" (the default): SASS for each, PTX for the last.
"""
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def c_flags():
    if sys.platform == "win32":
        return ["/O2"]
    # -Wno-psabi: 64-byte vector values pass between static helpers only (the
    # avx512sim set builds them for AVX2); no ABI is crossed.
    flags = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra",
             "-Wno-unused-parameter", "-Wno-psabi"]
    # MOE_SANITIZE=1 builds for AddressSanitizer + UBSan (tests in CI).
    if os.environ.get("MOE_SANITIZE") == "1":
        flags += ["-O1", "-g", "-fno-omit-frame-pointer",
                  "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
    return flags


def link_flags():
    if os.environ.get("MOE_SANITIZE") == "1":
        return ["-fsanitize=address,undefined"]
    return []


# csrc/ by floor: binding/ (the only files that see Python), compose/ (layer, LoRA,
# Soft MoE), ops/ (the public ops and the one backend switch), cpu/ (CPU ops and
# kernels), runtime/ (pool, workspace, status, the CUDA loader).  Includes are
# written from csrc/ ("cpu/kernels.h") or the root ("cuda/moe_cuda.h").
sources = sorted(glob.glob("csrc/**/*.c", recursive=True))
ext = Extension(
    "moe._C",
    sources=sources,
    depends=glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.inc", recursive=True),
    include_dirs=[np.get_include(), "csrc", "."],
    define_macros=[("NPY_TARGET_VERSION", "NPY_1_22_API_VERSION")],
    extra_compile_args=c_flags(),
    extra_link_args=link_flags(),
    libraries=[] if sys.platform == "win32" else ["m", "dl"],
)



def find_nvcc():
    """nvcc from CUDA_HOME, PATH or the toolkit's standard location, or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + \
            [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class BuildExt(build_ext):
    """build_ext, then the CUDA library beside moe._C (see the module docstring)."""

    def run(self):
        super().run()
        self.cuda_lib = self.build_cuda()

    def get_outputs(self):
        outs = super().get_outputs()
        lib = getattr(self, "cuda_lib", None)
        return outs + ([lib] if lib else [])

    def build_cuda(self):
        mode = os.environ.get("MOE_CUDA", "")
        if mode == "0" or sys.platform == "win32" or os.environ.get("MOE_SANITIZE") == "1":
            return None
        nvcc = find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise RuntimeError("MOE_CUDA=1 but nvcc was not found (looked in CUDA_HOME, "
                                   "PATH and /usr/local/cuda/bin)")
            print("moe: nvcc not found, building without CUDA (MOE_CUDA=1 to require it)")
            return None
        archs = [a.strip() for a in os.environ.get("MOE_CUDA_ARCH", "80;90").replace(
            ",", ";").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        objs = []
        for src in sorted(glob.glob("cuda/*.cu")):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                   "-Icuda", "-Icsrc", "-c", src, "-o", obj] + gencode
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objs.append(obj)
        target_dir = os.path.dirname(self.get_ext_fullpath("moe._C"))
        os.makedirs(target_dir, exist_ok=True)
        lib = os.path.join(target_dir, "_moe_cuda.so")
        cmd = [nvcc, "-shared", "-o", lib] + objs + ["-cudart", "static"]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        return lib


setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
