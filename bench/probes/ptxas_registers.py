"""Registers and spills of the CUDA W4A16 kernel's variants, from NVRTC + ptxas (no GPU needed).

Compiles each config / fusion of ``cuda_w4a16._SOURCE`` with ``--ptxas-options=-v`` through the
NVRTC library of the ``nvidia-cuda-nvrtc`` wheel and prints ptxas's register and spill counts: what
decides how many warps a multiprocessor holds (docs/design/experiments.md, "Fused decoder blocks").

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux_2_17_x86_64 "nvidia-cuda-nvrtc>=13" -d /tmp/nvrtc
    (cd /tmp/nvrtc && python -m zipfile -e nvidia_cuda_nvrtc-*.whl .)
    python bench/probes/ptxas_registers.py --nvrtc /tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13
"""
from __future__ import annotations

import argparse
import ctypes
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: compress and bench.*

from compress.kernels import cuda_w4a16 as cw  # noqa: E402

CONFIGS = [cw.CudaConfig(1, 8, 2, 2), cw.CudaConfig(1, 2, 2, 2, 1), cw.CudaConfig(2, 8, 2, 2),
           cw.CudaConfig(1, 4, 2, 1), cw.CudaConfig(2, 4, 4, 1, 1)]
FUSIONS = {"plain": (False, False, False), "norm": (True, False, False), "norm+silu": (True, True, False),
           "residual": (False, False, True)}


def ptxas_report(lib: ctypes.CDLL, src: str, arch: str) -> str:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"w4a16.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"-default-device", b"--std=c++17", b"--ptxas-options=-v"]
    res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if res:
        raise RuntimeError(f"NVRTC failed ({res}):\n{log.value.decode()[:2000]}")
    return log.value.decode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvrtc", required=True, help="path of libnvrtc.so")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args(argv)
    lib = ctypes.CDLL(args.nvrtc)
    print(f"{'nt kw st kc minb':>16} {'rows':>5} " + " ".join(f"{f:>16}" for f in FUSIONS) + "   (registers / spill bytes)")
    for cfg in CONFIGS:
        for mrows2 in (False, True):
            cells = []
            for fusion in FUSIONS.values():
                defines = cw._defines(cfg, False, 4, False, False, mrows2, fusion=fusion)
                log = ptxas_report(lib, "".join(f"#define {k} {v}\n" for k, v in defines) + cw._SOURCE, args.arch)
                regs = re.search(r"Used (\d+) registers", log).group(1)
                spill = re.search(r"(\d+) bytes spill stores", log).group(1)
                cells.append(f"{regs} / {spill}")
            name = f"{cfg.nt} {cfg.kw} {cfg.stages} {cfg.kc} {cfg.minb}"
            print(f"{name:>16} {'9-16' if mrows2 else '1-8':>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
