"""Per-tile timeline of the persistent attention kernel, from clock stamps taken inside it.

    python perf/timeline_attention.py --shape wan480-h12 --keeps 0.02,0.1,0.3,1 --out $OUT

The package's kernel source (fgattn_cute/kernels/fg_fwd_sm90.py) is patched at run time into a
copy that reads the SM clock at fixed points and stores it (low 31 bits) after the tile
counter, in the counter's own buffer, per (CTA, tile of that CTA, event):

- consumer warpgroup w (its thread 0): tile start (after the Q wait), K_0 full, block 0 done,
  steady loop done, last P V done, epilogue done; summed over the steady loop, the cycles
  spent waiting for K full, for the ping-pong barrier and for V full;
- producer thread 0: tile start, Q release seen, K_0 issued; summed over the tile, the
  cycles spent waiting for an empty K and an empty V stage.

Cycles become microseconds by the longest CTA's span over the kernel's median time, so the
figures are at the clock the card actually ran. Every patch anchor is checked: when the
kernel changes shape, the script stops naming the anchor that moved. Only the shipped
persistent configurations are patched (head dim 128 or 64, default engine). Timings of the
patched kernel (a few clock reads per stage) are not benchmark figures; use perf/ab_kernel.py
for those.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
from ab_kernel import SHAPES  # noqa: E402
from sweep import card_info, commit, median_ms  # noqa: E402

from fgattn_cute.host.compile import _fake_compact, _sym, default_config  # noqa: E402

KERNEL = Path(__file__).resolve().parent.parent / "fgattn_cute/kernels/fg_fwd_sm90.py"
MAX_TILES = 64  # tiles recorded per CTA (later ones wrap around)
EVENTS = 24

# (anchor, replacement): each anchor must occur exactly once in the kernel source.
PATCHES = [
    ("    def full_arrivals(self, method: str) -> int:",
     f"""    @cute.jit
    def stamp(self, mStamps: cute.Tensor, t: Int32, event: cutlass.Constexpr[int]):
        self.stamp_value(mStamps, t, event, Int32(cute.arch.clock64() & 0x7FFFFFFF))

    @cute.jit
    def stamp_value(self, mStamps: cute.Tensor, t: Int32, event: cutlass.Constexpr[int],
                    value: Int32):
        cta = Int32(cute.arch.block_idx()[0])
        mStamps[1 + (cta * {MAX_TILES} + t % {MAX_TILES}) * {EVENTS} + event] = value

    def full_arrivals(self, method: str) -> int:"""),
    ("                mCounts, tile_ids, scale_log2, seqlen_q,\n            )",
     "                mCounts, tile_ids, scale_log2, seqlen_q, mTileCounter,\n            )"),
    ("""        seqlen_q: Int32,
    ):
        tidx = cute.arch.thread_idx()[0] - WARPGROUP""",
     """        seqlen_q: Int32,
        mStamps: cute.Tensor,
    ):
        tidx = cute.arch.thread_idx()[0] - WARPGROUP"""),
    ("""                count = mCounts[batch, head, m_block]
                self.consume_tile(
                    mO, mLSE, sQ, sO, sK, sV, tma_atom_O, mma_qk, mma_pv, bar_q, ring_k,
                    ring_v, count, fills, scale_log2, seqlen_q, m_block, head, batch, tidx, wg,
                )""",
     """                count = mCounts[batch, head, m_block]
                if tidx == 0:
                    self.stamp(mStamps, t, 0)
                self.consume_tile(
                    mO, mLSE, sQ, sO, sK, sV, tma_atom_O, mma_qk, mma_pv, bar_q, ring_k,
                    ring_v, count, fills, scale_log2, seqlen_q, m_block, head, batch, tidx, wg,
                    mStamps, t,
                )
                if tidx == 0:
                    self.stamp_value(mStamps, t, 15, count)"""),
    ("""            if tidx == 0:
                # The last O store must have read its smem before the CTA exits.""",
     """            if tidx == 0:
                self.stamp(mStamps, t, 0)
            if tidx == 0:
                # The last O store must have read its smem before the CTA exits."""),
    ("                mCounts[batch, head, m_block], 0, scale_log2, seqlen_q, m_block, head, "
     "batch,\n                tidx, wg,\n            )",
     "                mCounts[batch, head, m_block], 0, scale_log2, seqlen_q, m_block, head, "
     "batch,\n                tidx, wg, mStamps, 0,\n            )"),
    ("""        tidx: Int32,
        wg: Int32,
    ):
        \"\"\"One query tile""",
     """        tidx: Int32,
        wg: Int32,
        mStamps: cute.Tensor,
        t: Int32,
    ):
        \"\"\"One query tile"""),
    ("""            self.wait_stage(ring_k, stage, phase, self.k_method)
            acc_S = cute.make_rmem_tensor(s_shape, Float32)""",
     """            self.wait_stage(ring_k, stage, phase, self.k_method)
            if tidx % WARPGROUP == 0:
                self.stamp(mStamps, t, 1 + 5 * wg)
            acc_S = cute.make_rmem_tensor(s_shape, Float32)"""),
    ("""            tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))

            # The last block""",
     """            tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))
            if tidx % WARPGROUP == 0:
                self.stamp(mStamps, t, 2 + 5 * wg)

            # The last block"""),
    ("""            for n in cutlass.range(1, n_blocks - 1, unroll=1):
                self.consume_step(
                    mma_qk, mma_pv, acc_O, tOrP, tSrQ, tSrK, tOrVt, tScS, softmax, ring_k,
                    ring_v, fills, n, count, wg, lane, False,
                )""",
     """            k_wait = Int32(0)
            turn_wait = Int32(0)
            v_wait = Int32(0)
            for n in cutlass.range(1, n_blocks - 1, unroll=1):
                dk, dt, dv = self.consume_step(
                    mma_qk, mma_pv, acc_O, tOrP, tSrQ, tSrK, tOrVt, tScS, softmax, ring_k,
                    ring_v, fills, n, count, wg, lane, False,
                )
                k_wait += dk
                turn_wait += dt
                v_wait += dv
            if tidx % WARPGROUP == 0:
                self.stamp_value(mStamps, t, 16 + 3 * wg, k_wait)
                self.stamp_value(mStamps, t, 17 + 3 * wg, turn_wait)
                self.stamp_value(mStamps, t, 18 + 3 * wg, v_wait)"""),
    ("""        if const_expr(self.separate_o):
            # Every Q K^T of this tile has completed""",
     """        if tidx % WARPGROUP == 0:
            self.stamp(mStamps, t, 3 + 5 * wg)
        if const_expr(self.separate_o):
            # Every Q K^T of this tile has completed"""),
    ("""        inv_sum = softmax.finish()
        scale_rows(acc_O, inv_sum)
        self.epilogue(
            acc_O, softmax.row_sum, mO, mLSE, sO, tma_atom_O, mma_pv, thr_pv, bar_q, tidx,
            seqlen_q, m_block, head, batch,
        )""",
     """        if tidx % WARPGROUP == 0:
            self.stamp(mStamps, t, 4 + 5 * wg)
        inv_sum = softmax.finish()
        scale_rows(acc_O, inv_sum)
        self.epilogue(
            acc_O, softmax.row_sum, mO, mLSE, sO, tma_atom_O, mma_pv, thr_pv, bar_q, tidx,
            seqlen_q, m_block, head, batch,
        )
        if tidx % WARPGROUP == 0:
            self.stamp(mStamps, t, 5 + 5 * wg)"""),
    ("""        stage, phase = ring_k.stage_phase(fills + n)
        self.wait_stage(ring_k, stage, phase, self.k_method)
        self.scheduler_wait(wg)""",
     """        stage, phase = ring_k.stage_phase(fills + n)
        c0 = cute.arch.clock()
        self.wait_stage(ring_k, stage, phase, self.k_method)
        c1 = cute.arch.clock()
        self.scheduler_wait(wg)
        c2 = cute.arch.clock()"""),
    ("""        self.gemm(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], True, -1)
        self.wait_stage(ring_v, stage_prev, phase_prev, self.v_method)""",
     """        self.gemm(mma_qk, acc_S, tSrQ, tSrK[None, None, None, stage], True, -1)
        c3 = cute.arch.clock()
        self.wait_stage(ring_v, stage_prev, phase_prev, self.v_method)
        c4 = cute.arch.clock()"""),
    ("""        scale_rows(acc_O, rescale)
        tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))

    @cute.jit
    def gemm(""",
     """        scale_rows(acc_O, rescale)
        tOrP.store(acc_as_operand_a(acc_S).load().to(self.dtype))
        return c1 - c0, c2 - c1, c4 - c3

    @cute.jit
    def gemm("""),
    ("""            while tile < num_tiles:
                m_block, head, batch = self.tile_coords(tile, mCounts)
                count = mCounts[batch, head, m_block]
                # CTAs take""",
     """            while tile < num_tiles:
                if tidx == 0:
                    self.stamp(mTileCounter, t, 11)
                m_block, head, batch = self.tile_coords(tile, mCounts)
                count = mCounts[batch, head, m_block]
                # CTAs take"""),
    ("""                    cute.arch.mbarrier_wait(bar_q + 1, (t % 2) ^ 1)
                    self.load_q(mQ, sQ, tma_atom_Q, bar_q, m_block, head, batch)
                self.produce_tile(""",
     """                    cute.arch.mbarrier_wait(bar_q + 1, (t % 2) ^ 1)
                    if tidx == 0:
                        self.stamp(mTileCounter, t, 12)
                    self.load_q(mQ, sQ, tma_atom_Q, bar_q, m_block, head, batch)
                self.produce_tile("""),
    ("                    mIndices[batch, head, m_block, None], count, fills, head, batch, tidx, "
     "warp,\n                    lane,\n                )",
     "                    mIndices[batch, head, m_block, None], count, fills, head, batch, tidx, "
     "warp,\n                    lane, mTileCounter, t,\n                )"),
    ("""                batch, tidx, warp, lane,
            )
        else:""",
     """                batch, tidx, warp, lane, mTileCounter, 0,
            )
        else:"""),
    ("""        warp: Int32,
        lane: Int32,
    ):
        \"\"\"Fill the K and V stages""",
     """        warp: Int32,
        lane: Int32,
        mStamps: cute.Tensor,
        t: Int32,
    ):
        \"\"\"Fill the K and V stages"""),
    ("""            prev_keys = keys
            for n in cutlass.range(n_blocks + 1, unroll=1):""",
     """            prev_keys = keys
            k_empty = Int32(0)
            v_empty = Int32(0)
            for n in cutlass.range(n_blocks + 1, unroll=1):"""),
    ("""                if n < n_blocks:
                    self.fill(self.k_method, k_src, fills + n, keys, tidx, warp)
                if n > 0:
                    self.fill(self.v_method, v_src, fills + n - 1, prev_keys, tidx, warp)""",
     """                if n < n_blocks:
                    k_empty += self.fill(self.k_method, k_src, fills + n, keys, tidx, warp)
                    if n == 0:
                        if tidx == 0:
                            self.stamp(mStamps, t, 13)
                if n > 0:
                    v_empty += self.fill(
                        self.v_method, v_src, fills + n - 1, prev_keys, tidx, warp
                    )"""),
    ("""                prev_keys = keys
                keys = next_keys
        else:""",
     """                prev_keys = keys
                keys = next_keys
            if tidx == 0:
                self.stamp_value(mStamps, t, 22, k_empty)
                self.stamp_value(mStamps, t, 23, v_empty)
        else:"""),
    ("""        ring.wait_empty(stage, phase)
        self.load_stage(
            method, ring, stage, contiguous, first_key, atom_tile, g_tile, sX, atom_row,
            g_rows, s_rows, mX, tma_key, cp_key, tidx, warp,
        )""",
     """        c0 = cute.arch.clock()
        ring.wait_empty(stage, phase)
        c1 = cute.arch.clock()
        self.load_stage(
            method, ring, stage, contiguous, first_key, atom_tile, g_tile, sX, atom_row,
            g_rows, s_rows, mX, tma_key, cp_key, tidx, warp,
        )
        return c1 - c0"""),
]


