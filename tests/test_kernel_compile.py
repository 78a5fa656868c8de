"""Every shipped kernel configuration compiles for sm_90a without a GPU, and its machine code
is what the design says: wgmma (HGMMA), the gather instructions of its engine, register
reallocation, and no local-memory spills."""

import os

import pytest

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ["CUTE_DSL_KEEP"] = "cubin"

from fgattn_cute.host import compile as kcompile  # noqa: E402

CONFIGS = kcompile.all_configs() + [
    # not shipped by default: one CTA per query tile (cpasync), and persistent CTAs for the
    # TMA-row engine at hdim 128 with O over Q (3 stages) and in its own buffer (2 stages)
    kcompile.KernelConfig(128, "bfloat16", 128, "cpasync", 128, 2),
    kcompile.KernelConfig(64, "bfloat16", 128, "cpasync", 128, 3),
    kcompile.KernelConfig(128, "float16", 128, "tma", 128, 3, max_ctas=132),
    kcompile.KernelConfig(128, "bfloat16", 128, "tma", 128, 2, max_ctas=132),
]


def _config_id(config):
    return "-".join(map(str, vars(config).values()))


def _hist(config):
    return kcompile.sass_histogram(kcompile.sass_of(config, arch="sm_90a"))


@pytest.fixture(scope="module")
def histograms():
    return {c: _hist(c) for c in CONFIGS}


