"""Fused decoder blocks (``compress.kernels.fused_block``): RMSNorm, SiLU gate and residual adds
inside the W4A16 launches.

On the CPU the CUDA kernel is stood in for by an exact dequantize-and-multiply of REAL packed
weights (``packed.W4A16Weight``, the CUDA layout), so the stacking (gate/up interleaved), the block
forward, the projections' hand-off and torch.compile tracing are checked against the unfused
model. The kernel's own epilogues are checked on a GPU (marked gpu) against float32 references on
fresh random inputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.algos.quant import default_g_idx, rtn_quantize
from compress.kernels import accelerate, fused, fused_block, layout
from compress.kernels.packed import W4A16Weight, dequantize_packed
from compress.nn.qlinear import QuantizedLinear

from tests.test_kernels import HAS_CUDA, rel_err, take_gpu_path_with, tiny_quantized_model


def pack_like_repack(mod: QuantizedLinear) -> W4A16Weight:
    """What ``triton_w4a16.repack(kernel="cuda")`` builds, without a GPU."""
    order = layout.contiguous_group_order(mod.g_idx, mod.n_groups)
    codes = layout.ordered_codes(mod.qweight, order)
    return W4A16Weight(
        words=layout.pack_chunked(codes), scales=layout.group_major(mod.scales, torch.float32),
        zeros=layout.group_major(mod.zeros, torch.uint8),
        perm=None if order.perm is None else order.perm.to(torch.int32),
        bias=None if mod.bias is None else mod.bias.detach().float(),
        in_features=mod.in_features, out_features=mod.out_features, group=order.group_size, width=1,
        kernel="cuda")


def install_packed_stand_in(monkeypatch) -> list[int]:
    """``accelerate(backend="triton")`` takes its GPU path on the CPU; each layer's "kernel" is the
    exact product with its packed weight. Returns the list of out_features of each plain call."""
    calls: list[int] = []

    def fake_backend(mod, large_m, width, pdl=True):
        wt = pack_like_repack(mod)

        def forward(x):
            calls.append(wt.out_features)
            return nn.functional.linear(x, dequantize_packed(wt, x.dtype),
                                        None if wt.bias is None else wt.bias.to(x.dtype))
        forward.packed = wt
        forward.restore_codes = wt.restore_codes
        return forward

    take_gpu_path_with(monkeypatch, fake_backend)
    return calls


def test_interleaved_stack_alternates_eight_rows_and_members_get_their_own_outputs():
    gen = torch.Generator().manual_seed(3)
    mods = []
    for _ in range(2):
        q, s, z = rtn_quantize(torch.randn(24, 64, generator=gen), 4, 32, False)
        mods.append(QuantizedLinear.from_codes(q, s, z, default_g_idx(64, 32), 4, 32, False,
                                               torch.randn(24, generator=gen)))
    stacked, bounds = fused.stack(mods, interleave=True)
    w = stacked.dequantize()
    w0, w1 = mods[0].dequantize(), mods[1].dequantize()
    for j in range(3):  # rows 16j .. 16j + 7 are gate rows 8j.., the next 8 up rows 8j..
        assert torch.equal(w[16 * j:16 * j + 8], w0[8 * j:8 * j + 8])
        assert torch.equal(w[16 * j + 8:16 * j + 16], w1[8 * j:8 * j + 8])
    assert torch.equal(stacked.bias[8:16], mods[1].bias[:8])
    packed = pack_like_repack(stacked)
    group = fused.FusedGroup(lambda x: nn.functional.linear(x, w, stacked.bias), bounds, ["g", "u"],
                             interleaved=True)
    members = [group.member(i, packed) for i in range(2)]
    x = torch.randn(3, 64)
    for i, mod in enumerate(mods):
        assert rel_err(members[i](x), nn.functional.linear(x, mod.dequantize(), mod.bias)) < 1e-6
        assert torch.equal(members[i].restore_codes(), mod.qweight)  # its rows of the stacked words
    y = torch.randn(2, 48)
    ref = nn.functional.silu(y.view(2, 3, 2, 8)[:, :, 0]) * y.view(2, 3, 2, 8)[:, :, 1]
    assert torch.equal(fused_block.silu_mul_interleaved(y), ref.reshape(2, 24))
    with pytest.raises(ValueError, match="equal out_features"):
        fused.stack([mods[0], mods[1], mods[0]], interleave=True)


def test_fused_blocks_compute_the_unfused_model_and_keep_its_modules(monkeypatch):
    """Every block fused; logits equal the unfused model's (the stand-in is exact, so what is
    checked is the plumbing: the norm moved into q/k/v and gate/up, silu(gate) * up, both residual
    adds); one plain call per block is left (none: all four launches go through FusedLinear)."""
    calls = install_packed_stand_in(monkeypatch)
    model = tiny_quantized_model()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    codes = {n: model.get_submodule(n).qweight.clone() for n in names}
    keys = set(model.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        report = accelerate(model, backend="triton")
        calls.clear()
        got = model(ids).logits
    assert report.fused_blocks == 2 and report.fused_blocks_reason == ""
    assert report.as_dict()["fused_blocks"] == 2
    assert calls == []  # every projection ran through the fused launches
    assert rel_err(got, ref) < 1e-5
    blocks = model.model.layers
    assert all(isinstance(b._compress_fused, fused_block.FusedBlock) for b in blocks)
    assert blocks[0]._compress_fused.gate_up.wt.glu_interleaved
    # a projection called outside the block forward is the plain layer (nothing pending)
    x = torch.randn(3, 128)
    q_proj, o_proj = blocks[0].self_attn.q_proj, blocks[0].self_attn.o_proj
    with torch.no_grad():
        assert rel_err(q_proj(x), nn.functional.linear(x, q_proj.dequantize())) < 1e-6
        assert rel_err(o_proj(x), nn.functional.linear(x, o_proj.dequantize())) < 1e-6
    for n in names:  # the codes come back exactly, gate/up from their interleaved rows
        assert torch.equal(model.get_submodule(n).qweight, codes[n]), n
    assert set(model.state_dict()) == keys
    # accelerate again without block fusion: the blocks get their class's forward back
    with torch.no_grad():
        report = accelerate(model, backend="triton", fuse_blocks=False)
        again = model(ids).logits
    assert report.fused_blocks == 0 and not hasattr(blocks[0], "_compress_fused")
    assert "forward" not in blocks[0].__dict__
    assert rel_err(again, ref) < 1e-5


def test_fused_blocks_trace_under_torch_compile_in_one_graph(monkeypatch):
    """Dynamo follows the block forward and the hand-off to the projections without a graph break:
    4 fused launches per block (8) and the lm_head, nothing else linear."""
    install_packed_stand_in(monkeypatch)
    model = tiny_quantized_model()
    ids = torch.randint(0, 256, (1, 7))
    ops = []

    def count(gm, example_inputs):
        targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        ops.append((sum("w4a16_fused" in t for t in targets), sum("linear" in t for t in targets)))
        return gm.forward

    with torch.no_grad():
        ref = model(ids).logits
        accelerate(model, backend="triton")
        torch._dynamo.reset()
        got = torch.compile(model, backend=count, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert ops == [(8, 1)]  # 8 fused launches; the one plain linear is the lm_head
    assert rel_err(got, ref) < 1e-5


def test_tuned_keys_are_labelled_for_the_bench_json():
    """``compress bench --json`` names each tuned config by this label (plain and fused launches)."""
    assert fused_block.key_label((1, 4096, 4096)) == "1x4096x4096"
    assert fused_block.key_label((1, 22016, 4096, "fused", True, True, False)) == "1x22016x4096+norm+silu"
    assert fused_block.key_label((4, 4096, 11008, "fused", False, False, True)) == "4x4096x11008+residual"


def test_fused_linear_float32_reference_matches_its_torch_path():
    """``reference_fp32`` (what tuning and the GPU tests compare the kernel with) and ``reference``
    (what runs where the kernel does not) compute the same function."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(5)
    q, s, z = rtn_quantize(torch.randn(32, 64, generator=gen), 4, 32, False)
    wt = pack_like_repack(QuantizedLinear.from_codes(q, s, z, default_g_idx(64, 32), 4, 32, False))
    wt.glu_interleaved = True
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = 1 + 0.3 * torch.randn(64, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    for fl, res in [(fused_block.FusedLinear(wt, norm=norm, silu_mul=True), None),
                    (fused_block.FusedLinear(wt, residual=True), torch.randn(5, 32, generator=gen)),
                    (fused_block.FusedLinear(wt, norm=norm), None)]:
        assert not fl.kernel_ok(x)  # CPU: the torch path
        assert rel_err(fl(x, res), fl.reference_fp32(x, res)) < 1e-6
    with pytest.raises(ValueError, match="without a residual"):
        fused_block.FusedLinear(wt)(x, torch.randn(5, 32))
    wt.glu_interleaved = False
    with pytest.raises(ValueError, match="interleave"):
        fused_block.FusedLinear(wt, silu_mul=True)


def test_bench_baseline_densify_gives_the_blocks_their_forward_back(monkeypatch):
    """``compress bench`` times the checkpoint, then densifies the same model for its baseline: the
    fused block forwards (which call the packed weights directly) must go with the packed layers."""
    from compress.commands.bench import _densify

    install_packed_stand_in(monkeypatch)
    model = tiny_quantized_model()
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        assert accelerate(model, backend="triton").fused_blocks == 2
        assert _densify(model) == 14
        dense = model(ids).logits
    assert not any(hasattr(b, "_compress_fused") or "forward" in b.__dict__ for b in model.model.layers)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert rel_err(dense, ref) < 1e-5


def test_a_block_whose_norm_lacks_what_the_kernel_needs_is_left_unfused(monkeypatch):
    """A norm without an epsilon attribute (e.g. a custom RMSNorm) keeps that block on its own
    forward; the other blocks are fused and the model still computes the same function."""
    install_packed_stand_in(monkeypatch)
    model = tiny_quantized_model()
    norm = model.model.layers[1].post_attention_layernorm
    del norm.variance_epsilon
    norm.my_eps = 1e-6  # the forward below still needs some epsilon
    norm.forward = lambda h: norm.weight * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True)
                                                                     + norm.my_eps)).to(h.dtype)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        report = accelerate(model, backend="triton")
        got = model(ids).logits
    assert report.fused_blocks == 1
    assert hasattr(model.model.layers[0], "_compress_fused") and not hasattr(model.model.layers[1], "_compress_fused")
    assert rel_err(got, ref) < 1e-5


