"""Operators of a decoder forward as compress's own GPU runtime runs it (``implementation: compress``).

That is a model compiled with ``torch.compile`` (Inductor fuses each elementwise chain into one
kernel, as ``fused`` counts) after ``accelerate()`` and ``attention.install()``, as ``compress
bench --mode compile`` and ``bench/speed/e2e_decode.py --attn compress`` time it (docs/design/dispatch.md):

- quantized linears at decode (up to ``SMALL_M`` rows) run our W4A16 kernel, one launch per
  stacked group: q/k/v as one, gate/up as one (``kernel="w4a16"``); dense linears stay
  transformers' separate cuBLAS products;
- in the blocks the adapter table marks ``decode_block`` (Llama, Mistral, Qwen2/3: RMSNorms and
  a SiLU-gated MLP) the two norms, act(gate)*up and both residual adds run inside those
  launches: no kernels of their own, only the bytes they add (the norm's weight, the residual read);
  gate/up writes the intermediate once;
- more rows (prefill, large batches): each quantized group is dequantized by a kernel of ours
  (codes in, fp16 weight out) and multiplied by cuBLAS (the fp16 weight read again);
- one-token attention runs our decode attention kernel (``kernel="decode_attention"``), which reads
  every slot of a static cache (masked ones too) once per query head; prefill attention is SDPA's
  flash kernel, as in ``fused``;
- everything else (embedding, rotary, cache writes, lm_head, sampling) as ``fused`` counts it.

The dense baseline under this implementation is the compiled model with our decode attention, the
fp16 side of the measured comparison. Each launch of our kernels costs the device's fixed time for
that kernel plus its bytes at the device's fraction for it (``overhead.by_kernel``,
``achievable.by_op``; fitted per device by ``bench/roofline/fit_compress_roofline.py``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from compress.eval import roofline_ops
from compress.eval.roofline_ops import (
    SOFTMAX_FLOPS,
    Op,
    WeightFormat,
    attention,
    elementwise,
    kv_append,
    linear,
    norm,
    rotary,
    weight_bytes,
)
from compress.eval.roofline_shapes import LayerShape, ModelShape

SMALL_M = 16  # activation rows our W4A16 kernel takes in one launch (W4A16Weight.max_small_m)
KERNELS = ("w4a16", "decode_attention")


def projection(name: str, m: int, k: int, n: int, fmt: WeightFormat, a: int, bias: bool,
               out_cols: int | None = None, extra_act: float = 0.0) -> list[Op]:
    """One (stacked) projection of ``n`` outputs: our W4A16 launch at decode, dequantize + cuBLAS
    above ``SMALL_M`` rows, cuBLAS for dense weights. ``out_cols``: columns written (gate/up with
    the gate fused: the intermediate once); ``extra_act``: bytes a fused epilogue/prologue adds."""
    op = linear(name, m, k, n, fmt, a, bias)
    written = m * (out_cols if out_cols is not None else n) * a
    act = m * k * a + written + extra_act
    if not fmt.quantized:
        return [replace(op, act_bytes=act)]
    if m <= SMALL_M:
        return [replace(op, act_bytes=act, gemms=0.0, kernel="w4a16", launches=1.0)]
    dense = WeightFormat(value_bits=8 * a)
    deq = Op(f"{name}_dequant", 0.0, op.vector_flops, weight_bytes(k, n, fmt), k * n * a, kernels=1.0)
    return [deq, replace(linear(name, m, k, n, dense, a, bias), act_bytes=act)]


def missing_terms(device: Any) -> str | None:
    """A warning naming the terms for our kernels that ``device``'s file lacks (None: it has them all)."""
    no_fixed = [k for k in KERNELS if not device.overhead.by_kernel.get(k)]
    no_rate = [k for k in KERNELS if not device.achievable.by_op.get(k)]
    if not no_fixed and not no_rate:
        return None
    what = ([f"fixed cost of {', '.join(no_fixed)} (taken as cuBLAS's / flash attention's)"] if no_fixed else []) \
        + ([f"bandwidth of {', '.join(no_rate)} (taken as the memory fraction)"] if no_rate else [])
    return (f"{device.name} has no measured {' and '.join(what)} for compress's kernels "
            "(bench/roofline/fit_compress_roofline.py fits them)")