def instrumented_kernel_class():
    """FgAttentionForwardSm90 from the patched copy of the package's kernel source."""
    source = KERNEL.read_text()
    for anchor, replacement in PATCHES:
        n = source.count(anchor)
        if n != 1:
            raise SystemExit(f"patch anchor found {n} times (expected once) in {KERNEL}:\n"
                             f"{anchor}")
        source = source.replace(anchor, replacement)
    path = Path(tempfile.mkdtemp()) / "fg_fwd_sm90_timeline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fg_fwd_sm90_timeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FgAttentionForwardSm90


def signed(x: int) -> int:
    """A difference of two 31-bit clock readings, wrapped into (-2^30, 2^30]."""
    return ((x + (1 << 30)) % (1 << 31)) - (1 << 30)


def summarise(st, nsm, kernel_ms):
    """Median microseconds of each part of a tile, from the stamps of every CTA."""
    tiles = []  # (cta, t, events)
    for c in range(nsm):
        for t in range(MAX_TILES):
            e = [int(x) for x in st[c, t]]
            if e[15] == 0:  # count 0: no tile here (lists are never empty in this script)
                break
            tiles.append((c, t, e))
    spans = []
    for c in range(nsm):
        own = [x for x in tiles if x[0] == c]
        if own:
            spans.append(signed(int(st[c, len(own) % MAX_TILES][0]) - own[0][2][0]))
    cycles_per_us = max(spans) / (kernel_ms * 1000.0)

    def us(cycles):
        return cycles / cycles_per_us

    def d(e, a, b):
        return us(signed(e[a] - e[b]))

    nxt = {(c, t): e for c, t, e in tiles}
    blocks = {(c, t): (e[15] + 127) // 128 for c, t, e in tiles}
    steady = [(c, t, e) for c, t, e in tiles if blocks[c, t] > 2]
    parts = {
        "K_0 wait (tile start -> K_0 full)": [d(e, 1, 0) for _, _, e in tiles],
        "block 0 (Q K_0^T, softmax)": [d(e, 2, 1) for _, _, e in tiles],
        "steady loop, per stage": [d(e, 3, 2) / (blocks[c, t] - 2) for c, t, e in steady],
        "  of which K full wait": [us(e[16]) / (blocks[c, t] - 2) for c, t, e in steady],
        "  of which ping-pong wait": [us(e[17]) / (blocks[c, t] - 2) for c, t, e in steady],
        "  of which V full wait": [us(e[18]) / (blocks[c, t] - 2) for c, t, e in steady],
        "last P V": [d(e, 4, 3) for _, _, e in tiles],
        "epilogue": [d(e, 5, 4) for _, _, e in tiles],
        "epilogue end -> next tile start": [
            us(signed(nxt[c, t + 1][0] - e[5])) for c, t, e in tiles if (c, t + 1) in nxt
        ],
        "tile (start -> next start)": [
            us(signed(nxt[c, t + 1][0] - e[0])) for c, t, e in tiles if (c, t + 1) in nxt
        ],
        "producer: tile start -> Q release": [d(e, 12, 11) for _, _, e in tiles],
        "producer: Q release -> K_0 issued": [d(e, 13, 12) for _, _, e in tiles],
        "K_0 issued -> consumers see it full": [d(e, 1, 13) for _, _, e in tiles],
        "producer: empty-K wait per stage": [us(e[22]) / blocks[c, t] for c, t, e in tiles],
        "producer: empty-V wait per stage": [us(e[23]) / blocks[c, t] for c, t, e in tiles],
    }
    return len(tiles), cycles_per_us, {k: statistics.median(v) for k, v in parts.items() if v}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="wan480-h12", choices=sorted(SHAPES))
    p.add_argument("--keeps", default="0.02,0.1,0.3,1")
    p.add_argument("--out", default=None, help="folder for the raw stamps (torch.save)")
    args = p.parse_args(argv)
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32

    S, H, D = SHAPES[args.shape]
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    config = default_config(D, "bfloat16", 128, num_sms=nsm)
    if not config.max_ctas:
        raise SystemExit(f"{config} is not persistent: the timeline patches that path only")
    kernel = instrumented_kernel_class()(
        cutlass.BFloat16, D, q_tile=128, tile_n=config.tile_n, num_stages=config.num_stages,
        engine=config.engine, max_ctas=config.max_ctas)
    fake = list(config.fake_args())
    fake[7] = _fake_compact(Int32, (_sym(1)[0],), 4)  # the tile counter, then the stamps
    fn = cute.compile(kernel, *fake, options="--enable-tvm-ffi")
    name, _, clocks = card_info()
    print(f"card: {name} ({clocks}); commit {commit()}; {config}", flush=True)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dense_ms = median_ms(baselines.fa4_dense(q, k, v), 5, warmup=2)
    stamps = torch.zeros(1 + config.max_ctas * MAX_TILES * EVENTS, dtype=torch.int32,
                         device="cuda")
    n_tiles = H * -(-S // 128)
    for keep in (float(x) for x in args.keeps.split(",")):
        index = baselines.random_lists(1, H, S, S, 128, keep, "cuda")
        out = torch.full_like(q, float("nan"))
        lse = torch.full((1, H, S), float("nan"), device="cuda")

        def run(out=out, lse=lse, index=index):
            stamps.zero_()  # also the tile counter, which must be zero at launch
            fn(q, k, v, out, lse, index.indices, index.counts, stamps, D**-0.5)

        ms = median_ms(run, 5, warmup=2)
        run()
        torch.cuda.synchronize()
        if out.isnan().any():
            raise SystemExit("the instrumented kernel left NaN in the output")
        st = stamps[1:].view(config.max_ctas, MAX_TILES, EVENTS).cpu().long()
        recorded, cycles_per_us, parts = summarise(st, config.max_ctas, ms)
        print(f"\n{args.shape} keep {keep}: instrumented kernel {ms:.3f} ms "
              f"({ms / (keep * dense_ms):.2f} x keep x FA4 dense {dense_ms:.3f} ms), "
              f"{recorded} of {n_tiles} tiles recorded, {cycles_per_us:.0f} cycles/us")
        for part, value in parts.items():
            print(f"  {part:40s} {value:8.2f} us")
        if args.out:
            torch.save(st, os.path.join(args.out, f"timeline-{args.shape}-{keep}.pt"))


if __name__ == "__main__":
    main()
