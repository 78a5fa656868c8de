"""Every bad argument of the predictors raises a TypeError / ValueError naming it."""

import functools

import pytest
import torch

import fgattn_cute as fg

Q = torch.randn(1, 40, 2, 16).bfloat16()
K = torch.randn(1, 30, 2, 16).bfloat16()
PREDICTORS = [fg.predict.calibrate, fg.predict.pooled_top_p]


def _call(predictor, **kwargs):
    args = {"q": Q, "k": K, "q_tile": 16}
    args.update(kwargs)
    return predictor(**args)


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"q": Q.float().numpy()}, TypeError, "q: expected a torch.Tensor"),
        ({"k": [1, 2]}, TypeError, "k: expected a torch.Tensor"),
        ({"q": Q[0]}, ValueError, r"q: expected a 4-D tensor \[B, S, H, D\]"),
        ({"k": K[..., 0]}, ValueError, "k: expected a 4-D tensor"),
        ({"q": Q[:, :0]}, ValueError, "q: expected every dimension"),
        ({"q": Q.to(torch.float64), "k": K.to(torch.float64)}, TypeError,
         "q: expected dtype torch.bfloat16, torch.float16 or torch.float32"),
        ({"q": Q.to(torch.int32)}, TypeError, "q: expected dtype"),
        ({"k": K.half()}, TypeError, r"k: expected the dtype of q \(torch.bfloat16\)"),
        ({"k": K.to("meta")}, ValueError, "k: expected the device of q"),
        ({"k": torch.randn(2, 30, 2, 16).bfloat16()}, ValueError, "k: expected batch B = 1"),
        ({"k": torch.randn(1, 30, 3, 16).bfloat16()}, ValueError, "k: expected heads H = 2"),
        ({"k": torch.randn(1, 30, 2, 8).bfloat16()}, ValueError, "k: expected head dim D = 16"),
        ({"q_tile": 0}, ValueError, r"q_tile: expected a positive int \(the CuTe kernel runs"),
        ({"q_tile": -64}, ValueError, "q_tile: expected a positive int"),
        ({"q_tile": 64.0}, TypeError, "q_tile: expected a positive Python int"),
        ({"q_tile": True}, TypeError, "q_tile: expected a positive Python int"),
        ({"q_tile": torch.tensor(64)}, TypeError, "q_tile"),
        ({"softmax_scale": 0.0}, ValueError, "softmax_scale: expected a positive finite float"),
        ({"softmax_scale": -1.0}, ValueError, "softmax_scale"),
        ({"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
        ({"softmax_scale": "0.1"}, TypeError, "softmax_scale"),
        ({"always_keep": 3}, TypeError, "always_keep: expected None, a bool tensor"),
        ({"always_keep": torch.zeros(31, dtype=torch.bool)}, ValueError,
         r"always_keep: expected a bool tensor of shape \[seqlen_k\] = \[30\]"),
        ({"always_keep": torch.zeros(1, 30, dtype=torch.bool)}, ValueError, "always_keep"),
        ({"always_keep": torch.tensor([0.0, 1.0])}, TypeError,
         "always_keep: expected dtype torch.bool or an integer dtype"),
        ({"always_keep": torch.tensor([[0, 1]])}, ValueError, "always_keep: expected a 1-D"),
        ({"always_keep": torch.tensor([0, 30])}, ValueError,
         r"always_keep: expected key ids in \[0, seqlen_k=30\), got 30"),
        ({"always_keep": torch.tensor([-1])}, ValueError, "always_keep: expected key ids"),
        ({"always_keep": [0, 30]}, ValueError, "always_keep: expected key ids"),
        ({"always_keep": [0, -1]}, ValueError, "always_keep: expected key ids"),
        ({"always_keep": [0, 1.5]}, TypeError, "always_keep: expected a list of int"),
        ({"always_keep": [True]}, TypeError, "always_keep: expected a list of int"),
        ({"always_keep": torch.tensor([1]).to("meta")}, ValueError,
         "always_keep: expected the device of q"),
        ({"capacity": 0}, ValueError, "capacity"),
        ({"capacity": 1.5}, TypeError, "capacity"),
    ],
)
def test_bad_common_argument(predictor, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(predictor, **kwargs)


@pytest.mark.parametrize(
    "threshold, exc",
    [(-0.1, ValueError), (float("inf"), ValueError), (float("nan"), ValueError),
     ("1", TypeError), (None, TypeError), (True, TypeError), (torch.tensor(0.5), TypeError)],
)
def test_bad_threshold(threshold, exc):
    with pytest.raises(exc, match="threshold: expected"):
        _call(fg.predict.calibrate, threshold=threshold)


@pytest.mark.parametrize(
    "p, exc",
    [(0.0, ValueError), (-0.5, ValueError), (1.0001, ValueError), (float("nan"), ValueError),
     (float("inf"), ValueError), ("0.9", TypeError), (None, TypeError), (True, TypeError)],
)
def test_bad_p(p, exc):
    with pytest.raises(exc, match=r"p: expected a float in \(0, 1\]"):
        _call(fg.predict.pooled_top_p, p=p)
    with pytest.raises(exc, match=r"p: expected a float in \(0, 1\]"):
        fg.predict.top_p_mask(torch.rand(3, 4), p)


def test_good_edge_values_accepted():
    _call(fg.predict.calibrate, threshold=0)  # an int is a real number
    _call(fg.predict.pooled_top_p, p=1)
    _call(fg.predict.pooled_top_p, p=1e-9, always_keep=[])
    _call(fg.predict.calibrate, q_tile=1000, always_keep=torch.tensor([], dtype=torch.long))


def test_top_p_mask_bad_probs():
    with pytest.raises(TypeError, match="probs: expected a float32 tensor"):
        fg.predict.top_p_mask(torch.rand(3, 4).double(), 0.5)
    with pytest.raises(TypeError, match="probs"):
        fg.predict.top_p_mask([0.5, 0.5], 0.5)


def test_pooled_probs_validates():
    with pytest.raises(ValueError, match="q_tile"):
        fg.predict.pooled_probs(Q, K, q_tile=0)
    with pytest.raises(TypeError, match="k: expected the dtype of q"):
        fg.predict.pooled_probs(Q, K.float())


def _pred(q, k):
    return fg.predict.calibrate(q, k, q_tile=16)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"predictor": None}, TypeError, "predictor: expected a callable"),
        ({"recalibrate_at": 5}, TypeError, "recalibrate_at: expected a set or list"),
        ({"recalibrate_at": "5"}, TypeError, "recalibrate_at"),
        ({"recalibrate_at": [1, -2]}, ValueError, "recalibrate_at: expected step numbers"),
        ({"recalibrate_at": [1.5]}, ValueError, "recalibrate_at"),
        ({"dense_steps": -1}, ValueError, "dense_steps: expected an int >= 0"),
        ({"dense_steps": 2.0}, ValueError, "dense_steps"),
        ({"compact": 1}, TypeError, "compact: expected a bool"),
        ({"max_bytes": 0}, ValueError, "max_bytes: expected None or a positive int"),
        ({"max_bytes": 1.5e9}, ValueError, "max_bytes"),
        ({"on_full": "drop"}, ValueError, "on_full: expected one of"),
    ],
)
def test_cache_bad_constructor_argument(kwargs, exc, match):
    args = {"predictor": _pred}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fg.predict.SparsityCache(**args)


