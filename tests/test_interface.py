"""fg.sparse_attention: results, backend choice, and one test per validation error."""

import math

import pytest
import torch
from brute import dense_masked_attention, random_mask

import fgattn_cute as fg
from fgattn_cute import interface
from fgattn_cute.host import key_index as key_index_mod

B, SQ, SK, H, D, M = 2, 100, 77, 3, 64, 64


def _qkv(dtype=torch.bfloat16, sq=SQ, sk=SK, d=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, sq, H, d, generator=gen).to(dtype)
    k = torch.randn(B, sk, H, d, generator=gen).to(dtype)
    v = torch.randn(B, sk, H, d, generator=gen).to(dtype)
    return q, k, v


def _index(sq=SQ, sk=SK, q_tile=M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(gen, B, H, math.ceil(sq / q_tile), sk, 0.3)
    return fg.KeyIndex.from_mask(mask, q_tile, sq), mask


def _untrusted(index):
    return fg.KeyIndex(
        index.indices.clone(), index.counts.clone(), index.q_tile, index.seqlen_q, index.seqlen_k
    )


# ------------------------------------------------------------------------- results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_on_cpu_runs_the_reference(dtype):
    q, k, v = _qkv(dtype)
    index, mask = _index()
    out, lse = fg.sparse_attention(q, k, v, index, return_lse=True)
    assert out.dtype == dtype and out.shape == (B, SQ, H, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, SQ)
    ref_out, ref_lse = fg.reference.sparse_attention(q, k, v, index, return_lse=True)
    assert torch.equal(out, ref_out.to(dtype))
    assert torch.equal(lse, ref_lse)
    dense_out, _ = dense_masked_attention(q, k, v, mask, M)
    torch.testing.assert_close(out.float(), dense_out.float(), atol=1e-2, rtol=1e-2)


def test_reference_backend_takes_float32():
    q, k, v = _qkv(torch.float32)
    index, _ = _index()
    out = fg.sparse_attention(q, k, v, index, backend="reference")
    assert out.dtype == torch.float32
    assert torch.equal(out, fg.reference.sparse_attention(q, k, v, index))


def test_softmax_scale_is_passed_through():
    q, k, v = _qkv()
    index, _ = _index()
    out = fg.sparse_attention(q, k, v, index, softmax_scale=0.3)
    assert torch.equal(out, fg.reference.sparse_attention(q, k, v, index, 0.3).to(q.dtype))


def test_untrusted_index_is_validated_once(monkeypatch):
    q, k, v = _qkv()
    index = _untrusted(_index()[0])
    calls = []
    real = key_index_mod._check_contents
    monkeypatch.setattr(
        key_index_mod, "_check_contents", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    fg.sparse_attention(q, k, v, index)
    assert index.trusted and len(calls) == 1
    fg.sparse_attention(q, k, v, index)
    assert len(calls) == 1


def test_trusted_index_contents_are_not_rechecked(monkeypatch):
    q, k, v = _qkv()
    index, _ = _index()
    monkeypatch.setattr(key_index_mod, "_check_contents", lambda *a, **kw: pytest.fail("synced"))
    fg.sparse_attention(q, k, v, index)


def test_cute_backend_dispatches_to_cute_forward(monkeypatch):
    """On a (pretend) Hopper GPU, backend auto and cute call _cute_forward with the resolved
    scale and the engine."""
    q, k, v = _qkv()
    index, _ = _index()
    monkeypatch.setattr(interface, "_is_hopper", lambda device: True)
    seen = []

    def fake(q_, k_, v_, index_, scale, return_lse, engine=None):
        seen.append((scale, return_lse))
        return torch.zeros_like(q_), torch.zeros(B, H, SQ) if return_lse else None

    monkeypatch.setattr(interface, "_cute_forward", fake)
    out = fg.sparse_attention(q, k, v, index, backend="cute")
    assert isinstance(out, torch.Tensor) and seen[-1] == (D**-0.5, False)
    out, lse = fg.sparse_attention(q, k, v, index, softmax_scale=0.5, backend="cute",
                                   return_lse=True)
    assert seen[-1] == (0.5, True) and lse.shape == (B, H, SQ)
    # auto on a Hopper device picks cute
    assert interface._choose_backend("auto", torch.device("cuda", 0)) == "cute"


def test_engine_argument_is_checked(monkeypatch):
    q, k, v = _qkv()
    index, _ = _index()
    with pytest.raises(ValueError, match="engine"):
        fg.sparse_attention(q, k, v, index, engine="warp")
    with pytest.raises(ValueError, match="engine"):
        fg.sparse_attention(q, k, v, index, backend="reference", engine="tma")


# ------------------------------------------------------------------------- backend errors


def test_backend_unknown():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^backend: .*'fast'"):
        fg.sparse_attention(q, k, v, _index()[0], backend="fast")


def test_backend_cute_without_hopper():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"backend='cute' needs a Hopper GPU.*reference"):
        fg.sparse_attention(q, k, v, _index()[0], backend="cute")


def test_backend_auto_on_other_gpu(monkeypatch):
    monkeypatch.setattr(interface, "_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"cuda:0 \(NVIDIA A100, compute capability 8\.0\)"
                       r".*backend='reference'"):
        interface._choose_backend("auto", torch.device("cuda", 0))


def test_backend_auto_on_meta_device():
    q, k, v = (t.to("meta") for t in _qkv())
    index = _index()[0].to("meta")
    with pytest.raises(RuntimeError, match=r"meta.*backend='reference'"):
        fg.sparse_attention(q, k, v, index)


def test_cute_head_dim_unsupported():
    q, k, v = _qkv(d=96)
    with pytest.raises(ValueError, match=r"^q: expected head dim D in \(64, 128\).*got 96"):
        fg.sparse_attention(q, k, v, _index()[0], backend="cute")


def test_cute_q_tile_unsupported():
    q, k, v = _qkv()
    index, _ = _index(q_tile=48)
    with pytest.raises(ValueError, match=r"^index\.q_tile: expected one of \(64, 128\).*got 48"):
        fg.sparse_attention(q, k, v, index, backend="cute")


def test_cute_float32_unsupported():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(TypeError, match=r"^q: .*float32 only with backend='reference'"):
        fg.sparse_attention(q, k, v, _index()[0], backend="cute")


def test_check_cute_supported_float32_direct():
    q, _, _ = _qkv(torch.float32)
    with pytest.raises(TypeError, match=r"^q: expected dtype torch.bfloat16 or torch.float16"):
        interface._check_cute_supported(q, _index()[0])


# ------------------------------------------------------------------------- q, k, v errors


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_a_tensor(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"^{which}: expected a torch.Tensor, got list"):
        fg.sparse_attention(args["q"], args["k"], args["v"], _index()[0])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_not_4d(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=rf"^{which}: expected a 4-D tensor \[B, S, H, D\]"):
        fg.sparse_attention(args["q"], args["k"], args["v"], _index()[0])


def test_empty_dimension():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^q: expected every dimension .* >= 1"):
        fg.sparse_attention(q[:, :, :, :0], k, v, _index()[0])


def test_float32_needs_reference_backend():
    q, k, v = _qkv(torch.float32)
    with pytest.raises(TypeError, match=r"^q: .*torch.float32 only with backend='reference'.*"
                       r"got torch.float32"):
        fg.sparse_attention(q, k, v, _index()[0])


def test_unsupported_dtype():
    q, k, v = _qkv(torch.float64)
    with pytest.raises(TypeError, match=r"^q: expected dtype .*got torch.float64"):
        fg.sparse_attention(q, k, v, _index()[0], backend="reference")


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    args[which] = args[which].half()
    with pytest.raises(TypeError, match=rf"^{which}: expected the dtype of q \(torch.bfloat16\)"):
        fg.sparse_attention(args["q"], args["k"], args["v"], _index()[0])


@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mismatch(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"^{which}: expected the device of q \(cpu\), got meta"):
        fg.sparse_attention(args["q"], args["k"], args["v"], _index()[0])


def test_v_shape_differs_from_k():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^v: expected the shape of k"):
        fg.sparse_attention(q, k, v[:, :-1], _index()[0])


@pytest.mark.parametrize("dim, what", [(0, "batch B"), (2, "heads H"), (3, "head dim D")])
def test_k_mismatches_q(dim, what):
    q, k, v = _qkv()
    k, v = k.narrow(dim, 0, 1).contiguous(), v.narrow(dim, 0, 1).contiguous()
    with pytest.raises(ValueError, match=rf"^k: expected {what} = "):
        fg.sparse_attention(q, k, v, _index()[0])


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_last_dim_not_contiguous(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    t = args[which]
    args[which] = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert args[which].stride(-1) != 1 and torch.equal(args[which], t)
    with pytest.raises(ValueError, match=rf"^{which}: expected the last dimension .* stride 1"):
        fg.sparse_attention(args["q"], args["k"], args["v"], _index()[0])


# ------------------------------------------------------------------------- index errors


def test_index_not_a_key_index():
    q, k, v = _qkv()
    index = _index()[0]
    with pytest.raises(TypeError, match=r"^index: expected a fgattn_cute.KeyIndex"):
        fg.sparse_attention(q, k, v, (index.indices, index.counts))


@pytest.mark.parametrize("field", ["indices", "counts"])
def test_index_dtype(field):
    q, k, v = _qkv()
    index = _index()[0]
    setattr(index, field, getattr(index, field).long())
    with pytest.raises(TypeError, match=rf"^index\.{field}: expected dtype torch.int32"):
        fg.sparse_attention(q, k, v, index)


def test_index_device():
    q, k, v = _qkv()
    index = _index()[0].to("meta")
    with pytest.raises(ValueError, match=r"^index\.indices: expected the device of q \(cpu\)"):
        fg.sparse_attention(q, k, v, index)


def test_index_seqlen_q():
    q, k, v = _qkv(sq=SQ - 1)
    with pytest.raises(ValueError, match=rf"^index\.seqlen_q: expected .* {SQ - 1} .*got {SQ}"):
        fg.sparse_attention(q, k, v, _index()[0])


def test_index_seqlen_k():
    q, k, v = _qkv(sk=SK + 1)
    with pytest.raises(ValueError, match=rf"^index\.seqlen_k: expected .* {SK + 1} .*got {SK}"):
        fg.sparse_attention(q, k, v, _index()[0])


@pytest.mark.parametrize("dim", [0, 1])
def test_index_batch_or_heads(dim):
    q, k, v = _qkv()
    index = _index()[0]
    index = fg.KeyIndex(index.indices.narrow(dim, 0, 1), index.counts.narrow(dim, 0, 1),
                        index.q_tile, index.seqlen_q, index.seqlen_k)
    with pytest.raises(ValueError, match=r"^index\.indices: expected shape \[B=2, H=3"):
        fg.sparse_attention(q, k, v, index)


def test_index_counts_shape():
    q, k, v = _qkv()
    index = _index()[0]
    index.counts = index.counts[:, :, :1]
    with pytest.raises(ValueError, match=r"^index\.counts: expected shape"):
        fg.sparse_attention(q, k, v, index)


def test_index_capacity_not_multiple_of_128():
    q, k, v = _qkv()
    index = _index()[0]
    index.indices = index.indices[..., :100]
    with pytest.raises(ValueError, match=r"^index\.indices: expected capacity .* multiple of 128"):
        fg.sparse_attention(q, k, v, index)


@pytest.mark.parametrize("delta, shown", [(200, "count"), (-1000, "count")])
def test_index_counts_out_of_range(delta, shown):
    q, k, v = _qkv()
    index = _untrusted(_index()[0])
    index.counts[1, 2, 0] += delta
    with pytest.raises(ValueError, match=r"^index\.counts: expected every count in \[0, "
                       r"capacity=128\], got index\.counts\[1, 2, 0\]"):
        fg.sparse_attention(q, k, v, index)
    assert not index.trusted


@pytest.mark.parametrize("value", [SK, -1, 10**6])
def test_index_indices_out_of_range(value):
    q, k, v = _qkv()
    index = _untrusted(_index()[0])
    index.indices[0, 1, 1, 0] = value
    with pytest.raises(ValueError, match=rf"^index\.indices: expected .* \[0, seqlen_k={SK}\), "
                       rf"got index\.indices\[0, 1, 1, 0\] = {value}"):
        fg.sparse_attention(q, k, v, index)


@pytest.mark.parametrize("kind", ["unsorted", "duplicate"])
def test_index_indices_not_strictly_ascending(kind):
    q, k, v = _qkv()
    index = _untrusted(_index()[0])
    row = index.indices[1, 0, 1]
    if kind == "unsorted":
        row[2], row[3] = row[3].clone(), row[2].clone()
    else:
        row[3] = row[2]
    with pytest.raises(ValueError, match=r"^index\.indices: expected .* strictly ascending.*"
                       r"index\.indices\[1, 0, 1, 2\]"):
        fg.sparse_attention(q, k, v, index)


def test_padding_past_count_is_not_checked():
    q, k, v = _qkv()
    index = _untrusted(_index()[0])
    index.indices[0, 0, 1, int(index.counts[0, 0, 1]):] = -5
    fg.sparse_attention(q, k, v, index)


# ------------------------------------------------------------------------- other arguments


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_softmax_scale_value(scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^softmax_scale: expected a positive finite float"):
        fg.sparse_attention(q, k, v, _index()[0], softmax_scale=scale)


@pytest.mark.parametrize("scale", [torch.tensor(0.5), "0.5", True])
def test_softmax_scale_type(scale):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^softmax_scale: expected a positive finite float"):
        fg.sparse_attention(q, k, v, _index()[0], softmax_scale=scale)


def test_softmax_scale_int_is_accepted():
    q, k, v = _qkv()
    index = _index()[0]
    assert torch.equal(fg.sparse_attention(q, k, v, index, softmax_scale=1),
                       fg.sparse_attention(q, k, v, index, softmax_scale=1.0))


def test_return_lse_type():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^return_lse: expected a bool"):
        fg.sparse_attention(q, k, v, _index()[0], return_lse=1)


# ------------------------------------------------------------------------- cute layout


def test_cute_layout_accepts_builder_output_and_fused_qkv():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, SQ, 3, H, D, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.unbind(2)
    index, _ = _index(sk=SQ)
    interface._check_cute_layout(q, k, v, index)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_cute_layout_stride_not_16_bytes(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    t = args[which]
    wide = torch.zeros(*t.shape[:3], D + 1, dtype=t.dtype)
    args[which] = wide[..., :D]  # row stride D + 1 elements: not a multiple of 16 bytes
    with pytest.raises(ValueError, match=rf"^{which}: expected strides .* multiples of 16 bytes"):
        interface._check_cute_layout(args["q"], args["k"], args["v"], _index()[0])


@pytest.mark.parametrize("which", ["k", "v"])
def test_cute_layout_key_stride_past_32_bits(which):
    args = dict(zip("qkv", _qkv(), strict=True))
    t = args[which]
    # one key, so a stride along S of 2**31 elements (4 GiB) needs no such storage
    args[which] = t[:, :1].as_strided((B, 1, H, D), (H * D, 2**31, D, 1))
    with pytest.raises(ValueError, match=rf"^{which}: expected a stride along S below 2\*\*32"):
        interface._check_cute_layout(args["q"], args["k"], args["v"], _index()[0])


def test_cute_layout_misaligned_pointer():
    q, k, v = _qkv()
    flat = torch.zeros(q.numel() + 8, dtype=q.dtype)
    q = flat[1 : q.numel() + 1].view(q.shape)  # 2-byte offset
    with pytest.raises(ValueError, match=r"^q: expected a 16-byte aligned data pointer"):
        interface._check_cute_layout(q, k, v, _index()[0])


def test_cute_layout_index_not_contiguous():
    q, k, v = _qkv()
    index = _index()[0]
    wide = torch.zeros(*index.indices.shape[:3], 256, dtype=torch.int32)
    index.indices = wide[..., :128]
    with pytest.raises(ValueError, match=r"^index\.indices: expected a contiguous tensor"):
        interface._check_cute_layout(q, k, v, index)


def test_cute_path_validates_untrusted_index_before_launch(monkeypatch):
    q, k, v = _qkv()
    index = _untrusted(_index()[0])
    index.indices[0, 0, 1, 0] = SK
    monkeypatch.setattr(interface, "_is_hopper", lambda device: True)
    monkeypatch.setattr(interface, "_cute_forward", lambda *a: pytest.fail("launched"))
    with pytest.raises(ValueError, match=r"^index\.indices: .*index\.indices\[0, 0, 1, 0\]"):
        fg.sparse_attention(q, k, v, index, backend="cute")
