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

Two implementations are counted here (``impl``; a third, ``compress``, is in ``roofline_compress``).
``fused`` is the floor: one kernel per operator, each
activation read and written once. ``transformers`` is what transformers' PyTorch modules launch,
one kernel per PyTorch op (Llama, transformers 5.17, counted with torch.profiler on an H100,
bench/results/gpu_profile_h100_2026-11-22.json): RMSNorm as 8 kernels through fp32 intermediates (6 when the
activations are fp32), rotary as mul/neg/cat/mul/add per tensor, the static cache's ``index_copy_``
(reads and writes each new row) with its position arithmetic, the MLP activation as silu then mul,
and decode attention over every slot of a static cache behind a boolean mask (converted by
fill/where; grouped-query K/V expanded by ``repeat_kv`` copies, since SDPA's GQA path needs no mask).
``kernels``, ``gemms`` and ``flash`` count each operator's kernels for the device's fixed costs;
``unfused`` marks transformers' own eager kernels, whose bytes move at the device's measured
fraction for their ``kind``.

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

Impl = Literal["transformers", "fused"]

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
    #: kernels launched other than matrix products (each pays the device's per_kernel_s)
    kernels: float = 0.0
    #: matrix-product kernels (each pays the device's per_gemm_s)
    gemms: float = 0.0
    #: fused (flash) attention calls (each pays the device's per_attention_s)
    flash: float = 0.0
    #: transformers' own eager kernels (elementwise chains, the masked decode attention): its bytes
    #: move at the device's measured fraction for its ``kind`` (by_op), else the elementwise fraction
    unfused: bool = False
    #: operator kind for a device's per-kind bandwidth (norm, rotary, kv_cache_update, attention_decode, ...)
    kind: str = ""
    #: one of compress's own GPU kernels (``w4a16``, ``decode_attention``; ``roofline_compress``): its
    #: bytes move at the device's fraction for that kernel and each of its ``launches`` pays its fixed cost
    kernel: str = ""
    launches: float = 0.0

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
    return Op(name, matrix, vector, wb, tokens * (k + n) * a, weight_rows=float(n), gemms=1.0)


def rms_norm_bytes(tokens: int, width: int, a: int) -> tuple[float, float]:
    """(kernels, activation bytes) of transformers' LlamaRMSNorm: to(fp32) [a+4], pow [8], mean [4],
    +eps and rsqrt [per row], x*rsqrt [8], to(dtype) [4+a], weight*x [2a] bytes per element; the two
    casts are no-ops (no kernel) when the activations are already fp32."""
    per_elem = 20.0 + 2 * a + (8.0 + 2 * a if a != 4 else 0.0)
    per_row = 24.0
    return (6.0 if a == 4 else 8.0), tokens * (width * per_elem + per_row)


def norm(name: str, tokens: int, width: int, kind: str, a: int, impl: Impl = "fused") -> Op:
    params = width if kind == "rms" else 2 * width
    flops = NORM_FLOPS[kind] * tokens * width
    if impl == "transformers" and kind == "rms":  # nn.LayerNorm is one fused kernel either way
        kernels, act = rms_norm_bytes(tokens, width, a)
        return Op(name, 0.0, flops, params * a, act, kernels=kernels, unfused=True, kind="norm")
    return Op(name, 0.0, flops, params * a, 2 * tokens * width * a, kernels=1.0, kind="norm")


def elementwise(name: str, elements: int, flops_per: float, reads: int, writes: int, a: int,
                kernels: float = 1.0, unfused: bool = False, kind: str = "") -> Op:
    return Op(name, 0.0, flops_per * elements, 0.0, (reads + writes) * elements * a, kernels=kernels,
              unfused=unfused, kind=kind or name)


def rotary(tokens: int, ly: LayerShape, a: int, impl: Impl = "fused") -> Op:
    """Rotary embedding of q and k. transformers, per tensor of n rotated elements: q*cos (2n),
    neg of one half (n), cat (2n), rotate_half*sin (2n), add (3n) elements moved, 5 kernels, plus the
    cos/sin rows; partial rotary (rotary_dim < head_dim) slices and cats the pass-through part back."""
    heads = ly.n_heads + ly.n_kv_heads
    flops = ROPE_FLOPS * tokens * heads * ly.rotary_dim
    if impl != "transformers":
        return Op("rotary", 0.0, flops, 0.0, 2 * tokens * heads * ly.head_dim * a, kernels=1.0, kind="rotary")
    n = tokens * heads * ly.rotary_dim
    act = 10.0 * n * a + 2 * 2 * tokens * ly.rotary_dim * a
    kernels = 10.0
    if ly.rotary_dim < ly.head_dim:
        act += 2.0 * tokens * heads * ly.head_dim * a
        kernels += 2
    return Op("rotary", 0.0, flops, 0.0, act, kernels=kernels, unfused=True, kind="rotary")


def attention(batch: int, new: int, ctx: int, ly: LayerShape, a: int, kv_b: int, impl: Impl = "fused",
              kv_mode: str = "static", cache_len: int | None = None) -> Op:
    """Fused causal attention for ``new`` queries over ``ctx`` keys; reads each KV head once (GQA).

    transformers, one new token on a static cache: SDPA attends to all ``cache_len`` slots behind a
    boolean mask (2 kernels turn it into an additive one); with a mask SDPA has no GQA path, so
    ``repeat_kv`` first copies K and V to every query head (read once, written and re-read ``rep``
    times). Prefill on an empty cache is ``is_causal`` over the prompt alone, as in ``fused``. Kernels
    (profiled): two fill_ and two where (the mask made additive), the attention kernel and its split
    reduction, and the two repeat_kv copies under GQA."""
    kernels, flash, kv_factor, kind = 0.0, 1.0, 1.0, ""
    if impl == "transformers" and new == 1 and kv_mode == "static":
        ctx = max(ctx, cache_len or ctx)
        kernels, flash, kind = 6.0, 0.0, "attention_decode"  # 2 fill + 2 where (the mask), kernel, reduction
        rep = ly.n_heads // ly.n_kv_heads
        if rep > 1:
            kernels, kv_factor = 8.0, 1.0 + 2.0 * rep
    pairs = new * ctx - new * (new - 1) / 2
    matrix = 4.0 * batch * ly.n_heads * pairs * ly.head_dim  # QK^T and PV
    vector = SOFTMAX_FLOPS * batch * ly.n_heads * pairs
    act = 2 * batch * new * ly.n_heads * ly.head_dim * a  # read Q, write O
    kv = batch * ctx * ly.n_kv_heads * ly.head_dim * 2 * kv_b * kv_factor
    return Op("attention", matrix, vector, 0.0, act, kv, attention=True, kernels=kernels, flash=flash, kind=kind,
              unfused=bool(kind))


def kv_append(batch: int, new: int, ctx: int, ly: LayerShape, kv_b: int, mode: str, impl: Impl = "fused") -> Op:
    """Store the new keys/values. ``dynamic`` is transformers' DynamicCache: torch.cat copies the
    whole cache every step (read the old ``ctx-new`` rows, write ``ctx`` rows); the first prefill
    keeps the projection output by reference. ``static`` writes only the new rows in place;
    transformers' StaticCache does it with ``index_copy_`` (reads each new row and writes it) after
    3 small kernels of position arithmetic (arange, add, the length counter's add_)."""
    row = ly.n_kv_heads * ly.head_dim * 2 * kv_b * batch
    tf = impl == "transformers"
    if mode == "static":
        moved, kernels = new * row * (2 if tf else 1), (5.0 if tf else 1.0)
    elif ctx == new:
        moved, kernels = 0.0, 0.0
    else:
        moved, kernels = (ctx - new) * row + ctx * row + (new * row if tf else 0.0), 2.0
    return Op("kv_cache_update", 0.0, 0.0, 0.0, 0.0, moved, kernels=kernels, unfused=tf, kind="kv_cache_update")


def layer_ops(shape: ModelShape, ly: LayerShape, batch: int, new: int, ctx: int, fmt: WeightFormat,
              a: int, kv_b: int, kv_mode: str, impl: Impl = "fused", cache_len: int | None = None) -> list[Op]:
    """Operators of one decoder layer, in execution order. Zero heads / zero FFN width (structurally
    removed attention or MLP) drop the whole sub-block."""
    arch, m, h = shape.arch, batch * new, shape.hidden
    tf = impl == "transformers"
    ops: list[Op] = []
    if ly.n_heads:
        q, kv = ly.n_heads * ly.head_dim, ly.n_kv_heads * ly.head_dim
        ops.append(norm("attn_norm", m, h, arch.norm, a, impl))
        if arch.fused_qkv:
            ops.append(linear("qkv_proj", m, h, q + 2 * kv, fmt, a, shape.qkv_bias))
        else:
            ops += [linear("q_proj", m, h, q, fmt, a, shape.qkv_bias),
                    linear("k_proj", m, h, kv, fmt, a, shape.qkv_bias),
                    linear("v_proj", m, h, kv, fmt, a, shape.qkv_bias)]
        if arch.qk_norm:
            # q_norm and k_norm are two modules (two norms' worth of kernels in transformers)
            qk = norm("qk_norm", m * (ly.n_heads + ly.n_kv_heads), ly.head_dim, "rms", a, impl)
            ops.append(Op(qk.name, 0.0, qk.vector_flops, 2 * qk.weight_bytes, qk.act_bytes,
                          kernels=2 * qk.kernels if tf else qk.kernels, unfused=qk.unfused, kind="norm"))
        if ly.rotary_dim:
            ops.append(rotary(m, ly, a, impl))
        ops.append(kv_append(batch, new, ctx, ly, kv_b, kv_mode, impl))
        ops.append(attention(batch, new, ctx, ly, a, kv_b, impl, kv_mode, cache_len))
        ops.append(linear("o_proj", m, q, h, fmt, a, shape.out_bias))
        ops.append(elementwise("attn_residual", m * h, 1.0, 2, 1, a, unfused=tf, kind="residual"))
    if ly.intermediate:
        i = ly.intermediate
        ops.append(norm("mlp_norm", m, h, arch.norm, a, impl))
        if arch.mlp == "gated":
            # act(gate) * up, sized by I; transformers: act(gate) written, then read again with up
            act = (elementwise("mlp_act", m * i, arch.act_flops, 3, 2, a, kernels=2.0, unfused=True) if tf
                   else elementwise("mlp_act", m * i, arch.act_flops, 2, 1, a))
            ops += [linear("gate_proj", m, h, i, fmt, a, shape.mlp_bias),
                    linear("up_proj", m, h, i, fmt, a, shape.mlp_bias),
                    act,
                    linear("down_proj", m, i, h, fmt, a, shape.mlp_bias)]
        else:
            ops += [linear("fc1", m, h, i, fmt, a, shape.mlp_bias),
                    elementwise("mlp_act", m * i, arch.act_flops, 1, 1, a, unfused=tf),
                    linear("fc2", m, i, h, fmt, a, shape.mlp_bias)]
        ops.append(elementwise("mlp_residual", m * h, 1.0, 2, 1, a, unfused=tf, kind="residual"))
    return ops


#: transformers' per-forward bookkeeping kernels (profiled, Llama, transformers 5.17): position ids
#: and cache positions (arange/add), the mask (a static cache builds one every decode step), and the
#: rotary cos/sin table (float cast, matmul, cat, cos, sin, two scalings, two casts)
POSITION_KERNELS = {"prefill": 4.0, "decode_static": 10.0, "decode_dynamic": 4.0}
ROTARY_TABLE_KERNELS = 9.0


def embed_ops(shape: ModelShape, tokens: int, a: int, impl: Impl = "fused", phase: str = "prefill") -> list[Op]:
    """Token (and learned position) lookups read only the rows they gather; transformers also
    computes positions, the attention mask and the rotary table once per forward."""
    e = shape.embed_proj_dim or shape.hidden
    dense = WeightFormat(value_bits=8 * a)
    ops = [Op("embed_tokens", 0.0, 0.0, tokens * e * a, tokens * e * a, kernels=1.0)]
    if shape.embed_proj_dim:
        ops.append(linear("project_in", tokens, e, shape.hidden, dense, a, False))
    if shape.learned_positions:
        ops.append(Op("embed_positions", 0.0, tokens * shape.hidden, tokens * shape.hidden * a,
                      3 * tokens * shape.hidden * a, kernels=2.0))
    if impl == "transformers":
        rot = max((ly.rotary_dim for ly in shape.layers), default=0)
        kernels = POSITION_KERNELS[phase] + (ROTARY_TABLE_KERNELS if rot else 0.0)
        ops.append(Op("positions_mask", 0.0, 0.0, 0.0, 6 * tokens * rot * 4.0, kernels=kernels, unfused=True))
    return ops


def head_ops(shape: ModelShape, tokens: int, logits_tokens: int, fmt: WeightFormat, a: int,
             impl: Impl = "fused", batch: int = 1) -> list[Op]:
    """Final norm over all tokens, lm_head over ``logits_tokens`` (2·tokens·hidden·vocab FLOPs), then
    greedy sampling of the next token (argmax over the last position's logits, copied into the input)."""
    e = shape.embed_proj_dim or shape.hidden
    dense = WeightFormat(value_bits=8 * a)
    ops = [norm("final_norm", tokens, shape.hidden, shape.arch.norm, a, impl)]
    if shape.embed_proj_dim:
        ops.append(linear("project_out", logits_tokens, shape.hidden, e, dense, a, False))
    ops.append(linear("lm_head", logits_tokens, e, shape.vocab, fmt, a, False))
    ops.append(Op("sampling", 0.0, batch * shape.vocab, 0.0, batch * shape.vocab * a, kernels=2.0))
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
