"""FLOPs and bytes of each operator of a decoder forward pass (pure arithmetic, no device, no I/O).

One forward processes ``new`` tokens per sequence for ``batch`` sequences whose context (keys
attended, including the new tokens) is ``ctx``: prefill is ``new = ctx = P``; decode step ``i`` is
``new = 1, ctx = P + i + 1``. Counts follow these conventions:

- a multiply-add is 2 FLOPs; ``matrix_flops`` run on matrix units (tensor cores / AMX) at the compute
  dtype, ``vector_flops`` (norms, softmax, activations, rotary, dequantization, CSR products) at fp32;
- bytes are DRAM traffic under perfect on-chip reuse within an operator: weights once per forward,
  activations read once and written once, the KV cache read once per KV head (grouped-query
  attention: KV heads, not query heads) and new keys/values written once;
- attention is a fused (flash-style) kernel: causal, only the ``new*ctx - new*(new-1)/2`` query-key
  pairs below the diagonal are computed, and the score matrix never reaches DRAM.

Weight storage (``WeightFormat``) includes per-group scales and zero points and sparse metadata:
2:4 keeps half the values plus a 2-bit position index per kept value (NVIDIA's sparse tensor-core
format: 4 bits of metadata per group of 4); unstructured sparsity is either stored dense (no gain),
as a bitmask (kept values + 1 bit per dense position, decompressed on chip and multiplied densely),
or CSR (kept values + a 16-bit column index each + a 32-bit row pointer per row, multiplied on
vector units since tensor cores cannot skip arbitrary zeros).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from compress.eval.roofline_shapes import LayerShape, ModelShape

#: vector FLOPs per element: RMSNorm (square, sum, scale, weight), LayerNorm (mean, sub, square, sum,
#: scale, weight, bias), softmax per score (scale, max, sub, exp, sum), rotary per rotated element.
NORM_FLOPS = {"rms": 4.0, "layer": 7.0}
SOFTMAX_FLOPS = 5.0
ROPE_FLOPS = 3.0
#: vector ops per dense position to expand a bitmask-compressed tile on chip (test bit, select)
BITMASK_EXPAND_OPS = 2.0


@dataclass(frozen=True)
class WeightFormat:
    """How one linear layer's weight [out, in] is stored and multiplied."""

    value_bits: float
    #: 0: not quantized (no scales); -1: one scale per output row; >0: input columns per scale group
    group_size: int = 0
    scale_bits: int = 16
    zero_bits: int = 0
    sparsity: Literal["none", "2:4", "unstructured"] = "none"
    #: fraction of weights kept (unstructured); 2:4 keeps 0.5
    density: float = 1.0
    sparse_format: Literal["dense", "bitmask", "csr"] = "dense"
    #: 2:4 on hardware whose matrix units skip the zeros; False stores and multiplies 2:4 densely
    sparse_units: bool = False
    #: vector ops per stored value to turn codes into the compute dtype (unpack, convert, -zero, *scale)
    dequant_ops: float = 0.0
    index_bits: int = 16
    rowptr_bits: int = 32

    @property
    def quantized(self) -> bool:
        return self.group_size != 0


def stored_values(k: int, n: int, fmt: WeightFormat) -> float:
    """Number of weight values actually stored for a [n, k] matrix."""
    if fmt.sparsity == "2:4" and fmt.sparse_units:
        return k * n / 2
    if fmt.sparsity == "unstructured" and fmt.sparse_format != "dense":
        return k * n * fmt.density
    return float(k * n)


def weight_bytes(k: int, n: int, fmt: WeightFormat) -> float:
    """Bytes of a [n=out, k=in] weight: values + sparse metadata + per-group scales/zero points."""
    vals = stored_values(k, n, fmt)
    total = vals * fmt.value_bits / 8
    if fmt.sparsity == "2:4" and fmt.sparse_units:
        total += vals * 2 / 8
    elif fmt.sparsity == "unstructured" and fmt.sparse_format == "bitmask":
        total += k * n / 8
    elif fmt.sparsity == "unstructured" and fmt.sparse_format == "csr":
        total += vals * fmt.index_bits / 8 + (n + 1) * fmt.rowptr_bits / 8
    if fmt.quantized:
        groups = 1 if fmt.group_size == -1 else math.ceil(k / fmt.group_size)
        total += n * groups * (fmt.scale_bits + fmt.zero_bits) / 8
    return total


