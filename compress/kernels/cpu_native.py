"""CPU INT4 (and INT8) path of our own: a C kernel (``cpu/int4_gemv.c``) compiled once per machine at run time.

Why not only torch's ``_weight_int4pack_mm_for_cpu`` (``cpu_int4``): it computes in bf16, so every call
converts activations to bf16 and the result back, and on AVX2-only CPUs it was slower than the fp32
GEMV it replaces (docs/design/cpu-kernels.md). This kernel reads fp32 activations, accumulates in fp32, fuses
the act-order gather, the zero points and the bias, and unpacks codes with 3 vector ops per 16
weights on AVX-512 (the C file says how); AVX2 and plain C variants compile elsewhere.

Build: the host's C compiler (``$CC``, else ``cc``/``gcc``) with ``-O3 -march=native -fopenmp``; the
library is cached under ``$COMPRESS_CACHE/kernels`` (default ``~/.cache/compress``) keyed by the
source, compiler, flags and CPU, and written atomically. OpenMP: the library links ``libgomp.so.1``,
which is the runtime torch's CPU build already loaded, so both share one thread pool; the kernel
runs ``torch.get_num_threads()`` threads. No compiler, or a failed build: ``available()`` says why and
callers use torch's kernel instead.

Layout (``repack``): columns sorted by group (``layout.contiguous_group_order``); rows padded to a
multiple of 16 and taken 16 at a time, one 8-byte chunk per column holding those rows' codes in the
order the compiled ISA unpacks (``c4_pack``), so the kernel computes 16 outputs per vector without
horizontal sums; fp32 scales and zero-point terms as 16-float vectors per row block and group.
Groups must be a multiple of 16 columns. Codes of fewer than 4 bits run unchanged; codes of 5 to 8
bits are packed one byte each (16-byte chunks), so W8 layers and a runtime INT8 lm_head
(``compress.kernels.lm_head``) run on the same kernel.

Prefill-sized inputs take ``dense_matmul`` (blocks of the weight dequantized just before their GEMM);
``dispatch`` picks by row count. Under ``torch.compile`` the installed forward is the custom op
``compress::cpu_int4_linear`` (``ops.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from compress.kernels import layout

log = logging.getLogger(__name__)

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
                log.info("building the CPU INT4 kernel (once per machine and -march=%s): %s", march, path)
                _build(cc, path, march, openmp)
            lib = ctypes.CDLL(str(path))
            break
        except (NativeUnavailable, OSError) as e:
            errors.append(str(e))
    else:
        raise NativeUnavailable("; ".join(errors))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.c4_isa.restype = ctypes.c_int
    cint = ctypes.c_int
    lib.c4_pack.argtypes = [ptr, ptr, i64, i64, cint]
    lib.c4_pack.restype = None
    lib.c4_unpack.argtypes = [ptr, ptr, i64, i64, cint]
    lib.c4_unpack.restype = None
    lib.c4_zero_term.argtypes = [ptr, ptr, ptr, i64, cint]
    lib.c4_zero_term.restype = None
    lib.c4_dequant_t.argtypes = [ptr, ptr, ptr, i64, i64, i64, ptr, i64, cint, cint]
    lib.c4_dequant_t.restype = None
    lib.c4_gemm.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, cint, cint]
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


def code_width(bits: int) -> int:
    """The packed width of ``bits``-bit codes: 4 (nibbles) up to 4 bits, else 8 (bytes)."""
    return 4 if bits <= 4 else 8


def unsupported_reason(bits: int, in_features: int, group: int) -> str | None:
    """Why a layer cannot run on this path, or None. ``group`` is the contiguous group width."""
    if bits > 8:
        return f"{bits}-bit codes (the C kernel takes at most 8)"
    if group % CHUNK or in_features % CHUNK:
        return f"group of {group} columns is not a multiple of {CHUNK}"
    return None


@dataclass
class NativeInt4Weight:
    """A layer packed for the C kernel. Rows are padded to a multiple of 16 (``rows``); scales and
    zero-point terms are stored per block of 16 rows and group (``sc``, ``cz``: [rows / 16, groups, 16]).
    Codes of up to 4 bits are packed as nibbles, 5 to 8 bits as bytes (``code_bits``)."""

    packed: torch.Tensor  # uint8 [rows * K * code_bits / 8]: blocks of 16 rows, one chunk per column
    sc: torch.Tensor  # float32 [rows / 16, K / group, 16]
    cz: torch.Tensor  # float32, same shape: the coefficient of a group's activation sum
    group: int
    perm: torch.Tensor | None  # int64 [K]: sorted column -> original column, or None
    bias: torch.Tensor | None  # float32 [rows] (zero-padded)
    in_features: int
    out_features: int
    lib: ctypes.CDLL  # the library that packed it (the chunk order depends on its ISA)
    code_bits: int = 4  # 4 (nibbles) or 8 (bytes): code_width of the layer's bits

    @property
    def rows(self) -> int:
        return self.sc.shape[0] * 16

    #: c4_gemm's weight arguments: pointers into the tensors above (which this object keeps alive),
    #: computed once because decode passes them ~200 times a token
    args: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.args = (self.in_features, self.packed.data_ptr(), self.sc.data_ptr(), self.cz.data_ptr(),
                     self.rows, self.group, _ptr(self.perm), _ptr(self.bias))

    def restore_codes(self) -> torch.Tensor:
        """The uint8 codes [N, K] in the original column order, exactly as packed."""
        k = self.in_features
        codes = torch.empty(self.rows, k, dtype=torch.uint8)
        self.lib.c4_unpack(self.packed.data_ptr(), codes.data_ptr(), self.rows, k, self.code_bits)
        return layout.original_order(codes[: self.out_features].contiguous(), self.perm)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _blocked(t: torch.Tensor) -> torch.Tensor:
    """[rows, groups] -> [rows / 16, groups, 16] contiguous (the kernel loads 16 rows' values at once)."""
    return t.reshape(-1, 16, t.shape[1]).transpose(1, 2).contiguous()


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
    rows = -(-n // 16) * 16  # padded rows: code 0, scale 0, so they compute 0 and are cut off
    cbits = code_width(bits)
    codes = _pad_rows(layout.ordered_codes(qweight, order).to(device="cpu", dtype=torch.uint8), rows).contiguous()
    packed = torch.empty(rows * k * cbits // 8, dtype=torch.uint8)
    lib.c4_pack(codes.data_ptr(), packed.data_ptr(), rows, k, cbits)
    s = _pad_rows(scales.detach().to(device="cpu", dtype=torch.float32), rows)
    sz = s * _pad_rows(zeros.detach().to(device="cpu", dtype=torch.float32), rows)
    sc, szb = _blocked(s), _blocked(sz)
    cz = torch.empty_like(sc)
    lib.c4_zero_term(sc.data_ptr(), szb.data_ptr(), cz.data_ptr(), sc.numel(), cbits)
    return NativeInt4Weight(
        packed=packed, sc=sc, cz=cz, group=order.group_size,
        perm=None if order.perm is None else order.perm.to(torch.int64).contiguous(),
        bias=None if bias is None else _pad_rows(bias.detach().to(device="cpu", dtype=torch.float32), rows).contiguous(),
        in_features=k, out_features=n, lib=lib, code_bits=cbits)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cut(y: torch.Tensor, n: int) -> torch.Tensor:
    """Drop the padded output columns (rows of W past out_features, a multiple of 16)."""
    return y if y.shape[-1] == n else y[..., :n].contiguous()


def matmul(x: torch.Tensor, wt: NativeInt4Weight) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x [..., K] of any float dtype, computed in fp32; returns x's dtype."""
    # decode calls this ~200 times a token, so the host work is kept to a few tensor calls: the
    # weight's pointers are computed once (wt.args) and the output is allocated in its final shape
    k, packed, sc, cz, rows, g, perm, bias = wt.args
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    m = xf.numel() // k
    y = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    if m and wt.lib.c4_gemm(xf.data_ptr(), m, k, packed, sc, cz, rows, g, perm, bias, y.data_ptr(),
                            torch.get_num_threads(), wt.code_bits):
        raise MemoryError("c4_gemm could not allocate its activation scratch")
    y = _cut(y, wt.out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _dequant_t(wt: NativeInt4Weight, r0: int, r: int, out: torch.Tensor) -> None:
    """Rows r0 .. r0 + r (multiples of 16) of the weight, transposed, into out [K, r] (group-sorted
    columns)."""
    _, packed, sc, cz, *_ = wt.args
    ng = wt.in_features // wt.group
    wt.lib.c4_dequant_t(packed + r0 * wt.in_features * wt.code_bits // 8, sc + 4 * r0 * ng, cz + 4 * r0 * ng, r,
                        wt.in_features, wt.group, out.data_ptr(), r, torch.get_num_threads(), wt.code_bits)


def dequantize(wt: NativeInt4Weight, sorted_columns: bool = False) -> torch.Tensor:
    """The float32 weight [N, K]: in the original column order, or with ``sorted_columns`` in the
    packed (group-sorted) order that pairs with ``x[..., wt.perm]``."""
    w_t = torch.empty(wt.in_features, wt.rows, dtype=torch.float32)
    _dequant_t(wt, 0, wt.rows, w_t)
    w = w_t.t()[: wt.out_features].contiguous()
    return w if sorted_columns else layout.original_order(w, wt.perm)


#: Rows per block of ``dense_matmul``: about this many bytes of fp32 weight, dequantized into a
#: buffer that stays in cache just before its GEMM reads it. Dequantizing a whole layer instead wrote
#: (and page-faulted) every fp32 weight to DRAM on every prefill call: 117 ms of a 653 ms SmolLM2
#: prefill of 128 tokens. 4 MB blocks were the fastest of 256 KB / 1 MB / 4 MB / whole layers on an
#: AVX-512 Xeon with 1.25 MB of L2 and 48 MB of L3 per socket, 1 and 2 threads (one-off timings,
#: not kept; docs/design/cpu-kernels.md).
DENSE_BLOCK_BYTES = 1 << 22


class Scratch:
    """A reusable float32 buffer per thread for ``dense_matmul``'s dequantized blocks: a fresh
    multi-MB allocation page-faults on every call (~0.5 ms for a 1536x576 layer). One per model
    (``accelerate`` makes it); per thread, so concurrent forwards never share a buffer."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, numel: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < numel:
            buf = self._local.buf = torch.empty(numel, dtype=torch.float32)
        return buf[:numel]


def dense_matmul(x: torch.Tensor, wt: NativeInt4Weight, dtype: torch.dtype = torch.float32,
                 scratch: Scratch | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` by dense GEMMs over blocks of rows of W, each dequantized (transposed)
    just before its GEMM (prefill-sized x). ``dtype``: float32 (exact) or bfloat16 (weight rounded
    once from the fp32 value, activations rounded, fp32 accumulation in oneDNN). ``scratch``: where
    the blocks go (default: a fresh buffer). Returns x's dtype."""
    k, n = wt.in_features, wt.rows
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if wt.perm is not None:  # the packed columns are in group order
        x2d = x2d.index_select(1, wt.perm)
    xd = x2d.to(dtype)
    rows = min(n, max(16, DENSE_BLOCK_BYTES // (4 * k) // 16 * 16))
    buf = (scratch or Scratch()).get(k * rows)
    bias = None if wt.bias is None else wt.bias.to(dtype)
    y = None if rows >= n else torch.empty(x2d.shape[0], n, dtype=dtype)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        w = buf[: k * r].view(k, r)
        _dequant_t(wt, r0, r, w)
        w = w if dtype == torch.float32 else w.to(dtype)
        if y is None:  # one block (most layers): the GEMM writes the output directly
            y = torch.mm(xd, w) if bias is None else torch.addmm(bias, xd, w)
        else:  # e.g. a large lm_head: GEMM per block, copied into its columns
            y[:, r0:r0 + r] = torch.mm(xd, w) if bias is None else torch.addmm(bias[r0:r0 + r], xd, w)
    return _cut(y.to(x.dtype), wt.out_features).reshape(*lead, wt.out_features)