def test_blocks_not_fused_for_decoder_layers_that_return_tuples(monkeypatch):
    """transformers < 4.54 decoder layers return tuples; the fused forward returns the hidden states."""
    install_packed_stand_in(monkeypatch)
    model = tiny_quantized_model()
    layer_cls = type(model.model.layers[0])

    def old_style_forward(self, hidden_states, **kwargs) -> tuple[torch.Tensor]:
        raise AssertionError("not called")
    monkeypatch.setattr(layer_cls, "forward", old_style_forward)
    from compress.adapters import get_adapter

    assert "tuples" in fused_block.why_not(model, get_adapter(model))


def test_blocks_not_fused_when_the_mlp_is_not_silu_gated(monkeypatch):
    install_packed_stand_in(monkeypatch)
    model = tiny_quantized_model()
    model.config.hidden_act = "gelu"
    report = accelerate(model, backend="triton")
    assert report.fused_blocks == 0 and "not SiLU" in report.fused_blocks_reason
    assert report.fused  # the projections are still stacked
    assert not any(hasattr(b, "_compress_fused") for b in model.model.layers)


# ---------------------------------------------------------------- GPU: the kernel's fusions

FUSION_SHAPES = [  # (n, k, group, symmetric, bias)
    (256, 512, 128, False, False),
    (512, 1024, -1, True, False),
    (128, 768, 64, False, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,gs,sym,bias", FUSION_SHAPES)
def test_cuda_fused_epilogues_match_float32_reference(n, k, gs, sym, bias, dtype):
    """RMSNorm prologue, SiLU-gate epilogue and residual add, each alone and norm + SiLU together,
    for 1..16 rows and configs covering 1 and 2 tiles, 1-8 warps (the cross-warp reduction of the
    row sums), 2 and 4 stages, 128- and 256-column steps; bounds as ``tune``'s."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from compress.kernels import cuda_w4a16, triton_w4a16 as tw
    from tests.test_kernels import make_layer

    layer = make_layer(n, k, gs, sym, False, bias, seed=11)
    wt = tw.repack(layer.qweight, layer.scales, layer.zeros, layer.g_idx, 4, sym, layer.bias, "cuda",
                   kernel="cuda")
    wt.glu_interleaved = True  # the kernel does not care what the rows mean
    norm = LlamaRMSNorm(k, eps=1e-5).to("cuda", dtype)
    gen = torch.Generator(device="cuda").manual_seed(2)
    norm.weight.data = (1 + 0.3 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
    cfgs = [cuda_w4a16.CudaConfig(1, 8, 2, 2), cuda_w4a16.CudaConfig(2, 4, 4, 1, 1), cuda_w4a16.CudaConfig(1, 1, 2, 1)]
    bound = 3e-3 if dtype == torch.float16 else 1.5e-2
    kinds = [dict(norm=norm), dict(norm=norm, silu_mul=True), dict(silu_mul=True), dict(residual=True)]
    for kind in kinds:
        fl = fused_block.FusedLinear(wt, **kind)
        for m in (1, 3, 9, 16):
            x = (3 * torch.randn(m, k, device="cuda", generator=gen)).to(dtype)  # rms far from 1
            res = torch.randn(m, n, device="cuda", generator=gen).to(dtype) if fl.residual else None
            ref = fl.reference_fp32(x, res)
            for cfg in cfgs:
                got = fl.launch(x, res, cfg)
                assert got.shape == (m, fl.out_features)
                err = rel_err(got, ref)
                assert err < bound, (kind.keys(), m, cfg, err)
    if (n, dtype) == (256, torch.float16):  # once: the fused variant's tuning keeps its winner under its key
        fl = fused_block.FusedLinear(wt, norm=norm, silu_mul=True)
        fl.tune(1)
        assert (*fl.key, 1) in wt.configs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_accelerate_fuses_blocks_on_cuda_eager_graph_and_compiled():
    """A tiny Llama in fp16: fused blocks match the unfused accelerated model at decode-sized and
    prefill-sized inputs (the latter runs the torch path), eagerly and under torch.compile. (That
    ``tune_triton`` tunes the fused launches too is seen in ``bench/speed/e2e_decode.py``'s "tuned" field:
    tuning 8 shapes here would take minutes.)"""
    model = tiny_quantized_model(device="cuda").half()
    ids, long_ids = torch.randint(0, 256, (1, 5), device="cuda"), torch.randint(0, 256, (1, 40), device="cuda")
    with torch.no_grad():
        accelerate(model, backend="triton", fuse_blocks=False)
        ref, ref_long = model(ids).logits, model(long_ids).logits
        report = accelerate(model, backend="triton")
        assert report.fused_blocks == 2
        got, got_long = model(ids).logits, model(long_ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert rel_err(got, ref) < 1e-2
    assert rel_err(got_long, ref_long) < 1e-2
    assert rel_err(compiled, ref) < 1e-2