@dataclass(frozen=True)
class Op:
    name: str
    matrix_flops: float = 0.0
    vector_flops: float = 0.0
    weight_bytes: float = 0.0
    act_bytes: float = 0.0
    kv_bytes: float = 0.0
    #: output rows of the weight matrix streamed (for a device's fixed per-row GEMV cost)
    weight_rows: float = 0.0
    #: fused attention runs all its FLOPs at the device's attention efficiency
    attention: bool = False

    @property
    def flops(self) -> float:
        return self.matrix_flops + self.vector_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes


def linear(name: str, tokens: int, k: int, n: int, fmt: WeightFormat, a: int, bias: bool) -> Op:
    """y[tokens, n] = x[tokens, k] @ W^T (+ b). ``a`` is bytes per activation element."""
    dense = 2.0 * tokens * k * n
    vector = fmt.dequant_ops * stored_values(k, n, fmt) if fmt.quantized else 0.0
    if fmt.sparsity == "2:4" and fmt.sparse_units:
        matrix = dense / 2
    elif fmt.sparsity == "unstructured" and fmt.sparse_format == "csr":
        matrix, vector = 0.0, vector + dense * fmt.density
    else:
        matrix = dense
        if fmt.sparsity == "unstructured" and fmt.sparse_format == "bitmask":
            vector += BITMASK_EXPAND_OPS * k * n
    wb = weight_bytes(k, n, fmt)
    if bias:
        vector += tokens * n
        wb += n * a
    return Op(name, matrix, vector, wb, tokens * (k + n) * a, weight_rows=float(n))


def norm(name: str, tokens: int, width: int, kind: str, a: int) -> Op:
    params = width if kind == "rms" else 2 * width
    return Op(name, 0.0, NORM_FLOPS[kind] * tokens * width, params * a, 2 * tokens * width * a)


def elementwise(name: str, elements: int, flops_per: float, reads: int, writes: int, a: int) -> Op:
    return Op(name, 0.0, flops_per * elements, 0.0, (reads + writes) * elements * a)


def attention(batch: int, new: int, ctx: int, ly: LayerShape, a: int, kv_b: int) -> Op:
    """Fused causal attention for ``new`` queries over ``ctx`` keys; reads each KV head once (GQA)."""
    pairs = new * ctx - new * (new - 1) / 2
    matrix = 4.0 * batch * ly.n_heads * pairs * ly.head_dim  # QK^T and PV
    vector = SOFTMAX_FLOPS * batch * ly.n_heads * pairs
    act = 2 * batch * new * ly.n_heads * ly.head_dim * a  # read Q, write O
    kv = batch * ctx * ly.n_kv_heads * ly.head_dim * 2 * kv_b
    return Op("attention", matrix, vector, 0.0, act, kv, attention=True)


def kv_append(batch: int, new: int, ctx: int, ly: LayerShape, kv_b: int, mode: str) -> Op:
    """Store the new keys/values. ``dynamic`` is transformers' DynamicCache: torch.cat copies the
    whole cache every step (read the old ``ctx-new`` rows, write ``ctx`` rows); the first prefill
    keeps the projection output by reference. ``static`` writes only the new rows in place."""
    row = ly.n_kv_heads * ly.head_dim * 2 * kv_b * batch
    if mode == "static":
        moved = new * row
    else:
        moved = 0.0 if ctx == new else (ctx - new) * row + ctx * row
    return Op("kv_cache_update", 0.0, 0.0, 0.0, 0.0, moved)


