"""Compile the sm90 kernels once per static configuration; cache them in memory and on disk.

The kernels: the attention forward (``KernelConfig``), the calibrate predictor
(``CalibrateConfig``), the three of the pooled top-p predictor: tile means
(``TileMeansConfig``), scores (``PooledScoresConfig``) and selection (``TopPConfig``), and the
KeyIndex conversions between keep bits and lists (``KeyListsConfig``). Batch, heads, sequence
lengths, the number of query tiles or rows and the list capacity are dynamic (symbolic sizes
and strides), so one compile serves every problem shape. The static key is the arch and the
config's fields.

On a machine without a GPU set CUTE_DSL_ARCH=sm_90a: compiling needs no GPU and no CUDA
toolkit (the DSL wheel carries NVVM and ptxas). The disk cache holds the exported object of
each compile under a directory named by a fingerprint of the kernel sources, the DSL and
tvm-ffi versions and the Python version, so editing a kernel never loads a stale binary.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

ENGINES = ("cpasync", "tma", "hybrid")
DEFAULT_ENGINE = "cpasync"
_EXPORT_NAME = "fgattn_fwd_sm90"


def _check_head_dim_dtype(head_dim: int, dtype: str):
    """The checks every config of a kernel that reads q or k shares."""
    if head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {head_dim}")
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"dtype must be 'bfloat16' or 'float16', got {dtype!r}")


def _check_tile_shape(head_dim: int, dtype: str, q_tile: int):
    """The checks of the kernels that also work in query tiles."""
    _check_head_dim_dtype(head_dim, dtype)
    if q_tile not in (64, 128):
        raise ValueError(f"q_tile must be 64 or 128, got {q_tile}")


def _check_stages(num_stages: int):
    if num_stages not in (2, 3, 4):
        raise ValueError(f"num_stages must be 2, 3 or 4, got {num_stages}")


# Fake arguments for compiling without tensors: symbolic sizes and strides, so one compile
# serves every shape (the DSL is imported only when a kernel is built).
def _dsl_dtype(name: str):
    import cutlass

    return {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}[name]


def _fake_rows(dtype, shape, divisibility, align):
    """shape with the last dim contiguous and every other stride any multiple of divisibility
    (rows padded past their length, or slices of longer rows)."""
    import cutlass.cute as cute

    stride = tuple(cute.sym_int64(divisibility=divisibility) for _ in shape[1:]) + (1,)
    return cute.runtime.make_fake_tensor(dtype, shape, stride=stride, assumed_align=align)


def _fake_tokens(dtype, batch, seqlen, heads, head_dim):
    """[B, S, H, D] with any strides that keep 16-byte alignment (8 elements of 16 bits), head
    dim contiguous."""
    return _fake_rows(dtype, (batch, seqlen, heads, head_dim), 8, 16)


def _fake_compact(dtype, shape, align):
    import cutlass.cute as cute

    order = tuple(reversed(range(len(shape))))
    return cute.runtime.make_fake_compact_tensor(
        dtype, shape, stride_order=order, assumed_align=align
    )


def _fake_stream():
    import cutlass.cute as cute

    return cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)


def _sym(n: int):
    import cutlass.cute as cute

    return [cute.sym_int32() for _ in range(n)]


@dataclass(frozen=True)
class KernelConfig:
    """Everything that is static in one compiled forward kernel."""

    head_dim: int
    dtype: str  # "bfloat16" or "float16"
    q_tile: int = 128
    engine: str = DEFAULT_ENGINE
    tile_n: int = 128
    num_stages: int = 2
    gather_only: bool = False  # benchmark mode (perf/bench_gather.py): no math
    # Persistent CTAs: at most this many (one per SM), each looping over query tiles; 0: one
    # CTA per query tile.
    max_ctas: int = 0

    def __post_init__(self):
        _check_tile_shape(self.head_dim, self.dtype, self.q_tile)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.tile_n not in (64, 128):
            raise ValueError(f"tile_n must be 64 or 128, got {self.tile_n}")
        _check_stages(self.num_stages)
        if not isinstance(self.max_ctas, int) or self.max_ctas < 0:
            raise ValueError(f"max_ctas must be an int >= 0, got {self.max_ctas!r}")

    def kernel(self):
        from fgattn_cute.kernels.fg_fwd_sm90 import FgAttentionForwardSm90

        return FgAttentionForwardSm90(
            _dsl_dtype(self.dtype),
            self.head_dim,
            q_tile=self.q_tile,
            tile_n=self.tile_n,
            num_stages=self.num_stages,
            engine=self.engine,
            gather_only=self.gather_only,
            max_ctas=self.max_ctas,
        )

    def fake_args(self):
        """q, k, v, out, lse, indices, counts, tile counter, softmax_scale, stream."""
        from cutlass import Float32, Int32

        dtype = _dsl_dtype(self.dtype)
        b, h, seqlen_q, seqlen_k, n_q_tiles, capacity = _sym(6)
        return (
            _fake_tokens(dtype, b, seqlen_q, h, self.head_dim),
            _fake_tokens(dtype, b, seqlen_k, h, self.head_dim),
            _fake_tokens(dtype, b, seqlen_k, h, self.head_dim),
            _fake_tokens(dtype, b, seqlen_q, h, self.head_dim),
            _fake_compact(Float32, (b, h, seqlen_q), 4),
            _fake_compact(Int32, (b, h, n_q_tiles, capacity), 16),
            _fake_compact(Int32, (b, h, n_q_tiles), 4),
            _fake_compact(Int32, (1,), 4),
            Float32(1.0),
            _fake_stream(),
        )


@dataclass(frozen=True)
class CalibrateConfig:
    """Everything that is static in one compiled calibrate kernel (fg.predict.calibrate)."""

    head_dim: int
    dtype: str  # "bfloat16" or "float16"
    q_tile: int = 128
    num_stages: int = 3
    probe: str = ""  # benchmark probes of CalibrateSm90 (wrong results): "no_exp", "one_pass"
    pingpong: tuple = ("bits",)  # passes whose warpgroups take turns at issuing
    # pass 1: one exponential in this many on the FMA pipe (0: none); None picks per head dim
    fma_exp_every: int | None = None
    lazy_max: bool = True  # pass 1 without a row max per tile (CalibrateSm90.lazy_max)
    q_in_regs: bool = True  # Q as the wgmmas' register operand (CalibrateSm90.q_in_regs)

    def __post_init__(self):
        _check_tile_shape(self.head_dim, self.dtype, self.q_tile)
        _check_stages(self.num_stages)
        if self.fma_exp_every is None:
            # At head dim 64 pass 1 is bound by MUFU at twice its tensor time, and one
            # exponential in 8 on the FMA pipe is faster; at 128 issue slots bind and none is
            # (perf/NOTES.md, calibrate steps 10, 15 and 16).
            object.__setattr__(self, "fma_exp_every", 8 if self.head_dim == 64 else 0)

    def kernel(self):
        from fgattn_cute.kernels.calibrate_sm90 import CalibrateSm90

        return CalibrateSm90(_dsl_dtype(self.dtype), self.head_dim, self.q_tile,
                             self.num_stages, self.probe, self.pingpong, self.fma_exp_every,
                             self.lazy_max, self.q_in_regs)

    def fake_args(self):
        """q, k, keep words, indices, counts, softmax_scale, log_cut, stream."""
        from cutlass import Float32, Int32

        dtype = _dsl_dtype(self.dtype)
        b, h, seqlen_q, seqlen_k, n_q_tiles, capacity, n_words = _sym(7)
        return (
            _fake_tokens(dtype, b, seqlen_q, h, self.head_dim),
            _fake_tokens(dtype, b, seqlen_k, h, self.head_dim),
            _fake_compact(Int32, (n_words,), 4),
            _fake_compact(Int32, (b, h, n_q_tiles, capacity), 16),
            _fake_compact(Int32, (b, h, n_q_tiles), 4),
            Float32(1.0),
            Float32(0.0),
            _fake_stream(),
        )


# SMs of an H100 SXM or H200; the launcher passes the device's own count.
DEFAULT_NUM_SMS = 132


@dataclass(frozen=True)
class TopPConfig:
    """The pooled top-p selection kernel (fg.predict.pooled_top_p): from logits (softmax in the
    kernel) or, for tests, from probabilities."""

    from_probs: bool = False
    # False: rows longer than 40,960 keys, streamed from global memory twice, two CTAs a SM
    # (`TopPStreamSm90`)
    row_in_smem: bool = True
    short_rows: bool = False  # rows of at most 18,432 keys: two CTAs per SM
    # > 0: at most this many persistent CTAs, each selecting every grid-th row; 0: one per row
    max_ctas: int = 0

    def __post_init__(self):
        if self.short_rows and not self.row_in_smem:
            raise ValueError("short_rows: needs row_in_smem=True (short rows live in shared "
                             "memory)")
        if self.max_ctas < 0:
            raise ValueError(f"max_ctas: expected >= 0, got {self.max_ctas}")

    @staticmethod
    def for_rows(seqlen_k: int, from_probs: bool = False) -> TopPConfig:
        """The configuration that selects rows of seqlen_k keys: one CTA a row (persistent
        CTAs measured level or slower at every length: perf/NOTES.md, top-p sessions 15 and
        26)."""
        from fgattn_cute.kernels.top_p_sm90 import MAX_SEQLEN_K_SHORT, MAX_SEQLEN_K_SMEM

        return TopPConfig(from_probs, seqlen_k <= MAX_SEQLEN_K_SMEM,
                          seqlen_k <= MAX_SEQLEN_K_SHORT)

    def kernel(self):
        if not self.row_in_smem:
            from fgattn_cute.kernels.top_p_stream_sm90 import TopPStreamSm90

            return TopPStreamSm90(self.from_probs, self.max_ctas)
        from fgattn_cute.kernels.top_p_sm90 import TopPSelectSm90

        return TopPSelectSm90(self.from_probs, self.short_rows, self.max_ctas)

    def fake_args(self):
        """rows, their statistics [R, parts, 3], keep words, indices, counts, p, stream."""
        from cutlass import Float32, Float64, Int32

        rows, seqlen_k, capacity, n_words, n_parts = _sym(5)
        return (
            _fake_rows(Float32, (rows, seqlen_k), 1, 16),
            _fake_compact(Float32, (rows, n_parts, 3), 4),
            _fake_compact(Int32, (n_words,), 4),
            _fake_compact(Int32, (rows, capacity), 16),
            _fake_compact(Int32, (rows,), 4),
            Float64(0.5),
            _fake_stream(),
        )


@dataclass(frozen=True)
class TileMeansConfig:
    """The query side of fg.predict.pooled_top_p: tile means split in three 16-bit parts."""

    head_dim: int
    dtype: str  # "bfloat16" or "float16"
    q_tile: int = 128

    def __post_init__(self):
        _check_tile_shape(self.head_dim, self.dtype, self.q_tile)

    def kernel(self):
        from fgattn_cute.kernels.tile_means_sm90 import TileMeansSplitSm90

        return TileMeansSplitSm90(_dsl_dtype(self.dtype), self.head_dim, self.q_tile)

    def fake_args(self):
        """q, out [B, H, n_q_tiles, 3 D], stream."""
        dtype = _dsl_dtype(self.dtype)
        b, h, seqlen_q, n_q_tiles = _sym(4)
        return (
            _fake_tokens(dtype, b, seqlen_q, h, self.head_dim),
            _fake_compact(dtype, (b, h, n_q_tiles, 3 * self.head_dim), 16),
            _fake_stream(),
        )


@dataclass(frozen=True)
class PooledScoresConfig:
    """The scores of fg.predict.pooled_top_p: split tile means against every key."""

    head_dim: int
    dtype: str  # "bfloat16" or "float16"
    # scores written by TMA stores from shared memory: every row starting 16-byte aligned (a
    # row stride of a multiple of 4; the launcher pads the rows when Sk is not one)
    tma_store: bool = False

    def __post_init__(self):
        _check_head_dim_dtype(self.head_dim, self.dtype)

    def kernel(self):
        from fgattn_cute.kernels.pooled_scores_sm90 import PooledScoresSm90

        return PooledScoresSm90(_dsl_dtype(self.dtype), self.head_dim, tma_store=self.tma_store)

    def fake_args(self):
        """split means [B, H, n_q_tiles, 3 D], k, scaled logits [B, H, n_q_tiles, Sk] (rows
        contiguous, strided), their statistics [B, H, n_q_tiles, n_splits, 3], scale, stream."""
        from cutlass import Float32

        dtype = _dsl_dtype(self.dtype)
        b, h, seqlen_k, n_q_tiles, n_splits = _sym(5)
        return (
            _fake_compact(dtype, (b, h, n_q_tiles, 3 * self.head_dim), 16),
            _fake_tokens(dtype, b, seqlen_k, h, self.head_dim),
            # (TMA stores: every row 16-byte aligned, the rows padded when Sk is not a multiple
            # of 4)
            _fake_rows(Float32, (b, h, n_q_tiles, seqlen_k), 4 if self.tma_store else 1, 16),
            _fake_compact(Float32, (b, h, n_q_tiles, n_splits, 3), 4),
            Float32(1.0),
            _fake_stream(),
        )


@dataclass(frozen=True)
class KeyListsConfig:
    """The KeyIndex conversions: keep bits -> lists (``to_lists``: KeyIndex.from_mask and
    PackedKeyIndex.unpack) or lists -> keep bits (KeyIndex.to_mask and pack); ``packed``: the
    bits as a bitmap (8 keys a byte), else one byte per key."""

    to_lists: bool
    packed: bool

    def kernel(self):
        from fgattn_cute.kernels.key_lists_sm90 import KeepBitsToListsSm90, ListsToKeepBitsSm90

        cls = KeepBitsToListsSm90 if self.to_lists else ListsToKeepBitsSm90
        return cls(self.packed)

    def fake_args(self):
        """(bits, indices, counts | indices, counts, bits), seqlen_k, stream."""
        import cutlass.cute as cute
        from cutlass import Int32, Uint8

        rows, bytes_per_row = _sym(2)
        capacity = cute.sym_int32(divisibility=4)  # (always a multiple of 128): 16-byte rows
        bits = _fake_compact(Uint8, (rows, bytes_per_row), 1)
        lists = (_fake_compact(Int32, (rows, capacity), 16), _fake_compact(Int32, (rows,), 4))
        tensors = (bits, *lists) if self.to_lists else (*lists, bits)
        return (*tensors, Int32(1), _fake_stream())


def all_tile_means_configs():
    """Every tile-means configuration the package ships (CI compiles each one)."""
    return [
        TileMeansConfig(d, dt, qt)
        for d in (64, 128)
        for dt in ("bfloat16", "float16")
        for qt in (128, 64)
    ]


def all_top_p_configs():
    """Every top-p selection configuration the package ships (CI compiles each one)."""
    return [TopPConfig(fp, sm, short) for fp in (False, True)
            for sm, short in ((True, True), (True, False), (False, False))]


def all_calibrate_configs():
    """Every calibrate configuration the package ships (CI compiles each one)."""
    return [
        CalibrateConfig(d, dt, qt)
        for d in (64, 128)
        for dt in ("bfloat16", "float16")
        for qt in (128, 64)
    ]


def all_pooled_scores_configs():
    """Every pooled-scores configuration the package ships (CI compiles each one)."""
    return [PooledScoresConfig(d, dt, tma) for d in (64, 128) for dt in ("bfloat16", "float16")
            for tma in (False, True)]


def all_key_lists_configs():
    """Every KeyIndex conversion the package ships (CI compiles each one)."""
    return [KeyListsConfig(t, pk) for t in (True, False) for pk in (True, False)]


# Any of the compiled kernels' configurations.
AnyConfig = (KernelConfig | CalibrateConfig | TopPConfig | TileMeansConfig
             | PooledScoresConfig | KeyListsConfig)


def default_config(
    head_dim: int,
    dtype: str,
    q_tile: int,
    engine: str | None = None,
    num_sms: int = DEFAULT_NUM_SMS,
):
    """The tile configuration used unless the caller names one."""
    # hdim 128: Q 32 KiB + 2 stages x (K + V) 64 KiB; hdim 64 fits 3 stages in the same room.
    stages = 2 if head_dim == 128 else 3
    engine = engine or DEFAULT_ENGINE
    # Persistent CTAs (one per SM) hide part of each query tile's fixed cost behind the
    # previous tile's work: 3-8% at hdim 64 (CogVideoX, keeps 0.1-0.5); at hdim 128 level
    # for keeps >= 0.3 and 2-6% at keeps <= 0.1 with cp.async, 5-20% with the hybrid engine
    # and q_tile 64. The TMA-row engine at hdim 128 measured slower persistent (+4% on a
    # dense list, +7% at keep 0.1), so it keeps one CTA per tile (perf/NOTES.md, step 15).
    max_ctas = 0 if head_dim == 128 and engine == "tma" else num_sms
    return KernelConfig(head_dim, dtype, q_tile, engine, 128, stages, max_ctas=max_ctas)


def all_configs():
    """Every configuration the package ships (CI compiles each one)."""
    return [
        default_config(d, dt, qt, e)
        for d in (64, 128)
        for dt in ("bfloat16", "float16")
        for qt in (128, 64)
        for e in ENGINES
    ]


def target_arch() -> str:
    """sm_90a from CUTE_DSL_ARCH, else from the current CUDA device."""
    arch = os.environ.get("CUTE_DSL_ARCH")
    if arch:
        return arch
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"sm_{major}{minor}a"
    raise RuntimeError(
        "no CUDA device to compile for: set CUTE_DSL_ARCH=sm_90a to compile without a GPU"
    )


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """Hash of the kernel sources and the toolchain that turns them into machine code."""
    h = hashlib.sha256()
    kernels = Path(__file__).resolve().parent.parent / "kernels"
    for path in sorted(kernels.glob("*.py")) + [Path(__file__).resolve()]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for dist in ("nvidia-cutlass-dsl", "apache-tvm-ffi"):
        h.update(f"{dist}={_version(dist)}".encode())
    h.update(f"py{sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path | None:
    """On-disk cache location (FGATTN_CACHE_DIR; FGATTN_CACHE_DIR=off disables it)."""
    root = os.environ.get("FGATTN_CACHE_DIR")
    if root == "off":
        return None
    base = Path(root) if root else Path(tempfile.gettempdir()) / "fgattn_cute_cache"
    return base / source_fingerprint()


def _build(config: AnyConfig, arch: str):
    """Trace and compile one configuration (seconds)."""
    os.environ.setdefault("CUTE_DSL_ARCH", arch)
    import cutlass.cute as cute

    return cute.compile(config.kernel(), *config.fake_args(), options="--enable-tvm-ffi")


def _key_name(config: AnyConfig, arch: str) -> str:
    fields = "-".join("+".join(v) if isinstance(v, tuple) else f"{v}"
                      for v in asdict(config).values())
    return f"{arch}-{type(config).__name__}-{fields}"


_memory_cache: dict = {}
_lock = threading.Lock()


def compile_fwd(config: AnyConfig, arch: str | None = None):
    """The compiled kernel for `config`: from memory, else from disk, else compiled now."""
    arch = arch or target_arch()
    key = (arch, config)
    fn = _memory_cache.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _memory_cache.get(key)
        if fn is None:
            fn = _load_from_disk(config, arch)
        if fn is None:
            compiled = _build(config, arch)
            _save_to_disk(compiled, config, arch)
            fn = compiled
        _memory_cache[key] = fn
    return fn


def _load_from_disk(config: AnyConfig, arch: str):
    root = cache_dir()
    if root is None:
        return None
    path = root / f"{_key_name(config, arch)}.o"
    if not path.is_file():
        return None
    try:
        import cutlass.cute as cute

        module = cute.runtime.load_module(str(path), enable_tvm_ffi=True)
        return getattr(module, _EXPORT_NAME)
    except Exception:  # a truncated or foreign entry is a miss: recompile and replace it
        return None


def _save_to_disk(compiled, config: AnyConfig, arch: str) -> None:
    root = cache_dir()
    if root is None:
        return
    final = root / f"{_key_name(config, arch)}.o"
    tmp = root / f".{final.name}.{os.getpid()}.tmp.o"
    try:
        root.mkdir(parents=True, exist_ok=True)
        compiled.export_to_c(object_file_path=str(tmp), function_name=_EXPORT_NAME)
        os.replace(tmp, final)
    except Exception:
        # The disk cache is an optimisation; the in-memory compile is still good.
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ machine-code inspection
def _nvdisasm() -> str:
    try:
        import nvidia.cu13  # noqa: F401  (the nvidia-cuda-nvdisasm wheel)
    except ImportError:
        pass
    import nvidia

    for root in nvidia.__path__:
        for sub in ("cu13/bin/nvdisasm", "cuda_nvdisasm/bin/nvdisasm"):
            path = Path(root) / sub
            if path.is_file():
                return str(path)
    raise FileNotFoundError("nvdisasm not found: pip install 'nvidia-cuda-nvdisasm>=13.4,<14'")


def sass_of(config: AnyConfig, arch: str = "sm_90a") -> str:
    """Disassembly of a fresh compile of `config` (not the cache: the cubin is needed)."""
    os.environ.setdefault("CUTE_DSL_ARCH", arch)
    compiled = _build(config, arch)
    cubin = compiled.artifacts.CUBIN
    if isinstance(cubin, str):
        cubin = Path(cubin).read_bytes()
    if not cubin:
        raise RuntimeError("the compile kept no cubin: set CUTE_DSL_KEEP=cubin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True
        ).stdout


def sass_histogram(sass: str) -> Counter:
    """Counts of the instructions that tell whether the kernel is built as intended."""
    pattern = (
        r"\b(HGMMA\.[\w.]+|UTMALDG[\w.]*|UTMASTG[\w.]*|LDGSTS[\w.]*|LDL[\w.]*|STL[\w.]*"
        r"|ARRIVES[\w.]*|USETMAXREG[\w.]*|ATOMS[\w.]*|ATOMG[\w.]*|LDG\.[\w.]*|STG\.[\w.]*"
        r"|VOTE\.[\w.]*"
        r"|POPC)"
    )
    return Counter(re.findall(pattern, sass))
