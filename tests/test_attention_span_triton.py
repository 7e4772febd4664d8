"""The Triton span decode kernel against the float32 masked reference on fresh random inputs:
on the CPU under TRITON_INTERPRET=1 (in a subprocess, since the flag is read when triton is
imported; skipped where triton is not installed) and on a GPU (marked gpu)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CASES = "[(1, 9, 3, 300, 64, 4, False), (2, 8, 2, 517, 32, 6, True), (3, 4, 4, 100, 16, 5, False)]"

SCRIPT = textwrap.dedent("""
    import torch
    from compress.attention_span import policies as P
    from compress.attention_span.decode import masked_reference
    from compress.attention_span.triton_decode import span_decode
    worst = 0.0
    for b, h, hk, length, bs, m, with_mask in CASES:
        g = torch.Generator(device=DEVICE).manual_seed(length)
        d = 64
        q, k, v = (torch.randn(*s, generator=g, device=DEVICE, dtype=DTYPE) for s in
                   ((b, h, 1, d), (b, hk, length, d), (b, hk, length, d)))
        nb = P.num_blocks(length, bs)
        ids = P.select_blocks(torch.randn(b, hk, nb, generator=g, device=DEVICE), P.forced_blocks(length, bs, 4, bs), m)
        ids[0, 0, -1] = -1  # a padding entry
        mask = None
        if with_mask:
            mask = torch.ones(b, 1, 1, length, dtype=torch.bool, device=DEVICE)
            mask[:, :, :, :5] = False
        for programs in (1, 264):  # one slice per head, and split lists merged
            out = span_decode(q, k, v, ids, bs, d ** -0.5, mask, programs=programs)
            ref = masked_reference(q, k, v, ids, bs, d ** -0.5, mask)
            worst = max(worst, float((out.float() - ref).abs().max()))
    print("max abs err", worst)
    assert worst < TOL, worst
""")


def _run(device: str, dtype: str, tol: float, env: dict) -> str:
    code = f"CASES = {CASES}\nDEVICE = {device!r}\nDTYPE = torch.{dtype}\nTOL = {tol}\n" + SCRIPT
    code = "import torch\n" + code
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    out = _run("cpu", "float32", 1e-5, {"TRITON_INTERPRET": "1"})
    assert "max abs err" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 4e-3), ("bfloat16", 3e-2)])
def test_triton_kernel_on_gpu(dtype, tol):
    pytest.importorskip("triton")
    _run("cuda", dtype, tol, {})
