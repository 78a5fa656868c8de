"""A ring of shared-memory stages guarded by mbarriers (one `full` and one `empty` per stage).

The producer waits on `empty[s]` before refilling stage s and the data lands on `full[s]` (by
TMA transaction bytes or by cp.async arrivals); consumers wait on `full[s]` and arrive on
`empty[s]` once they no longer read the stage. Phases follow the usual parity convention: a
fresh mbarrier is in phase 0, so a producer's first wait (parity 1) passes at once.
"""

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Uint32

from fgattn_cute.kernels.carry import DslCarried


class StageRing(DslCarried):
    """Full/empty mbarrier pairs for `stages` buffers, stored contiguously in shared memory."""

    _dsl_fields = ("full", "empty")

    def __init__(self, barriers: cute.Pointer, stages: int):
        self.full = barriers
        self.empty = barriers + stages
        self.stages = stages

    def init(self, full_arrivals: int, empty_arrivals: int):
        """Called by one thread before the CTA-wide barrier that publishes the mbarriers."""
        for s in range(self.stages):
            cute.arch.mbarrier_init(self.full + s, full_arrivals)
            cute.arch.mbarrier_init(self.empty + s, empty_arrivals)

    def stage_phase(self, n: Int32):
        """Stage index and consumer parity of the n-th fill of the ring (n >= 0).

        Unsigned arithmetic: a signed division of a runtime n needs a sign fix-up each time,
        and in the persistent kernel, where n counts on across tiles, those few instructions
        per wait cost 5-6% at head dim 128 (perf/NOTES.md, step 15).
        """
        u = Uint32(n)
        if cutlass.const_expr(self.stages & (self.stages - 1) == 0):
            shift = self.stages.bit_length() - 1
            return Int32(u & (self.stages - 1)), Int32((u >> shift) & 1)
        return Int32(u % self.stages), Int32((u // self.stages) & 1)

    def wait_full(self, stage: Int32, phase: Int32):
        cute.arch.mbarrier_wait(self.full + stage, phase)

    def wait_empty(self, stage: Int32, phase: Int32):
        cute.arch.mbarrier_wait(self.empty + stage, phase ^ 1)

    def expect_bytes(self, stage: Int32, num_bytes: int):
        """One thread: the producer's single arrival, announcing the TMA bytes to come."""
        cute.arch.mbarrier_arrive_and_expect_tx(self.full + stage, num_bytes)

    def arrive_cp_async(self, stage: Int32):
        """Every producer thread: arrive on full[stage] once its earlier cp.async copies land."""
        cute.arch.cp_async_mbarrier_arrive_noinc(self.full + stage)

    def release(self, stage: Int32):
        """One lane per consumer warp (the caller elects it): the stage may be refilled."""
        cute.arch.mbarrier_arrive(self.empty + stage)
