"""Does an edit of the CUDA W4A16 source change the code of its existing specializations? (no GPU)

Compiles ``compress/kernels/cuda/w4a16.cu`` (with ``common.cuh``, as ``cuda_w4a16`` does) from the
working tree and from a git revision to PTX for sm_90 with nvcc, for a set of specializations
(plain, RMSNorm + SiLU-gate in bf16, residual, per-channel, dequantize; four configs), and reports
whether each pair is identical. Defines the older source does not know (new switches) are set to 0
in the tree's build, so "identical" means the edit left the existing kernels as they were and their
GPU measurements still stand. Needs nvcc (a CUDA toolkit, or the ``nvidia-cuda-nvcc``, ``nvidia-cuda-crt`` and
``nvidia-nvvm`` wheels as on the development machine: nvcc 13.0), no GPU.

    python bench/probes/ptx_diff.py --base 30e0e92
    python bench/probes/ptx_diff.py --switches     # the tree's switch-on builds: do they compile, registers
    python bench/probes/ptx_diff.py --switches --arch sm_80   # the same for another GPU generation

``--switches`` compiles the tree's source with the switches off and with each combination on
(``TILED``, ``SZT``, ``EVF``) for the same specializations to sm_90 cubins and prints ptxas's
register count and spill bytes.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ("compress/kernels/cuda/common.cuh", "compress/kernels/cuda/w4a16.cu")
NEW_SWITCHES = {"TILED": 0, "SZT": 0, "EVF": 0}  # off: the layout before session 10
ARCH = ["sm_90"]  # --arch: the GPU generation compiled for (one element, set by main)

CONFIGS = [(2, 4, 2, 2, 0), (1, 2, 2, 2, 1), (1, 8, 4, 1, 0), (2, 2, 2, 1, 1)]  # (nt, kw, stages, kc, minb)
VARIANTS = {
    "plain fp16 g128": dict(NORM=0, EPI=0, RESID=0, DEQUANT=0, BF16=0, MROWS2=0, SYMMETRIC=0, GCH=4, SCALE_AFTER=1,
                            HAS_BIAS=0),
    "norm+silu bf16 g32": dict(NORM=1, EPI=1, RESID=0, DEQUANT=0, BF16=1, MROWS2=1, SYMMETRIC=1, GCH=1,
                               SCALE_AFTER=0, HAS_BIAS=1),
    "residual per-channel": dict(NORM=0, EPI=0, RESID=1, DEQUANT=0, BF16=0, MROWS2=1, SYMMETRIC=0, GCH=1 << 30,
                                 SCALE_AFTER=1, HAS_BIAS=1),
    "dequantize": dict(NORM=0, EPI=0, RESID=0, DEQUANT=1, BF16=0, MROWS2=0, SYMMETRIC=0, GCH=4, SCALE_AFTER=1,
                       HAS_BIAS=0),
}


def source_at(rev: str | None) -> str:
    if rev is None:
        return "".join((ROOT / f).read_text() for f in FILES)
    parts = []
    for f in FILES:  # common.cuh is younger than w4a16.cu: a revision without it has its own copies
        r = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{f}"], capture_output=True, text=True)
        if r.returncode and f != FILES[-1]:
            continue
        r.check_returncode()
        parts.append(r.stdout)
    return "".join(parts)


def ptx(nvcc: str, src: str, defines: dict[str, int], tmp: Path) -> str:
    cu, out = tmp / "k.cu", tmp / "k.ptx"
    cu.write_text("".join(f"#define {k} {v}\n" for k, v in defines.items()) + src)
    r = subprocess.run([nvcc, f"-arch={ARCH[0]}", "-ptx", "-o", str(out), str(cu)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nvcc failed for {defines}: {r.stderr[-2000:]}")
    return re.sub(r"^//.*$", "", out.read_text(), flags=re.M)  # drop the compiler's header comments


SWITCH_SETS = [dict(TILED=0, SZT=0, EVF=0), dict(TILED=1, SZT=0, EVF=0), dict(TILED=0, SZT=1, EVF=0), dict(TILED=1, SZT=1, EVF=0),
               dict(TILED=1, SZT=1, EVF=1)]


def registers(nvcc: str, src: str, defines: dict[str, int], tmp: Path) -> int:
    """ptxas's register count for one specialization (raises if it does not compile)."""
    cu, out = tmp / "k.cu", tmp / "k.cubin"
    cu.write_text("".join(f"#define {k} {v}\n" for k, v in defines.items()) + src)
    r = subprocess.run([nvcc, f"-arch={ARCH[0]}", "-cubin", "-Xptxas", "-v", "-o", str(out), str(cu)],
                       capture_output=True, text=True)
    found = re.findall(r"Used (\d+) registers", r.stderr)
    if r.returncode or not found:
        raise RuntimeError(f"nvcc failed for {defines}: {r.stderr[-2000:]}")
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr))
    if spills:
        print(f"  spills {spills} bytes: {defines}", flush=True)
    return int(found[-1])


def switches(nvcc: str) -> int:
    src = source_at(None)
    counts = []
    with tempfile.TemporaryDirectory() as d:
        for nt, kw, stages, kc, minb in CONFIGS:
            for name, extra in VARIANTS.items():
                base = dict(NT=nt, KW=kw, STAGES=stages, KC=kc, MINB=minb, CHUNK_COLS=32, **extra)
                regs = [registers(nvcc, src, {**base, **sw}, Path(d)) for sw in SWITCH_SETS]
                counts += regs
                print(f"{str((nt, kw, stages, kc, minb)):18} {name:22} registers " + " ".join(map(str, regs)), flush=True)
    on = [c for i, c in enumerate(counts) if i % len(SWITCH_SETS)]
    print(f"{len(on)} switch-on builds compiled, {min(on)}-{max(on)} registers "
          "(columns: off / tiled / szt / both / both+evf)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="git revision to compare the working tree's source with")
    ap.add_argument("--switches", action="store_true", help="compile the switch-on builds instead")
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    ap.add_argument("--arch", default="sm_90", help="GPU generation to compile for (e.g. sm_80, sm_86, sm_89)")
    args = ap.parse_args(argv)
    ARCH[0] = args.arch
    if not args.nvcc:
        print("ptx_diff needs nvcc (a CUDA toolkit, or the nvidia-cuda-nvcc, nvidia-cuda-crt and nvidia-nvvm "
              "wheels)", file=sys.stderr)
        return 2
    if args.switches:
        return switches(args.nvcc)
    if not args.base:
        ap.error("give --base REV (or --switches)")
    old, new = source_at(args.base), source_at(None)
    differ = 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for nt, kw, stages, kc, minb in CONFIGS:
            for name, extra in VARIANTS.items():
                base = dict(NT=nt, KW=kw, STAGES=stages, KC=kc, MINB=minb, CHUNK_COLS=32, **extra)
                same = ptx(args.nvcc, old, base, tmp) == ptx(args.nvcc, new, {**base, **NEW_SWITCHES}, tmp)
                differ += not same
                print(f"{str((nt, kw, stages, kc, minb)):18} {name:22} {'identical' if same else 'DIFFERENT'}",
                      flush=True)
    total = len(CONFIGS) * len(VARIANTS)
    print(f"{total - differ} of {total} specializations identical to {args.base}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
