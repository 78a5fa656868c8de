"""The custom op ``torch.ops.fgattn.sparse_attention`` and its wrapper ``sparse_attention_op``:
same results as ``fg.sparse_attention``, a fake implementation, ``torch.compile(fullgraph=True)``,
and (on a Hopper GPU) CUDA-graph capture and replay with new lists written in place."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fgattn_cute as fg
from fgattn_cute.integrations.torch_op import sparse_attention_op

B, S, H, D, M = 2, 200, 2, 64, 32
T = (S + M - 1) // M


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(seed=0, dtype=torch.float32, device="cpu", s=S, h=H, d=D, m=M, density=0.3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, s, h, d, generator=g).to(device, dtype) for _ in range(3))
    n_tiles = (s + m - 1) // m
    mask = torch.rand(B, h, n_tiles, s, generator=g) < density
    return q, k, v, fg.KeyIndex.from_mask(mask.to(device), m, s)


class _Block(torch.nn.Module):
    """A small module around the op: a projection, the op, a residual."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.proj = torch.nn.Linear(D, D, bias=False)
        torch.nn.init.eye_(self.proj.weight)

    def forward(self, q, k, v, index):
        out, lse = sparse_attention_op(
            self.proj(q), k, v, index, softmax_scale=0.1, return_lse=True, backend=self.backend
        )
        return out + q, lse


def test_op_matches_sparse_attention():
    q, k, v, index = _inputs()
    out, lse = sparse_attention_op(q, k, v, index, return_lse=True, backend="reference")
    ref, ref_lse = fg.sparse_attention(q, k, v, index, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    only_out = sparse_attention_op(q, k, v, index, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(
        only_out, fg.sparse_attention(q, k, v, index, softmax_scale=0.3, backend="reference")
    )


def test_op_bf16_auto_on_cpu_is_the_reference():
    q, k, v, index = _inputs(dtype=torch.bfloat16)
    out = sparse_attention_op(q, k, v, index)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out, fg.sparse_attention(q, k, v, index), rtol=0, atol=0)


def test_op_keeps_the_dtype_rule_of_sparse_attention():
    q, k, v, index = _inputs()
    with pytest.raises(TypeError, match="float32 only with backend='reference'"):
        sparse_attention_op(q, k, v, index)  # auto: float32 is refused, as in fg.sparse_attention


def test_op_checks_structure():
    q, k, v, index = _inputs()
    with pytest.raises(ValueError, match="index.seqlen_q"):
        sparse_attention_op(q[:, :100], k, v, index, backend="reference")
    with pytest.raises(TypeError, match="index: expected a fgattn_cute.KeyIndex"):
        sparse_attention_op(q, k, v, index.indices, backend="reference")
    with pytest.raises(ValueError, match="backend"):
        sparse_attention_op(q, k, v, index, backend="fast")


def test_untrusted_index_is_validated_eagerly():
    q, k, v, index = _inputs()
    bad = index.indices.clone()
    bad[0, 0, 0, 0] = S + 5  # out of range
    untrusted = fg.KeyIndex(bad, index.counts, M, S, S)
    with pytest.raises(ValueError, match="index.indices"):
        sparse_attention_op(q, k, v, untrusted, backend="reference")
    good = fg.KeyIndex(index.indices.clone(), index.counts.clone(), M, S, S)
    out = sparse_attention_op(q, k, v, good, backend="reference")
    assert good.trusted
    torch.testing.assert_close(out, fg.sparse_attention(q, k, v, index, backend="reference"))


def test_untrusted_index_is_refused_while_compiling():
    q, k, v, index = _inputs()
    untrusted = fg.KeyIndex(index.indices.clone(), index.counts.clone(), M, S, S)
    fn = torch.compile(
        lambda q, k, v, ix: sparse_attention_op(q, k, v, ix, backend="reference"),
        fullgraph=True, backend="aot_eager",
    )
    with pytest.raises(Exception, match="trusted KeyIndex"):
        fn(q, k, v, untrusted)


def test_fake_impl_shapes_and_dtypes():
    q, k, v, index = _inputs(dtype=torch.bfloat16, s=300)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fi, fc = (mode.from_tensor(t) for t in (q, k, v, index.indices, index.counts))
        out, lse = torch.ops.fgattn.sparse_attention(fq, fk, fv, fi, fc, M, 0.125, "reference")
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert lse.shape == (B, H, 300) and lse.dtype == torch.float32
    # a non-contiguous q still gives a contiguous out, as the real kernels do
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_strided.is_contiguous()
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q_strided)
        fk, fv, fi, fc = (mode.from_tensor(t) for t in (k, v, index.indices, index.counts))
        out, _ = torch.ops.fgattn.sparse_attention(fq, fk, fv, fi, fc, M, 0.125, "reference")
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, v, index = _inputs(dtype=dtype)
    torch.library.opcheck(
        torch.ops.fgattn.sparse_attention.default,
        (q, k, v, index.indices, index.counts, M, 0.125, "reference"),
    )


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@torch.no_grad()  # the op is forward only (inference), as in a diffusion pipeline
def test_compile_fullgraph_matches_eager(compiler):
    q, k, v, index = _inputs()
    block = _Block("reference")
    eager_out, eager_lse = block(q, k, v, index)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out, lse = compiled(q, k, v, index)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, eager_lse, rtol=1e-5, atol=1e-5)
    # a second index with the same shapes reuses the graph and gives its own result
    q2, k2, v2, index2 = _inputs(seed=1)
    out2, _ = compiled(q2, k2, v2, index2)
    torch.testing.assert_close(out2, block(q2, k2, v2, index2)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU (Hopper)

GS, GH, GD, GM = 1000, 4, 128, 128


def _gpu_inputs(seed, capacity=None, density=0.3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, GS, GH, GD, generator=g).cuda().bfloat16() for _ in range(3))
    n_tiles = (GS + GM - 1) // GM
    mask = torch.rand(B, GH, n_tiles, GS, generator=g) < density
    index = fg.KeyIndex.from_mask(mask.cuda(), GM, GS, capacity=capacity)
    return q, k, v, index


