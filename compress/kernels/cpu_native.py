"""CPU INT4 path of our own: a C kernel (``cpu/int4_gemv.c``) compiled once per machine at run time.

Why not only torch's ``_weight_int4pack_mm_for_cpu`` (``cpu_int4``): it computes in bf16, so every call
converts activations to bf16 and the result back, and on AVX2-only CPUs it was slower than the fp32
GEMV it replaces (docs/kernels.md). This kernel reads fp32 activations, accumulates in fp32, fuses
the act-order gather, the zero points and the bias, and unpacks codes with 3 vector ops per 16
weights on AVX-512 (the C file says how); AVX2 and plain C variants compile elsewhere.

Build: the host's C compiler (``$CC``, else ``cc``/``gcc``) with ``-O3 -march=native -fopenmp``; the
library is cached under ``$COMPRESS_CACHE/kernels`` (default ``~/.cache/compress``) keyed by the
source, compiler, flags and CPU, and written atomically. OpenMP: the library links ``libgomp.so.1``,
which is the runtime torch's CPU build already loaded, so both share one thread pool; the kernel
runs ``torch.get_num_threads()`` threads. No compiler, or a failed build: ``available()`` says why and
callers use torch's kernel instead.

Layout (``repack``): columns sorted by group (``layout.contiguous_group_order``), codes packed two per
byte in 16-code chunks in the order the compiled ISA unpacks (``c4_pack``), fp32 scales and fp32
scale * zero point. Groups must be a multiple of 16 columns. Codes of fewer than 4 bits run unchanged.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from compress.kernels import layout

SOURCE = Path(__file__).with_name("cpu") / "int4_gemv.c"
FLAGS = ("-O3", "-fPIC", "-shared", "-std=c11")
#: -march value: "native" (the CPU it runs on) unless $COMPRESS_CPU_MARCH says otherwise (tests build
#: "x86-64-v3" (AVX2) and "x86-64" (plain C) to check every variant on one machine)
MARCH_ENV = "COMPRESS_CPU_MARCH"
CHUNK = 16  # codes per packed chunk; group widths must be a multiple


class NativeUnavailable(RuntimeError):
    """The C kernel could not be built or loaded on this machine (message says why)."""


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    from compress.default_model import cache_root

    return cache_root() / "kernels"


def _build(cc: str, out: Path, march: str, openmp: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *FLAGS, f"-march={march}", *(["-fopenmp"] if openmp else []), str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise NativeUnavailable(f"{' '.join(cmd)} failed: {res.stderr.strip()[-400:]}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _lib() -> ctypes.CDLL:
    """The kernel library for ``$COMPRESS_CPU_MARCH`` (default native). Raises NativeUnavailable."""
    return load(os.environ.get(MARCH_ENV) or "native")


@lru_cache(maxsize=None)
def load(march: str = "native") -> ctypes.CDLL:
    """Build (once per machine and ``-march``) and load the kernel library. Raises NativeUnavailable."""
    if platform.system() != "Linux":
        raise NativeUnavailable(f"the C kernel is built on Linux only, not {platform.system()}")
    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler found ($CC, cc, gcc or clang)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc} --version failed: {e}") from e
    errors = []
    for openmp in (True, False):  # a compiler without OpenMP still gives a one-thread kernel
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), march, str(openmp),
                                        _cpu_id()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"int4_gemv-{key}.so"
        try:
            if not path.exists():
                _build(cc, path, march, openmp)
            lib = ctypes.CDLL(str(path))
            break
        except (NativeUnavailable, OSError) as e:
            errors.append(str(e))
    else:
        raise NativeUnavailable("; ".join(errors))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.c4_isa.restype = ctypes.c_int
    lib.c4_pack.argtypes = [ptr, ptr, i64, i64]
    lib.c4_pack.restype = None
    lib.c4_unpack.argtypes = [ptr, ptr, i64, i64]
    lib.c4_unpack.restype = None
    lib.c4_dequant.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.c4_dequant.restype = None
    lib.c4_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.c4_gemm.restype = ctypes.c_int
    lib.openmp = openmp
    return lib


def available() -> tuple[bool, str]:
    """(whether the kernel runs here, why not / which variant)."""
    try:
        lib = _lib()
    except NativeUnavailable as e:
        return False, str(e)
    return True, describe(lib)


def describe(lib: ctypes.CDLL | None = None) -> str:
    lib = lib or _lib()
    isa = {512: "AVX-512", 256: "AVX2"}.get(lib.c4_isa(), "plain C")
    return f"compress C kernel ({isa}{', OpenMP' if lib.openmp else ', one thread'}), fp32 activations"


def unsupported_reason(bits: int, in_features: int, group: int) -> str | None:
    """Why a layer cannot run on this path, or None. ``group`` is the contiguous group width."""
    if bits > 4:
        return f"{bits}-bit codes (the C kernel takes at most 4)"
    if group % CHUNK or in_features % CHUNK:
        return f"group of {group} columns is not a multiple of {CHUNK}"
    return None


@dataclass
class NativeInt4Weight:
    packed: torch.Tensor  # uint8 [N, K / 2], chunk order of the compiled ISA
    scales: torch.Tensor  # float32 [N, K / group]
    sz: torch.Tensor  # float32 [N, K / group]: scale * zero point
    group: int
    perm: torch.Tensor | None  # int64 [K]: sorted column -> original column, or None
    bias: torch.Tensor | None  # float32 [N]
    in_features: int
    out_features: int
    lib: ctypes.CDLL  # the library that packed it (the chunk order depends on its ISA)

    @property
    def args(self) -> tuple:
        """c4_gemm's weight arguments (pointers into the tensors above, which this object keeps alive)."""
        cached = self.__dict__.get("_args")
        if cached is None:
            cached = self.__dict__["_args"] = (
                self.in_features, self.packed.data_ptr(), self.scales.data_ptr(), self.sz.data_ptr(),
                self.out_features, self.group, _ptr(self.perm), _ptr(self.bias))
        return cached

    def restore_codes(self) -> torch.Tensor:
        """The uint8 codes [N, K] in the original column order, exactly as packed."""
        n, k = self.out_features, self.in_features
        codes = torch.empty(n, k, dtype=torch.uint8)
        self.lib.c4_unpack(self.packed.data_ptr(), codes.data_ptr(), n, k)
        if self.perm is None:
            return codes
        out = torch.empty_like(codes)
        out[:, self.perm] = codes
        return out


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           bits: int, bias: torch.Tensor | None, lib: ctypes.CDLL | None = None) -> NativeInt4Weight:
    """Pack QuantizedLinear buffers once (for ``lib``, default: this machine's build). Raises
    ValueError when the layer is unsupported and NativeUnavailable when the kernel cannot be built."""
    lib = lib or _lib()
    n, k = qweight.shape
    order = layout.contiguous_group_order(g_idx, scales.shape[1])
    reason = unsupported_reason(bits, k, order.group_size)
    if reason:
        raise ValueError(reason)
    codes = layout.ordered_codes(qweight, order).to(device="cpu", dtype=torch.uint8).contiguous()
    s = scales.detach().to(device="cpu", dtype=torch.float32).contiguous()
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    lib.c4_pack(codes.data_ptr(), packed.data_ptr(), n, k)
    return NativeInt4Weight(
        packed=packed, scales=s, sz=(s * zeros.detach().to(device="cpu", dtype=torch.float32)).contiguous(),
        group=order.group_size,
        perm=None if order.perm is None else order.perm.to(torch.int64).contiguous(),
        bias=None if bias is None else bias.detach().to(torch.float32).contiguous(),
        in_features=k, out_features=n, lib=lib)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def matmul(x: torch.Tensor, wt: NativeInt4Weight) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [..., K] of any float dtype, computed in fp32; returns x's dtype."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, wt.in_features)
    if x2d.dtype != torch.float32 or not x2d.is_contiguous():
        x2d = x2d.to(torch.float32).contiguous()
    y = torch.empty(x2d.shape[0], wt.out_features, dtype=torch.float32)
    k, packed, scales, sz, n, g, perm, bias = wt.args
    # decode calls this ~200 times a token: the weight's pointers are computed once (wt.args)
    if wt.lib.c4_gemm(x2d.data_ptr(), x2d.shape[0], k, packed, scales, sz, n, g, perm, bias, y.data_ptr(),
                      torch.get_num_threads()):
        raise MemoryError("c4_gemm could not allocate its activation scratch")
    y = y.reshape(*lead, wt.out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def dequantize(wt: NativeInt4Weight, sorted_columns: bool = False) -> torch.Tensor:
    """The float32 weight [N, K]: in the original column order, or with ``sorted_columns`` in the
    packed (group-sorted) order that pairs with ``x[..., wt.perm]`` (the dense prefill path: a
    gather of the activations is cheaper than scattering the weight's columns)."""
    w = torch.empty(wt.out_features, wt.in_features, dtype=torch.float32)
    wt.lib.c4_dequant(wt.packed.data_ptr(), wt.scales.data_ptr(), wt.sz.data_ptr(), wt.out_features,
                      wt.in_features, wt.group, w.data_ptr(), torch.get_num_threads())
    if sorted_columns or wt.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, wt.perm] = w
    return out


