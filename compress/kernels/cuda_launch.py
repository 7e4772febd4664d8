"""Launching NVRTC-compiled kernels through the CUDA driver API from Python (ctypes).

Why not ``torch.cuda._compile_kernel``'s own call: it builds its argument array on every call and
has no launch attributes. ``Launcher`` builds the argument array once per layer and config and can
launch with programmatic dependent launch (``cuLaunchKernelEx`` with the programmatic-stream-
serialization attribute; the kernel side is ``griddepcontrol``, see ``cuda_w4a16``). Launches go to
the current stream, so CUDA graphs capture them like any other kernel.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch


_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID in cuda.h
_FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute in cuda.h
DEFAULT_SHARED_BYTES = 48 * 1024  # shared memory a block may use without opting in (any GPU)


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def cuda_source(name: str) -> str:
    """The CUDA source ``cuda/<name>`` with ``cuda/common.cuh`` (types, PDL macros, conversions)
    in front; the caller prepends its specialization's #defines."""
    folder = Path(__file__).parent / "cuda"
    return (folder / "common.cuh").read_text() + (folder / name).read_text()


@functools.lru_cache(maxsize=1)
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [
        ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernel.restype = ctypes.c_int
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuFuncSetAttribute.restype = ctypes.c_int
    return lib


def pdl_supported(device: torch.device | str) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 (Hopper) or newer."""
    return torch.cuda.get_device_capability(torch.device(device)) >= (9, 0)


class Launcher:
    """One kernel with its launch geometry and a ctypes argument array built once: a call only
    rewrites the pointers and sizes that change (eager decode spends its time on the host, so
    building eleven ctypes objects per layer and token mattered). ``pdl``: launch with the
    programmatic-stream-serialization attribute (``cuLaunchKernelEx``) so that the kernel's weight
    copies overlap the previous kernel's tail (see GRID_WAIT in the source). ``shared``: bytes of
    dynamic shared memory per block (above 48 KB the function is opted in once, here). Not
    thread-safe: one launcher per layer, called from one thread."""

    def __init__(self, kernel: Any, grid: tuple[int, int], block: int, args: list[Any], pdl: bool,
                 shared: int = 0):
        self.func = kernel.func
        self.grid = grid
        self.block = block
        self.shared = shared
        if shared > DEFAULT_SHARED_BYTES:
            res = _libcuda().cuFuncSetAttribute(self.func, _FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared)
            if res != 0:
                raise RuntimeError(f"cuFuncSetAttribute(max dynamic shared memory = {shared}) failed with "
                                   f"CUresult {res}")
        self.holders = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
                        else ctypes.c_void_p(None) if a is None
                        else ctypes.c_float(a) if isinstance(a, float) else ctypes.c_int(a) for a in args]
        self.params = (ctypes.c_void_p * len(self.holders))(*[ctypes.addressof(h) for h in self.holders])
        self.pdl = pdl
        # The first launch is a plain one: the weight's tensors may have been written by the kernel
        # just before (repacking, the scales' dtype conversion), and a PDL launch reads them before
        # its GRID_WAIT.
        self.launched = False
        if pdl:
            self.attr = _LaunchAttribute(id=_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
            self.config = _LaunchConfig(gridDimX=grid[0], gridDimY=grid[1], gridDimZ=1, blockDimX=block,
                                        blockDimY=1, blockDimZ=1, sharedMemBytes=shared,
                                        attrs=ctypes.pointer(self.attr), numAttrs=1)

    def set(self, i: int, value: int | float) -> None:
        self.holders[i].value = value

    def __call__(self, stream: int) -> None:
        lib = _libcuda()
        if self.pdl and self.launched:
            self.config.hStream = stream
            res = lib.cuLaunchKernelEx(ctypes.byref(self.config), self.func, self.params, None)
        else:
            res = lib.cuLaunchKernel(self.func, self.grid[0], self.grid[1], 1, self.block, 1, 1, self.shared,
                                     ctypes.c_void_p(stream), self.params, None)
        if res != 0:
            raise RuntimeError(f"cuLaunchKernel{'Ex' if self.pdl else ''} failed with CUresult {res}")
        self.launched = True


def launch(kernel: Any, grid: int | tuple[int, int], block: int, args: list[Any],
           device: torch.device) -> None:
    """cuLaunchKernel on the current stream (captured by CUDA graphs like any launch)."""
    gx, gy = (grid, 1) if isinstance(grid, int) else grid
    Launcher(kernel, (gx, gy), block, args, pdl=False)(torch.cuda.current_stream(device).cuda_stream)