@pytest.mark.gpu
def test_gpu_compile_fullgraph_cute_matches_eager():
    q, k, v, index = _gpu_inputs(0)

    def fn(q, k, v, ix):
        out, lse = sparse_attention_op(q, k, v, ix, return_lse=True, backend="cute")
        return out.float() * 2, lse

    eager_out, eager_lse = fn(q, k, v, index)
    compiled = torch.compile(fn, fullgraph=True)  # inductor
    out, lse = compiled(q, k, v, index)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, eager_lse, rtol=0, atol=0)
    ref = fg.reference.sparse_attention(q, k, v, index)
    torch.testing.assert_close(out / 2, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_and_new_index_in_place():
    cap = 512  # fixed capacity, so a new index fits the captured buffers
    q, k, v, index = _gpu_inputs(0, capacity=cap)
    _, _, _, index2 = _gpu_inputs(1, capacity=cap, density=0.2)
    assert index2.capacity == index.capacity
    eager1, lse1 = sparse_attention_op(q, k, v, index, return_lse=True, backend="cute")
    eager2, lse2 = sparse_attention_op(q, k, v, index2, return_lse=True, backend="cute")

    # the buffers the graph reads: a trusted index of our own
    static = fg.KeyIndex.from_indices(index.indices.clone(), index.counts.clone(), GM, GS, GS)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernel) outside the capture
        for _ in range(2):
            sparse_attention_op(q, k, v, static, return_lse=True, backend="cute")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = sparse_attention_op(q, k, v, static, return_lse=True, backend="cute")

    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(g_out, eager1, rtol=0, atol=0)
    torch.testing.assert_close(g_lse, lse1, rtol=0, atol=0)

    static.indices.copy_(index2.indices)
    static.counts.copy_(index2.counts)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(g_out, eager2, rtol=0, atol=0)
    torch.testing.assert_close(g_lse, lse2, rtol=0, atol=0)
    assert not torch.equal(eager1, eager2)
