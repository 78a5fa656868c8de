"""SparsityCache across a simulated 50-step denoising schedule."""

import functools

import pytest
import torch

import fgattn_cute as fg
from fgattn_cute.predict import SparsityCache, SparsityCacheFull

LAYERS = 3
STEPS = 50
B, S, H, D, M = 1, 200, 2, 16, 64
N_TILES = (S + M - 1) // M
BITMAP_BYTES = B * H * N_TILES * ((S + 7) // 8)


class Counting:
    """A predictor that records the (layer-independent) calls it gets."""

    def __init__(self, threshold=1.0):
        self.calls = 0
        self.predict = functools.partial(fg.predict.calibrate, q_tile=M, threshold=threshold)

    def __call__(self, q, k):
        self.calls += 1
        return self.predict(q, k)


def _qk(layer, step):
    """Different q, k for every (layer, step), as in a real denoising run."""
    gen = torch.Generator().manual_seed(1000 * layer + step)
    q = torch.randn(B, S, H, D, generator=gen).bfloat16()
    k = torch.randn(B, S, H, D, generator=gen).bfloat16()
    return q, k


def _same(a, b):
    return (torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)
            and a.q_tile == b.q_tile)


def _run(cache, steps=range(STEPS), layers=range(LAYERS)):
    """Run the schedule; returns {(layer, step): (kind, index)} with kind in dense / new /
    reused, judged from the cache's counters."""
    seen = {}
    for step in steps:
        for layer in layers:
            before = cache.stats
            q, k = _qk(layer, step)
            index = cache.get(layer, step, q, k)
            after = cache.stats
            kind = next(name for name in ("dense", "predictor_calls", "reused")
                        if after[name] == before[name] + 1)
            seen[(layer, step)] = (kind, index)
    return seen


@pytest.mark.parametrize("compact", [True, False])
def test_fifty_step_schedule(compact):
    predictor = Counting()
    recal = {5, 15, 30}
    cache = SparsityCache(predictor, recalibrate_at=recal, dense_steps=5, compact=compact)
    seen = _run(cache)
    stats = cache.stats
    assert predictor.calls == LAYERS * len(recal) == stats["predictor_calls"]
    assert stats["dense"] == LAYERS * 5
    assert stats["reused"] == LAYERS * (STEPS - 5 - len(recal))
    assert stats["shape_changes"] == stats["generations"] == stats["evictions"] == 0
    for layer in range(LAYERS):
        last = None
        for step in range(STEPS):
            kind, index = seen[(layer, step)]
            if step < 5:
                assert kind == "dense" and index is None
                continue
            if step in recal:
                assert kind == "predictor_calls"
                q, k = _qk(layer, step)
                assert _same(index, predictor.predict(q, k))  # predicted from this step's q, k
                last = (step, index)
            else:
                assert kind == "reused"
                assert _same(index, last[1])  # the index of the last calibration step
                assert index.trusted and index.capacity == last[1].capacity
    per_layer = BITMAP_BYTES if compact else seen[(0, 49)][1].nbytes
    assert cache.nbytes == LAYERS * per_layer and len(cache) == LAYERS
    cache.clear()
    assert cache.nbytes == 0 and len(cache) == 0


def test_first_sparse_step_predicts_without_schedule():
    predictor = Counting()
    cache = SparsityCache(predictor, dense_steps=3)
    _run(cache, steps=range(10))
    assert predictor.calls == LAYERS
    assert cache.stats["reused"] == LAYERS * 6


def test_repeated_calls_in_a_step_reuse():
    # Classifier-free guidance: two transformer passes per step.
    predictor = Counting()
    cache = SparsityCache(predictor, recalibrate_at={2, 4})
    for step in range(6):
        for _ in range(2):
            cache.get("attn1", step, *_qk(0, step))
    assert predictor.calls == 3  # steps 0 (no entry), 2 and 4
    assert cache.stats["reused"] == 12 - 3


def test_new_generation_drops_entries():
    predictor = Counting()
    cache = SparsityCache(predictor, dense_steps=2)
    _run(cache, steps=range(10))
    assert predictor.calls == LAYERS
    _run(cache, steps=range(10))  # steps restart at 0: a second video
    assert predictor.calls == 2 * LAYERS
    assert cache.stats["generations"] == 1


def test_shape_change_predicts_again():
    predictor = Counting()
    cache = SparsityCache(predictor)
    q, k = _qk(0, 0)
    cache.get(0, 0, q, k)
    index = cache.get(0, 1, q[:, :150], k[:, :150])
    assert predictor.calls == 2 and index.seqlen_q == 150
    assert cache.stats["shape_changes"] == 1


def test_max_bytes_raise():
    predictor = Counting()
    cache = SparsityCache(predictor, max_bytes=2 * BITMAP_BYTES)
    cache.get(0, 0, *_qk(0, 0))
    cache.get(1, 0, *_qk(1, 0))
    assert cache.nbytes == 2 * BITMAP_BYTES
    with pytest.raises(SparsityCacheFull, match="max_bytes"):
        cache.get(2, 0, *_qk(2, 0))
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    # Replacing a layer's own entry fits.
    cache2 = SparsityCache(predictor, recalibrate_at={1}, max_bytes=BITMAP_BYTES)
    cache2.get(0, 0, *_qk(0, 0))
    cache2.get(0, 1, *_qk(0, 1))
    assert cache2.nbytes == BITMAP_BYTES
    # One index larger than the bound always raises, also with eviction.
    tiny = SparsityCache(predictor, max_bytes=BITMAP_BYTES - 1, on_full="evict")
    with pytest.raises(SparsityCacheFull):
        tiny.get(0, 0, *_qk(0, 0))


def test_max_bytes_evict_least_recently_used():
    predictor = Counting()
    cache = SparsityCache(predictor, max_bytes=2 * BITMAP_BYTES, on_full="evict")
    for step in range(4):
        for layer in range(LAYERS):
            cache.get(layer, step, *_qk(layer, step))
            assert cache.nbytes <= 2 * BITMAP_BYTES
    # Layers visited cyclically with room for two: every visit finds its entry evicted.
    assert predictor.calls == LAYERS * 4
    assert cache.stats["evictions"] == LAYERS * 4 - 2
    # With a layer revisited at once it stays (it is the most recently used).
    cache.clear()
    cache.get(0, 0, *_qk(0, 0))
    cache.get(1, 0, *_qk(1, 0))
    cache.get(0, 0, *_qk(0, 0))  # touch layer 0
    cache.get(2, 0, *_qk(2, 0))  # evicts layer 1
    assert 0 in cache and 2 in cache and 1 not in cache


def test_compact_is_smaller_and_equal():
    predictor = Counting(threshold=0.0)  # every key: lists are widest
    packed = SparsityCache(predictor, compact=True)
    lists = SparsityCache(predictor, compact=False)
    q, k = _qk(0, 0)
    first = packed.get(0, 0, q, k)
    again = packed.get(0, 1, q, k)
    assert _same(first, again)
    lists.get(0, 0, q, k)
    assert packed.nbytes * 16 < lists.nbytes