def test_cache_bad_get_argument():
    cache = fg.predict.SparsityCache(_pred)
    with pytest.raises(ValueError, match="step: expected a Python int >= 0"):
        cache.get(0, -1, Q, K)
    with pytest.raises(TypeError, match="step"):
        cache.get(0, 1.0, Q, K)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        cache.get(0, 0, None, K)
    bad = fg.predict.SparsityCache(lambda q, k: "index")
    with pytest.raises(TypeError, match="predictor: expected it to return a fgattn_cute.KeyIndex"):
        bad.get(0, 0, Q, K)
    other = torch.randn(1, 20, 2, 16).bfloat16()
    wrong = fg.predict.SparsityCache(lambda q, k: _pred(q, other))
    with pytest.raises(ValueError, match="predictor: expected an index for"):
        wrong.get(0, 0, Q, K)
    with pytest.raises(ValueError, match="q_tile"):
        fg.predict.SparsityCache(functools.partial(fg.predict.calibrate, q_tile=0)).get(0, 0, Q, K)


def test_tf32_setting_restored_and_ignored():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        a = fg.predict.calibrate(Q, K, 16, threshold=1.0)
        b = fg.predict.pooled_top_p(Q, K, 16, p=0.9)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(a.indices, fg.predict.calibrate(Q, K, 16, threshold=1.0).indices)
    assert torch.equal(b.indices, fg.predict.pooled_top_p(Q, K, 16, p=0.9).indices)


def test_tile_means_kernel_refuses_more_query_tiles_than_its_grid_holds():
    """The tile-means kernel puts the query tiles in the grid's y (at most 65,535): longer q
    is refused by name before anything compiles or launches (an expanded view: no memory)."""
    from fgattn_cute.host.launch import MAX_GRID_YZ, run_tile_means_split_sm90

    q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16).expand(1, MAX_GRID_YZ * 128 + 1, 1, 64)
    with pytest.raises(ValueError, match=r"q: expected at most 65535 query tiles"):
        run_tile_means_split_sm90(q, 128)