def layer_ops(shape: ModelShape, ly: LayerShape, batch: int, new: int, ctx: int, fmt: WeightFormat,
              a: int, kv_b: int, kv_mode: str) -> list[Op]:
    """Operators of one decoder layer, in execution order. Zero heads / zero FFN width (structurally
    removed attention or MLP) drop the whole sub-block."""
    arch, m, h = shape.arch, batch * new, shape.hidden
    ops: list[Op] = []
    if ly.n_heads:
        q, kv = ly.n_heads * ly.head_dim, ly.n_kv_heads * ly.head_dim
        ops.append(norm("attn_norm", m, h, arch.norm, a))
        if arch.fused_qkv:
            ops.append(linear("qkv_proj", m, h, q + 2 * kv, fmt, a, shape.qkv_bias))
        else:
            ops += [linear("q_proj", m, h, q, fmt, a, shape.qkv_bias),
                    linear("k_proj", m, h, kv, fmt, a, shape.qkv_bias),
                    linear("v_proj", m, h, kv, fmt, a, shape.qkv_bias)]
        if arch.qk_norm:
            ops.append(norm("qk_norm", m * (ly.n_heads + ly.n_kv_heads), ly.head_dim, "rms", a))
        if ly.rotary_dim:
            rot = Op("rotary", 0.0, ROPE_FLOPS * m * (ly.n_heads + ly.n_kv_heads) * ly.rotary_dim, 0.0,
                     2 * m * (q + kv) * a)
            ops.append(rot)
        ops.append(kv_append(batch, new, ctx, ly, kv_b, kv_mode))
        ops.append(attention(batch, new, ctx, ly, a, kv_b))
        ops.append(linear("o_proj", m, q, h, fmt, a, shape.out_bias))
        ops.append(elementwise("attn_residual", m * h, 1.0, 2, 1, a))
    if ly.intermediate:
        i = ly.intermediate
        ops.append(norm("mlp_norm", m, h, arch.norm, a))
        if arch.mlp == "gated":
            ops += [linear("gate_proj", m, h, i, fmt, a, shape.mlp_bias),
                    linear("up_proj", m, h, i, fmt, a, shape.mlp_bias),
                    elementwise("mlp_act", m * i, arch.act_flops, 2, 1, a),  # act(gate) * up: sized by I
                    linear("down_proj", m, i, h, fmt, a, shape.mlp_bias)]
        else:
            ops += [linear("fc1", m, h, i, fmt, a, shape.mlp_bias),
                    elementwise("mlp_act", m * i, arch.act_flops, 1, 1, a),
                    linear("fc2", m, i, h, fmt, a, shape.mlp_bias)]
        ops.append(elementwise("mlp_residual", m * h, 1.0, 2, 1, a))
    return ops


def embed_ops(shape: ModelShape, tokens: int, a: int) -> list[Op]:
    """Token (and learned position) lookups read only the rows they gather."""
    e = shape.embed_proj_dim or shape.hidden
    dense = WeightFormat(value_bits=8 * a)
    ops = [Op("embed_tokens", 0.0, 0.0, tokens * e * a, tokens * e * a)]
    if shape.embed_proj_dim:
        ops.append(linear("project_in", tokens, e, shape.hidden, dense, a, False))
    if shape.learned_positions:
        ops.append(Op("embed_positions", 0.0, tokens * shape.hidden, tokens * shape.hidden * a,
                      3 * tokens * shape.hidden * a))
    return ops


def head_ops(shape: ModelShape, tokens: int, logits_tokens: int, fmt: WeightFormat, a: int) -> list[Op]:
    """Final norm over all tokens, lm_head over ``logits_tokens`` (2·tokens·hidden·vocab FLOPs)."""
    e = shape.embed_proj_dim or shape.hidden
    dense = WeightFormat(value_bits=8 * a)
    ops = [norm("final_norm", tokens, shape.hidden, shape.arch.norm, a)]
    if shape.embed_proj_dim:
        ops.append(linear("project_out", logits_tokens, shape.hidden, e, dense, a, False))
    ops.append(linear("lm_head", logits_tokens, e, shape.vocab, fmt, a, False))
    return ops


def model_weight_bytes(shape: ModelShape, fmt: WeightFormat, head_fmt: WeightFormat, a: int) -> float:
    """Resident weight bytes: embeddings (dtype), decoder linears in ``fmt``, norms, biases, head."""
    e = shape.embed_proj_dim or shape.hidden
    total = shape.vocab * e * a + shape.learned_positions * shape.hidden * a
    if shape.embed_proj_dim:
        total += 2 * e * shape.hidden * a
    for ly, count in shape.layer_groups():
        per = sum(op.weight_bytes for op in layer_ops(shape, ly, 1, 1, 1, fmt, a, a, "static"))
        total += per * count
    total += norm("final_norm", 1, shape.hidden, shape.arch.norm, a).weight_bytes
    # A tied head shares the embedding table unless it is quantized separately.
    if not shape.tie_embeddings or head_fmt.quantized:
        total += weight_bytes(e, shape.vocab, head_fmt)
    return total


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, kv_b: int) -> float:
    return batch * tokens * sum(ly.n_kv_heads * ly.head_dim * 2 * kv_b for ly in shape.layers)