def decode_attention(batch: int, slots: int, ly: LayerShape, a: int, kv_b: int) -> Op:
    """Our kernel for one query token: keys and values of every slot read per query head (grouped-query
    heads re-read their KV head; L2 serves part of that, so GQA estimates are on the slow side)."""
    pairs = batch * ly.n_heads * slots
    return Op("attention", 0.0, (4.0 * ly.head_dim + SOFTMAX_FLOPS) * pairs, 0.0,
              2 * batch * ly.n_heads * ly.head_dim * a, pairs * ly.head_dim * 2 * kv_b,
              kernel="decode_attention", launches=1.0)


def layer_ops(shape: ModelShape, ly: LayerShape, batch: int, new: int, ctx: int, fmt: WeightFormat,
              a: int, kv_b: int, kv_mode: str, cache_len: int | None = None) -> list[Op]:
    """Operators of one decoder layer under compress's runtime, in execution order."""
    arch, m, h = shape.arch, batch * new, shape.hidden
    inside = fmt.quantized and m <= SMALL_M and arch.decode_block  # norms/act/residuals in our launches

    def absorbed(op: Op) -> Op:  # a norm, activation or residual add that runs inside our launches
        return replace(op, act_bytes=0.0, kernels=0.0) if inside else op

    ops: list[Op] = []
    if ly.n_heads:
        q, kv = ly.n_heads * ly.head_dim, ly.n_kv_heads * ly.head_dim
        n1 = norm("attn_norm", m, h, arch.norm, a, "fused")
        ops.append(absorbed(n1))
        if fmt.quantized or arch.fused_qkv:  # accelerate stacks quantized q/k/v into one launch
            ops += projection("qkv_proj", m, h, q + 2 * kv, fmt, a, shape.qkv_bias)
        else:  # dense weights stay transformers' three linears (three cuBLAS products)
            ops += [linear(name, m, h, n, fmt, a, shape.qkv_bias)
                    for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))]
        if arch.qk_norm:
            qk = norm("qk_norm", m * (ly.n_heads + ly.n_kv_heads), ly.head_dim, "rms", a, "fused")
            ops.append(replace(qk, weight_bytes=2 * qk.weight_bytes))
        if ly.rotary_dim:
            ops.append(rotary(m, ly, a, "fused"))
        ops.append(kv_append(batch, new, ctx, ly, kv_b, kv_mode, "fused"))
        if new == 1:
            slots = max(ctx, cache_len or ctx) if kv_mode == "static" else ctx
            ops.append(decode_attention(batch, slots, ly, a, kv_b))
        else:
            ops.append(attention(batch, new, ctx, ly, a, kv_b, "fused", kv_mode, cache_len))
        ops += projection("o_proj", m, q, h, fmt, a, shape.out_bias, extra_act=m * h * a if inside else 0.0)
        res = elementwise("attn_residual", m * h, 1.0, 2, 1, a, kind="residual")
        ops.append(absorbed(res))
    if ly.intermediate:
        i = ly.intermediate
        n2 = norm("mlp_norm", m, h, arch.norm, a, "fused")
        ops.append(absorbed(n2))
        if arch.mlp == "gated":
            act = elementwise("mlp_act", m * i, arch.act_flops, 2, 1, a)
            if fmt.quantized:
                ops += projection("gate_up_proj", m, h, 2 * i, fmt, a, shape.mlp_bias, out_cols=i if inside else None)
            else:
                ops += [linear(name, m, h, i, fmt, a, shape.mlp_bias) for name in ("gate_proj", "up_proj")]
            ops.append(absorbed(act))
            ops += projection("down_proj", m, i, h, fmt, a, shape.mlp_bias, extra_act=m * h * a if inside else 0.0)
        else:
            ops += projection("fc1", m, h, i, fmt, a, shape.mlp_bias)
            ops.append(elementwise("mlp_act", m * i, arch.act_flops, 1, 1, a))
            ops += projection("fc2", m, i, h, fmt, a, shape.mlp_bias)
        res = elementwise("mlp_residual", m * h, 1.0, 2, 1, a, kind="residual")
        ops.append(absorbed(res))
    return ops


def head_ops(shape: ModelShape, tokens: int, logits_tokens: int, fmt: WeightFormat, a: int,
             batch: int = 1) -> list[Op]:
    """``fused``'s head operators, with a quantized lm_head run as ``projection`` runs it."""
    ops = roofline_ops.head_ops(shape, tokens, logits_tokens, fmt, a, "fused", batch)
    if not fmt.quantized:
        return ops
    i = next(j for j, op in enumerate(ops) if op.name == "lm_head")
    e = shape.embed_proj_dim or shape.hidden
    return ops[:i] + projection("lm_head", logits_tokens, e, shape.vocab, fmt, a, False) + ops[i + 1:]