def _count(hist, prefix):
    return sum(n for op, n in hist.items() if op.startswith(prefix))


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_machine_code(config, histograms):
    hist = histograms[config]
    # S = Q K^T and O += P V: one wgmma per 16-wide k-block of each, in four places (first
    # block: S only; steady-state loop and the peeled last block: both; final O += P V).
    qk = config.head_dim // 16
    pv = config.tile_n // 16
    assert _count(hist, "HGMMA.64x") == 3 * qk + 3 * pv, hist
    assert _count(hist, "LDL") == 0 and _count(hist, "STL") == 0, f"spills: {hist}"
    assert hist["USETMAXREG.DEALLOC.CTAPOOL"] == 1 and hist["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1
    assert _count(hist, "UTMASTG") >= 1  # O leaves by one TMA store
    # Persistent CTAs take each further tile with one global atomic add; one CTA per tile none.
    assert _count(hist, "ATOMG.E.ADD") == (1 if config.max_ctas else 0), hist

    chunks = config.head_dim // 64
    rows_per_warp = config.tile_n // 4
    row_boxes = rows_per_warp * chunks  # one-row TMA boxes per warp and tensor
    cp_copies = (config.tile_n // 16) * chunks  # 16-byte cp.async per thread and tensor
    q_and_tiles = 3 * chunks  # Q, plus the whole-tile boxes of contiguous K and V stages
    tma_loads = _count(hist, "UTMALDG")
    cp_async = _count(hist, "LDGSTS.E.BYPASS.128")
    if config.engine == "cpasync":
        assert cp_async == 2 * cp_copies and tma_loads == q_and_tiles, hist
        assert _count(hist, "ARRIVES.LDGSTSBAR") == 2
    elif config.engine == "tma":
        assert cp_async == 0 and tma_loads == q_and_tiles + 2 * row_boxes, hist
    else:  # hybrid: K by TMA rows, V by cp.async
        assert cp_async == cp_copies and tma_loads == q_and_tiles + row_boxes, hist


CALIBRATE_CONFIGS = kcompile.all_calibrate_configs()


@pytest.mark.parametrize("config", CALIBRATE_CONFIGS,
                         ids=_config_id)
def test_calibrate_machine_code(config):
    """Two Q K^T passes (wgmma), K by whole-tile TMA, the bitmap ORed with shared-memory
    atomics, one exponential per score in pass 1, no spills."""
    hist = _hist(config)
    # Two passes: with overlap (q_tile 64) a first tile and a loop of one 64-row wgmma each,
    # without (q_tile 128) one loop of two 64-row wgmmas.
    assert _count(hist, "HGMMA.64x128x16") == 4 * (config.head_dim // 16), hist
    assert _count(hist, "LDL") == 0 and _count(hist, "STL") == 0, f"spills: {hist}"
    assert hist["USETMAXREG.DEALLOC.CTAPOOL"] == 1 and hist["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1
    assert _count(hist, "UTMALDG") == 3 * (config.head_dim // 64), hist  # 2 Q tiles, a K tile
    assert _count(hist, "ATOMS.OR") >= 1 and _count(hist, "LDGSTS") == 0, hist


def test_calibrate_configs_cover_dtype_head_dim_and_q_tile():
    seen = {(c.head_dim, c.dtype, c.q_tile) for c in CALIBRATE_CONFIGS}
    assert len(seen) == 2 * 2 * 2
    with pytest.raises(ValueError, match="q_tile"):
        kcompile.CalibrateConfig(128, "bfloat16", q_tile=32)
    with pytest.raises(ValueError, match="head_dim"):
        kcompile.CalibrateConfig(96, "bfloat16")


@pytest.mark.parametrize("config", kcompile.all_top_p_configs(),
                         ids=_config_id)
def test_top_p_machine_code(config):
    """The histogram weights go through native 32-bit shared-memory atomics (a 64-bit add
    would be a compare-and-swap loop), and nothing spills."""
    hist = _hist(config)
    assert _count(hist, "ATOMS.ADD") >= 3 and _count(hist, "ATOMS.CAS") == 0, hist
    assert _count(hist, "LDL") == 0 and _count(hist, "STL") == 0, f"spills: {hist}"


def test_top_p_config_per_row_length():
    """Rows up to 18,432 keys get the two-per-SM configuration, up to 40,960 the one-per-SM
    one in shared memory, longer ones the streaming kernel; short rows outside shared memory
    are refused."""
    pick = kcompile.TopPConfig.for_rows
    assert pick(1).short_rows and pick(18432).short_rows and pick(18432).row_in_smem
    assert not pick(18433).short_rows and pick(18433).row_in_smem
    assert pick(40960).row_in_smem and not pick(40961).row_in_smem
    assert pick(17550, from_probs=True).from_probs
    assert set(map(pick, (17550, 32760, 75600))) <= set(kcompile.all_top_p_configs())
    with pytest.raises(ValueError, match="short_rows"):
        kcompile.TopPConfig(False, row_in_smem=False, short_rows=True)
    # Longer rows go to the streaming kernel, up to its bitmaps' bound, which the predictor's
    # host code checks against its own copy (pooled does not import the DSL).
    from fgattn_cute.kernels import top_p_stream_sm90
    from fgattn_cute.kernels.top_p_sm90 import TopPSelectSm90
    from fgattn_cute.predict import pooled

    assert isinstance(pick(40961).kernel(), top_p_stream_sm90.TopPStreamSm90)
    assert type(pick(40960).kernel()) is TopPSelectSm90
    assert pooled._CUTE_MAX_SEQLEN_K == top_p_stream_sm90.MAX_SEQLEN_K


@pytest.mark.parametrize("config", kcompile.all_tile_means_configs(),
                         ids=_config_id)
def test_tile_means_machine_code(config):
    """Queries are read with 16-byte loads, and nothing spills."""
    hist = _hist(config)
    assert _count(hist, "LDG.E.128") >= 1 and _count(hist, "LDG.E.U16") == 0, hist
    assert _count(hist, "LDL") == 0 and _count(hist, "STL") == 0, f"spills: {hist}"


@pytest.mark.parametrize("config", kcompile.all_pooled_scores_configs(),
                         ids=_config_id)
def test_pooled_scores_machine_code(config):
    """Three wgmma k-loops (hi, mid, lo) per K tile into one accumulator, A and K by TMA,
    register reallocation, no spills."""
    hist = _hist(config)
    assert _count(hist, "HGMMA.64x128x16") == 3 * (config.head_dim // 16), hist
    assert _count(hist, "UTMALDG") == 3 * (config.head_dim // 64) + config.head_dim // 64, hist
    assert hist["USETMAXREG.DEALLOC.CTAPOOL"] == 1 and hist["USETMAXREG.TRY_ALLOC.CTAPOOL"] == 1
    assert _count(hist, "LDL") == 0 and _count(hist, "STL") == 0, f"spills: {hist}"


@pytest.mark.parametrize("config", kcompile.all_key_lists_configs(),
                         ids=_config_id)
def test_key_lists_machine_code(config):
    """Bits -> lists: blocks of 32 keep words unrolled (a popcount per word when counting and
    two when writing; from a mask, a ballot per word over 32 loads issued together), the zeros
    after the count by 16-byte stores; lists -> bits: 32-bit shared-memory ORs. No spills."""
    hist = _hist(config)
    if config.to_lists:
        assert _count(hist, "POPC") >= 3 * 32 and _count(hist, "STG.E.128") >= 1, hist
        loads = 4 if config.packed else 32  # one block's: 4 bytes a lane, or a byte per word
        assert _count(hist, "LDG.E.U8") >= loads, hist
        assert _count(hist, "VOTE.ANY") == (0 if config.packed else 2 * 32), hist
    else:
        assert _count(hist, "ATOMS.OR") >= 1 and _count(hist, "ATOMS.CAS") == 0, hist
    assert _count(hist, "LDL") == 0 and _count(hist, "STL") == 0, f"spills: {hist}"


def test_key_lists_configs_cover_both_directions_and_forms():
    seen = {(c.to_lists, c.packed) for c in kcompile.all_key_lists_configs()}
    assert len(seen) == 4
    # The host's copy of the lists -> bits bound (key_index does not import the DSL).
    from fgattn_cute.host import key_index
    from fgattn_cute.kernels import key_lists_sm90

    assert key_index._MAX_SEQLEN_K_BITS == key_lists_sm90.MAX_SEQLEN_K


def test_tile_means_configs_cover_dtype_head_dim_and_q_tile():
    seen = {(c.head_dim, c.dtype, c.q_tile) for c in kcompile.all_tile_means_configs()}
    assert len(seen) == 2 * 2 * 2
    with pytest.raises(ValueError, match="head_dim"):
        kcompile.TileMeansConfig(96, "bfloat16")


def test_every_engine_dtype_head_dim_and_q_tile_is_covered():
    seen = {(c.head_dim, c.dtype, c.q_tile, c.engine) for c in CONFIGS}
    assert len(seen) == 2 * 2 * 2 * len(kcompile.ENGINES)


def test_persistent_ctas_where_measured_faster():
    """Persistent CTAs, one per SM, in every shipped configuration but the TMA-row engine at
    hdim 128 (perf/NOTES.md, steps 12 and 15)."""
    for config in kcompile.all_configs():
        one_per_tile = config.head_dim == 128 and config.engine == "tma"
        assert config.max_ctas == (0 if one_per_tile else 132), config
    assert kcompile.default_config(64, "bfloat16", 128, num_sms=114).max_ctas == 114
    assert kcompile.default_config(128, "bfloat16", 128, num_sms=114).max_ctas == 114
    assert kcompile.default_config(128, "bfloat16", 128, "tma", num_sms=114).max_ctas == 0
    assert kcompile.default_config(128, "float16", 64, "hybrid", num_sms=78).max_ctas == 78
    with pytest.raises(ValueError, match="max_ctas"):
        kcompile.KernelConfig(128, "bfloat16", max_ctas=-1)


def test_o_gets_its_own_buffer_where_it_fits():
    import cutlass

    from fgattn_cute.kernels.fg_fwd_sm90 import FgAttentionForwardSm90

    # Q 32 KiB + O 32 KiB + 2 stages x (K + V) 128 KiB fits; with 3 stages O goes over Q.
    assert FgAttentionForwardSm90(cutlass.BFloat16, 128, num_stages=2, max_ctas=132).separate_o
    assert not FgAttentionForwardSm90(cutlass.BFloat16, 128, num_stages=3, max_ctas=8).separate_o
    assert FgAttentionForwardSm90(cutlass.BFloat16, 64, num_stages=4, max_ctas=8).separate_o
    assert not FgAttentionForwardSm90(cutlass.BFloat16, 128, num_stages=2).separate_o  # 1 per tile


def test_config_rejects_what_the_kernel_lacks():
    with pytest.raises(ValueError, match="head_dim"):
        kcompile.KernelConfig(96, "bfloat16")
    with pytest.raises(ValueError, match="q_tile"):
        kcompile.KernelConfig(128, "bfloat16", q_tile=32)
    with pytest.raises(ValueError, match="engine"):
        kcompile.KernelConfig(128, "bfloat16", engine="gather4")
    with pytest.raises(ValueError, match="dtype"):
        kcompile.KernelConfig(128, "float32")


def test_too_many_stages_for_shared_memory():
    import cutlass

    from fgattn_cute.kernels.fg_fwd_sm90 import FgAttentionForwardSm90

    with pytest.raises(ValueError, match="shared memory"):
        FgAttentionForwardSm90(cutlass.BFloat16, 128, num_stages=4)


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    """A compile is exported to the disk cache and a fresh process-level lookup loads it."""
    monkeypatch.setenv("FGATTN_CACHE_DIR", str(tmp_path))
    config = kcompile.KernelConfig(64, "float16", q_tile=64, engine="cpasync", num_stages=3)
    fn = kcompile.compile_fwd(config, arch="sm_90a")
    files = list(tmp_path.rglob("*.o"))
    assert fn is not None and len(files) == 1 and files[0].stat().st_size > 0
    assert kcompile.source_fingerprint() in str(files[0])
    kcompile._memory_cache.clear()
    loaded = kcompile._load_from_disk(config, "sm_90a")
    assert loaded is not None


def test_timeline_instrumentation_still_applies():
    """perf/timeline_attention.py patches the kernel's source at fixed anchors: after a kernel
    edit they must still be found once each, and the instrumented kernel must compile."""
    import sys
    from pathlib import Path

    import cutlass
    import cutlass.cute as cute

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))
    import timeline_attention

    config = kcompile.default_config(128, "bfloat16", 128, num_sms=132)
    kernel = timeline_attention.instrumented_kernel_class()(
        cutlass.BFloat16, 128, q_tile=128, tile_n=config.tile_n, num_stages=config.num_stages,
        engine=config.engine, max_ctas=config.max_ctas)
    fake = list(config.fake_args())
    fake[7] = kcompile._fake_compact(cutlass.Int32, (kcompile._sym(1)[0],), 4)
    cute.compile(kernel, *fake, options="--enable-tvm-ffi")