#: Rows per block of ``dense_matmul``: about this many bytes of fp32 weight, dequantized into a
#: buffer that stays in cache just before its GEMM reads it. Dequantizing a whole layer instead wrote
#: (and page-faulted) every fp32 weight to DRAM on every prefill call: 117 ms of a 653 ms SmolLM2
#: prefill of 128 tokens. 4 MB blocks were the fastest of 256 KB / 1 MB / 4 MB / whole layers on an
#: AVX-512 Xeon with 1.25 MB of L2 and 48 MB of L3 per socket, 1 and 2 threads (docs/kernels.md).
DENSE_BLOCK_BYTES = 1 << 22


def dense_matmul(x: torch.Tensor, wt: NativeInt4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x @ W.T (+ bias)`` by dense GEMMs over blocks of rows of W, each dequantized just before its
    GEMM (prefill-sized x). ``dtype``: float32 (exact) or bfloat16 (weight rounded once from the
    fp32 value, activations rounded, fp32 accumulation in oneDNN). Returns x's dtype."""
    k, n, g = wt.in_features, wt.out_features, wt.group
    ng = k // g
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if wt.perm is not None:  # the packed columns are in group order
        x2d = x2d.index_select(1, wt.perm)
    xd = x2d.to(dtype)
    rows = max(16, min(n, DENSE_BLOCK_BYTES // (4 * k)))
    buf = torch.empty(rows, k, dtype=torch.float32)
    _, packed, scales, sz, *_ = wt.args
    threads = torch.get_num_threads()
    bias = None if wt.bias is None else wt.bias.to(dtype)
    y = None if rows >= n else torch.empty(x2d.shape[0], n, dtype=dtype)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        wt.lib.c4_dequant(packed + r0 * (k // 2), scales + 4 * r0 * ng, sz + 4 * r0 * ng, r, k, g,
                          buf.data_ptr(), threads)
        w = buf[:r] if dtype == torch.float32 else buf[:r].to(dtype)
        if y is None:  # one block (most layers): the GEMM writes the output directly
            y = torch.nn.functional.linear(xd, w, bias)
        else:  # e.g. a large lm_head: GEMM per block, copied into its columns
            y[:, r0:r0 + r] = torch.nn.functional.linear(xd, w, None if bias is None else bias[r0:r0 + r])
    return y.to(x.dtype).reshape(*lead, n)
