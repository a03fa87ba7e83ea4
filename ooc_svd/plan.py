"""Planning: block size from the memory limit, method from a cost model, predicted cost.

Pure functions of shapes and sizes: nothing here reads data. A plan says what a run will do
(method, passes over A, bytes read, block size, peak memory) and why, before any long work,
and refuses with the numbers a run that cannot fit its memory limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import InputError, PlanError
from .kernels.cpu import stacked_rows, sub_block_bytes
from .sources.dense import LOADED_HINT
from .units import format_bytes

# Throughputs of the cost model, measured on a two-core node (benchmarks/RESULTS.md). They
# rank the methods; they do not promise times. Decoded bytes/s of a zstd-compressed store;
# flop/s of the skinny float64 GEMMs of the fused products (n x l, l ~ 30), of dsyrk, and
# of Householder QR on tall blocks.
READ_BYTES_PER_S = 400e6
GEMM_FLOPS_PER_S = 12e9
# Multiply-adds per second of the CSR kernels per column of X (a gather or scatter per
# non-zero, memory-bound), and of densifying CSR rows for the exact method (and gram, where
# rows are dense enough: ``sparse_gram_pays``).
CSR_FLOPS_PER_S = 1.5e9
SYRK_FLOPS_PER_S = 30e9
# The sparse Gram kernel: products of pairs of a row's non-zeros a second (measured on two
# cores: 0.75e8 for n = 4096, whose G misses the cache, to 3.7e8 for n = 1000), and rows a
# second (each thread looks for its columns in every row).
SPARSE_GRAM_PAIRS_PER_S = 1e8
SPARSE_GRAM_ROWS_PER_S = 3e7
# LAPACK dgeqrt (compact WY) on the exact method's 4n x n stacks; the final pass's narrow
# blocks (b x l, l ~ 30) factor about 3x slower, which the model leaves out.
QR_FLOPS_PER_S = 15e9
# The exact and gram methods' n x n factorizations between their passes, SVD of R (gesdd)
# and eigenvectors of G (eigh), in n^3 per second: measured on two cores, 0.32 and 2.2 s
# for the SVD at n = 1000 and 2000, 0.19 and 0.74-0.95 s for eigh
# (benchmarks/bench_kernels.py). They are what makes those methods dear for wide n and few
# rows.
SVD_CUBES_PER_S = 3.5e9
EIGH_CUBES_PER_S = 8e9

# Columns added per step by the fixed-accuracy randomized method.
GROWTH_BLOCK = 32

METHODS = ("exact", "gram", "randomized", "krylov")  # in order of preference when costs tie
# "auto" prefers block Krylov to subspace iteration when it costs at most this much more:
# the same reads, a wider final basis, and far better accuracy on flat spectra.
KRYLOV_PREMIUM = 1.25
# ... and the exact and gram methods, whose singular values and vectors are exact to
# rounding, when they cost at most this much more than the cheapest approximate method.
EXACT_PREMIUM = 2.0
# ... or at most this many seconds more (by the model): on a small matrix an exact result
# is worth a second, where twice a cheap run is still little time.
EXACT_ALLOWANCE_S = 1.0
# The exact and gram methods keep n x n factors: beyond this width the randomized method
# is always cheaper.
MAX_EXACT_COLUMNS = 4096
# Blocks read ahead of the one being computed, by as many reader threads: two keep both
# cores decoding. Plans fall back to one when two blocks in flight do not fit the limit.
PREFETCH_DEPTH = 2
# Past this size a larger block does not read faster, it only delays the overlap.
MAX_BLOCK_BYTES = 64 << 20
# With a block cache, dense blocks down to 1/2**SMALLER_BLOCK_TRIES of the largest that fit
# are tried, each half taken only if it cuts the bytes read to CACHE_GAIN or less: smaller
# blocks lower the peak and so cache more, but each block has a fixed cost (the final pass
# merges an n x l factor per block). Sparse blocks keep their size: their final pass costs
# more per block (17 ms at n = 2,000, 95 ms at n = 10^5, measured in benchmarks/RESULTS.md),
# which outweighed the reads saved.
SMALLER_BLOCK_TRIES = 3
CACHE_GAIN = 0.8
DEFAULT_MEMORY_LIMIT = "1GB"  # as the CLI says; parse_bytes reads it as 10**9
EPS64 = float(np.finfo(np.float64).eps)
# A squared residual is known to this many units of rounding of what it is computed from
# (||A||_F^2 less sum S^2, or a tail of G's eigenvalues, each to eps sigma_1^2): a residual
# below that cannot be told from zero.
RESIDUAL_ROUNDING = 16
# ||A||_F^2 less the energy captured (the randomized and Krylov methods' residual) is known
# to this many eps of the sum of squares it comes from: the kernels add the squares one
# value at a time per thread or sub-block, whose sums drift on repeated values (measured:
# 4.7e3 eps on dense rows of one value, 1.9e5 on sparse rows of repeated values). A
# relative residual below about 1.5e-5 is not told.
DIFFERENCE_ROUNDING = 1 << 18


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before reading any data."""

    shape: tuple[int, int]
    itemsize: int
    k: int
    basis_size: int  # l = k + oversample, capped by min(m, n)
    niter: int
    method: str  # one of METHODS
    reason: str
    blocks: tuple[tuple[int, int], ...]
    prefetch_depth: int  # blocks read ahead of the one being computed
    memory_limit: int
    predicted_peak_bytes: int
    spill_bytes: int
    growth_blocks: int = 0  # fixed-accuracy randomized: at most this many blocks of basis
    krylov_width: int = 0  # block Krylov: columns of the final basis, (q + 1) l at most
    cached_blocks: int = 0  # leading blocks kept in memory after the first pass
    spill_in_memory: bool = False  # the final pass's Q factors fit under the limit
    block_bytes: tuple[int, ...] = ()  # raw bytes of each block (values, indices, indptr)
    nnz: int | None = None  # non-zeros of a sparse A; None: a dense A
    scatter_copies: int = 0  # private n x l accumulators of the sparse power kernel
    spectral_iters: int = 0  # reads of A after the SVD for the spectral error estimate
    read_factor: float = 1.0  # bytes read per byte of block (A - M reads A's and M's)
    # Where the kernels run ('cpu', 'cuda', or what a cluster's workers are asked for), and
    # why: decided by the caller, which knows the machine (api._plan_run).
    backend: str = ""
    backend_reason: str = ""
    tol: float | None = None  # fixed-accuracy mode's tolerance; k is then the rank cap
    # The method 'auto' preferred and the memory it would have needed, where that exceeded
    # memory_limit and another method was taken.
    preferred: tuple[str, int] | None = None
    # 'auto' took gram, which switches to exact, one pass more, where G does not resolve
    # sigma_k (engine.gram_svd)
    exact_fallback: bool = False
    loaded_bytes: int = 0  # an input file loaded whole, counted in the predicted peak

    @property
    def sparse(self) -> bool:
        return self.nnz is not None

    @property
    def cached_bytes(self) -> int:
        return sum(self.block_bytes[: self.cached_blocks])

    @property
    def cached_beside_bytes(self) -> int:
        """The cached blocks held beside the working set at most: all of them, but where
        every block is cached, the last, which is then the block the working set computes
        (the first pass's last; the later passes hold no read in flight)."""
        if self.cached_blocks and self.cached_blocks == len(self.blocks):
            return self.cached_bytes - self.block_bytes[-1]
        return self.cached_bytes

    @property
    def bytes_to_read(self) -> int:
        """Bytes read over the run (of A, or of A and M for A - M): every pass, less what
        the cache serves. A centered dense run on a cluster reads its first block once more,
        for the first pass's shift (``result.bytes_read`` counts it)."""
        blocks = self.passes * self.bytes_per_pass - (self.passes - 1) * self.cached_bytes
        return round(self.read_factor * blocks)

    @property
    def passes(self) -> int:
        """Reads of A: q + 1 for the randomized and block Krylov methods, 2 for exact and
        gram; for the fixed-accuracy randomized method, at most q + 1 per block of basis,
        plus one. Then one per iteration of the spectral error estimate."""
        return self._svd_passes + self.spectral_iters

    @property
    def most_passes(self) -> int:
        """``passes``, with gram's switch to the exact method where 'auto' allows it."""
        return self.passes + self.exact_fallback

    @property
    def _svd_passes(self) -> int:
        if self.method not in ("randomized", "krylov"):
            return 2
        if self.growth_blocks:
            return (self.niter + 1) * self.growth_blocks + 1
        return self.niter + 1

    @property
    def block_rows(self) -> int:
        return max(stop - start for start, stop in self.blocks)

    @property
    def bytes_per_pass(self) -> int:
        return sum(self.block_bytes)

    def _cache_note(self) -> str:
        if not self.cached_blocks:
            return ""
        fraction = self.cached_bytes / self.bytes_per_pass
        return (f" (the first read keeps {self.cached_blocks} of {len(self.blocks)} blocks, "
                f"{fraction:.0%} of A, for the later passes)")

    def _loaded_note(self) -> str:
        if not self.loaded_bytes:
            return ""
        return f" (the input, loaded whole, {format_bytes(self.loaded_bytes)} of it)"

    def _cached_peak_note(self) -> str:
        """The peak counts the working set; the cached blocks, held beside it once read, fill
        the rest of the limit (none where the one cached block is the working set's)."""
        if not self.cached_beside_bytes:
            return ""
        return f", {format_bytes(self.predicted_peak_bytes + self.cached_beside_bytes)} with " \
               "the cached blocks,"

    def _spectral_note(self) -> str:
        if not self.spectral_iters:
            return ""
        return f" ({self.spectral_iters} of them for the spectral error estimate)"

    def describe(self) -> str:
        m, n = self.shape
        basis = ""
        if self.method == "randomized":
            basis = f", basis l={self.basis_size}, niter={self.niter}"
        elif self.method == "krylov":
            basis = f", blocks of l={self.basis_size}, niter={self.niter}, Krylov basis of " \
                    f"{self.krylov_width}"
        bound = "up to " if self.growth_blocks else ""
        kind = "sparse " if self.sparse else ""
        rank = f"k={self.k}" if self.tol is None else f"tol={self.tol:g}, rank <= {self.k}"
        return (
            f"{self.method} SVD of a {m} x {n} {kind}matrix, {rank}{basis}: "
            f"{bound}{self.passes} passes{self._spectral_note()} reading "
            f"{format_bytes(self.bytes_to_read)}{self._cache_note()}; "
            f"{len(self.blocks)} block(s) of up to {self.block_rows} rows, read "
            f"{self.prefetch_depth} ahead; predicted peak {format_bytes(self.predicted_peak_bytes)}"
            f"{self._loaded_note()}{self._cached_peak_note()} of "
            f"{format_bytes(self.memory_limit)}. Why: "
            f"{self.reason}.{self._backend_note()}"
        )

    def _backend_note(self) -> str:
        if not self.backend:
            return ""
        reason = f" ({self.backend_reason})" if self.backend_reason else ""
        return f" Kernels: {self.backend}{reason}."


def make_plan(
    shape: tuple[int, int],
    itemsize: int,
    chunk_boundaries: np.ndarray,
    k: int,
    oversample: int,
    niter: int,
    method: str,
    memory_limit: int,
    tol: float | None = None,
    cacheable: bool = False,
    chunk_bytes: np.ndarray | None = None,
    nnz: int | None = None,
    row_pairs: float = 0.0,
    scatter_copies: int = 1,
    read_overhead_bytes: int = 0,
    read_row_overhead: int = 0,
    staging_blocks: int = 0,
    staging_matrices: int = 0,
    spectral_iters: int = 0,
    read_factor: float = 1.0,
    storage_chunks: bool = True,
    loaded_bytes: int = 0,
    transposed_by: str | None = None,
) -> Plan:
    """Choose the method and the row blocks for a run; raise PlanError if it cannot fit.

    With ``tol`` (fixed accuracy), k is the rank cap: the randomized method grows its basis by
    GROWTH_BLOCK columns up to k, and the plan's passes are an upper bound. With
    ``cacheable`` (reading costs I/O or decoding), the memory the working set leaves under
    the limit keeps leading blocks after their first read, for the later passes.

    A sparse matrix gives ``nnz``, the pairs of non-zeros that share a row (``row_pairs``:
    its Gram matrix's cost) and the raw bytes of each unit between ``chunk_boundaries``
    (``chunk_bytes``); its power kernel holds up to ``scatter_copies`` (one per thread)
    private n x l accumulators, fewer when they would take over a quarter of the limit.
    Each read in flight may also decode ``read_overhead_bytes`` beyond its block (the
    partial storage chunks at a sparse block's ends), and ``read_row_overhead`` bytes per
    row of its block (the blocks of A and M while A - M is formed). A GPU backend holds
    ``staging_blocks`` more host copies of a block (pinned staging buffers) and
    ``staging_matrices`` more float64 matrices of a block's rows by the basis width (the
    pinned copies of Y_i and Q_i in the final pass). ``spectral_iters`` reads of A follow
    the SVD's for the spectral error estimate, within the same working set. Each byte of a
    block costs ``read_factor`` bytes read (more than one for A - M: A's and M's bytes).
    ``storage_chunks``: the units between ``chunk_boundaries`` are a store's chunks, which a
    refusal may advise to rewrite (not those of an array in memory or an .npy file).
    ``loaded_bytes``: an input file that the run loads whole (a compressed .npz), held
    beside the working set. ``transposed_by``: how A^T can be had, which a refusal for a
    wide A advises: 'convert' (a file or store: ooc-svd convert --transpose), 'memory' (A
    is in memory: pass A.T), or None.
    """
    m, n = shape
    l = min(k + oversample, m, n)
    krylov_width = min((niter + 1) * l, m, n)
    if chunk_bytes is None:
        chunk_bytes = np.diff(chunk_boundaries) * n * itemsize
    work = _Work(m, n, int(np.sum(chunk_bytes)), nnz)
    gram = gram_seconds(m, n, None if nnz is None else row_pairs)
    costs = {
        "exact": work.two_pass_seconds(
            k, 2.5 * m * n * n / QR_FLOPS_PER_S + n**3 / SVD_CUBES_PER_S, densify=True),
        "gram": work.two_pass_seconds(k, gram + n**3 / EIGH_CUBES_PER_S, densify=False),
        "randomized": work.randomized_seconds(l, l, niter),
        "krylov": work.randomized_seconds(l, krylov_width, niter),
    }
    layouts = _Layouts(
        (m, n), itemsize, np.asarray(chunk_boundaries), np.asarray(chunk_bytes), k, l, niter,
        krylov_width, method, memory_limit, tol is not None, cacheable, nnz, scatter_copies,
        read_overhead_bytes, read_row_overhead, staging_blocks, staging_matrices,
        spectral_iters, read_factor, storage_chunks, loaded_bytes, transposed_by,
    )
    choices = _method_choices(method, n, costs, tol)
    refusals: list[PlanError] = []
    for method, reason in choices:
        try:
            plan = layouts.fit(method, reason)
        except PlanError as error:
            refusals.append(error)
            continue
        if refusals:  # 'auto' fell back to a method that fits
            preferred, needed = choices[0][0], refusals[0].needed_bytes
            plan = replace(plan, preferred=(preferred, needed),
                           reason=f"{plan.reason}; {preferred} would need "
                                  f"{format_bytes(needed, round_up=True)}, more than "
                                  "memory_limit")
        return replace(plan, tol=tol)
    raise _least_refusal(refusals, [name for name, _ in choices])


def _least_refusal(refusals: list[PlanError], methods: list[str]) -> PlanError:
    """Of the refusals of 'auto''s methods (in order of preference), the one that needs the
    least memory, which says how far to raise the limit; it names what the preferred
    method would need when that is more."""
    needs = [error.needed_bytes for error in refusals]
    least = int(np.argmin(needs))
    if least == 0:
        return refusals[0]
    return PlanError(f"{refusals[least]} ({methods[0]}, the method 'auto' prefers, would "
                     f"need {format_bytes(needs[0], round_up=True)})", needs[least])


@dataclass(frozen=True)
class _Layouts:
    """make_plan's arguments (``requested``: its ``method``; ``l``: the basis width), from
    which each method's plan is laid out."""

    shape: tuple[int, int]
    itemsize: int
    chunk_boundaries: np.ndarray
    chunk_bytes: np.ndarray
    k: int
    l: int  # the basis width
    niter: int
    krylov_width: int
    requested: str
    memory_limit: int
    fixed_accuracy: bool
    cacheable: bool
    nnz: int | None
    scatter_copies: int
    read_overhead_bytes: int
    read_row_overhead: int
    staging_blocks: int
    staging_matrices: int
    spectral_iters: int
    read_factor: float
    storage_chunks: bool
    loaded_bytes: int
    transposed_by: str | None

    def fit(self, method: str, reason: str) -> Plan:
        """The plan of ``method``, or PlanError if it cannot fit ``memory_limit``. Where the
        later passes may be served from the block cache, smaller dense blocks are tried too:
        they lower the peak, which leaves the cache more room."""
        plan = self.layout(method, reason, MAX_BLOCK_BYTES)
        if not self.cacheable or self.nnz is not None or plan.passes < 2:
            return plan
        cap = max(plan.block_bytes)
        for _ in range(SMALLER_BLOCK_TRIES):
            if plan.cached_blocks == len(plan.blocks):
                break
            cap //= 2
            smaller = self.layout(method, reason, cap)
            if smaller.bytes_to_read <= CACHE_GAIN * plan.bytes_to_read:
                plan = smaller
        return plan

    def layout(self, method: str, reason: str, max_block_bytes: int) -> Plan:
        """The plan of ``method`` with blocks of at most ``max_block_bytes`` raw bytes; a
        refusal's need is the least limit that fits: that of the smallest block beside one
        private accumulator, which any larger limit also takes, since the accumulators it
        would allow are halved down to one where they do not fit."""
        (m, n), l, nnz, limit = self.shape, self.l, self.nnz, self.memory_limit
        # Memory follows the widest basis the method holds: (q + 1) l for block Krylov, and
        # for exact and gram the k columns of V_k that their final pass takes.
        width = {"krylov": self.krylov_width, "exact": min(self.k, m, n),
                 "gram": min(self.k, m, n)}.get(method, l)
        fixed = _fixed_bytes(n, width, method)
        exact_fallback = self.requested == "auto" and method == "gram"
        if exact_fallback:
            fixed = max(fixed, _fixed_bytes(n, width, "exact"))  # room for the fallback
            reason += ("; should G not resolve sigma_k, the exact method takes over after "
                       "its pass (one pass more)")
        fixed += self.loaded_bytes  # an input file loaded whole, beside the working set
        # The sparse power kernel's private accumulators may take a quarter of the limit at
        # most, and are halved where the blocks do not fit beside them, down to one.
        copies = 0
        if nnz is not None and method in ("randomized", "krylov"):
            copies = min(self.scatter_copies, max(1, limit // 4 // (8 * n * (l + 1))))
        while True:
            blocks, peak, depth = self._blocks_under(fixed + 8 * copies * n * (l + 1), width,
                                                     max_block_bytes)
            if peak <= limit or copies <= 1:
                break
            copies //= 2
        if peak > limit:
            raise self._refusal(method, width, blocks, peak)
        spill = _spill_bytes(m, width, len(blocks))
        growth = -(-l // GROWTH_BLOCK) if self.fixed_accuracy and method == "randomized" else 0
        plan = Plan(
            (m, n), self.itemsize, self.k, l, self.niter, method, reason, blocks, depth, limit,
            peak, spill, growth, self.krylov_width if method == "krylov" else 0,
            block_bytes=bytes_of_blocks(blocks, self.chunk_boundaries, self.chunk_bytes),
            nnz=nnz, scatter_copies=copies, spectral_iters=self.spectral_iters,
            read_factor=self.read_factor,
            exact_fallback=exact_fallback,
            loaded_bytes=self.loaded_bytes,
        )
        if not self.cacheable or plan.passes < 2:
            return _with_spill_in_memory(plan)
        cached = _blocks_that_fit(plan.block_bytes, limit - peak)
        if sum(plan.block_bytes[:-1]) <= limit - peak:
            # All of them: the last is then held as the working set's computed block (a
            # matrix of one block is cached at no cost), and later passes read nothing.
            cached = len(blocks)
        return _with_spill_in_memory(replace(plan, cached_blocks=cached))

    def _blocks_under(self, fixed: int, width: int, max_block_bytes: int):
        """(blocks, peak, read-ahead depth) of the layout beside ``fixed`` bytes of working
        set: reading ahead as far as the limit allows, else one block."""
        for depth in (PREFETCH_DEPTH, 1):
            blocks, peak = _block_layout(
                self.chunk_boundaries, self.chunk_bytes,
                None if self.nnz is not None else self.shape[1] * self.itemsize, width,
                fixed + depth * self.read_overhead_bytes, self.memory_limit, depth,
                self.staging_blocks, self.staging_matrices, depth * self.read_row_overhead,
                max_block_bytes,
            )
            if peak <= self.memory_limit:
                break
        return blocks, peak, depth

    def _transpose_hint(self) -> list[str]:
        """How to factor A^T instead, where A^T can be had (``transposed_by``), whose n x l
        arrays would have m rows."""
        m, n = self.shape
        hint = f"factor A^T ({n} x {m}) instead, whose U and V are V and U here"
        if self.transposed_by == "convert":
            return [f"{hint} (ooc-svd convert --transpose writes it)"]
        return [hint] if self.transposed_by == "memory" else []

    def _refusal(self, method: str, width: int, blocks, peak: int) -> PlanError:
        """Why no layout of ``method`` fits the limit, with the numbers and the way out."""
        (m, n), limit = self.shape, format_bytes(self.memory_limit)
        overhead = self.read_overhead_bytes
        if len(blocks) == 0:
            decoded, ways_out = "", ["raise memory_limit"]
            if overhead:
                decoded = f", and {format_bytes(overhead)} of partly decoded storage chunks " \
                          "per read"
            if self.loaded_bytes:
                decoded += f", and the input, loaded whole ({format_bytes(self.loaded_bytes)})"
                ways_out.append(LOADED_HINT["sparse" if self.nnz is not None else "dense"])
            if overhead and peak - overhead <= self.memory_limit:  # smaller chunks would fit
                ways_out.append("write the store with fewer non-zeros per chunk (ooc-svd "
                                "convert --chunk-nnz)")
            if m < n:
                ways_out += self._transpose_hint()
            hint = "; " + "; or ".join(ways_out)
            arrays = f"n x l float64 arrays with l={width}"
            if method in ("exact", "gram") and \
                    _fixed_bytes(n, width, method) > _fixed_bytes(n, width, "randomized"):
                arrays = f"the n x n factors of the {method} method"
            elif self.fixed_accuracy:
                hint += "; with tol, a smaller max_rank narrows l"
            return PlanError(
                f"memory_limit {limit} is too small for the {method} method on a {m} x {n} "
                f"matrix: its working set ({arrays}{decoded}) and the smallest block it can "
                f"read need "
                f"{format_bytes(peak, round_up=True)}{hint}", peak
            )
        largest = int(np.argmax(self.chunk_bytes))
        rows = int(self.chunk_boundaries[largest + 1] - self.chunk_boundaries[largest])
        raw = format_bytes(self.chunk_bytes[largest])
        if not self.storage_chunks:  # no store to rewrite: the least it reads at a time
            kind = "sparse rows" if self.nnz is not None else "rows"
            return PlanError(
                f"memory_limit {limit} cannot hold a block of {rows} {kind} ({raw} raw, the "
                f"least it reads at a time) with the read-ahead and working set (needs "
                f"{format_bytes(peak, round_up=True)}); raise memory_limit", peak
            )
        if self.nnz is not None:
            return PlanError(
                f"memory_limit {limit} cannot hold a block of {rows} sparse rows ({raw} raw) "
                f"with the read-ahead, the partly decoded storage chunks "
                f"({format_bytes(overhead)} per read) and the working set (needs "
                f"{format_bytes(peak, round_up=True)}); raise memory_limit or write the store "
                "with fewer non-zeros per chunk (ooc-svd convert --chunk-nnz)", peak
            )
        return PlanError(
            f"memory_limit {limit} cannot hold one storage chunk of {rows} rows ({raw} raw) "
            f"with the read-ahead and working set (needs {format_bytes(peak, round_up=True)}); "
            "raise memory_limit or rechunk the store by rows", peak
        )


def _with_spill_in_memory(plan: Plan) -> Plan:
    """Keep the TSQR spill in memory when it fits beside the working set and the cache."""
    room = plan.memory_limit - plan.predicted_peak_bytes - plan.cached_beside_bytes
    return replace(plan, spill_in_memory=0 < plan.spill_bytes <= room)


def _blocks_that_fit(block_bytes: tuple[int, ...], budget: int) -> int:
    """How many leading blocks fit in ``budget`` bytes."""
    return int(np.searchsorted(np.cumsum(block_bytes), budget, side="right"))


def _block_layout(boundaries, chunk_bytes, row_bytes, l, fixed, memory_limit, depth,
                  staging_blocks=0, staging_matrices=0, row_overhead=0,
                  max_block_bytes=MAX_BLOCK_BYTES):
    """Blocks of whole chunks for a read-ahead of ``depth`` blocks, and the predicted peak.
    A block holds at most ``max_block_bytes`` raw bytes, or one chunk.

    Raw blocks' worth held at once: the computed one, and for each read in flight its
    output, the compressed chunk bytes and the decoded chunks (up to a block each, measured
    with tracemalloc on zarr 3). Per row also: Y_i, Q_i and the U rows, float64, and
    ``staging_matrices`` more of that width, and ``row_overhead`` bytes held by the reads.
    ``row_bytes`` is given for dense matrices (every row costs the same); sparse units are
    grouped by their bytes.
    """
    per_byte = 3 * depth + 1 + staging_blocks
    per_row = (3 + staging_matrices) * 8 * (l + 1) + row_overhead
    if row_bytes is not None:
        per_row += per_byte * row_bytes
        if fixed + per_row > memory_limit:  # the smallest block is the largest chunk
            return (), fixed + int(np.diff(boundaries).max()) * per_row
        max_rows = min((memory_limit - fixed) // per_row, max(max_block_bytes // row_bytes, 1))
        blocks = group_chunks(boundaries, max_rows)
        largest = max(stop - start for start, stop in blocks)
        return blocks, fixed + largest * per_row
    costs = per_byte * np.asarray(chunk_bytes) + per_row * np.diff(boundaries)
    if fixed + per_row + per_byte * 8 > memory_limit:
        return (), fixed + int(costs.max())
    blocks, largest = group_units(boundaries, costs, chunk_bytes, memory_limit - fixed,
                                  max_block_bytes)
    return blocks, fixed + largest


def group_units(boundaries, costs, raw_bytes, budget, max_raw=MAX_BLOCK_BYTES
                ) -> tuple[tuple[tuple[int, int], ...], int]:
    """Group consecutive units (at least one per block) while their cost fits ``budget`` and
    their raw bytes ``max_raw``; return the blocks and the largest block's cost."""
    blocks, largest = [], 0
    first, cost, raw = 0, 0, 0
    for i, (unit_cost, unit_raw) in enumerate(zip(costs, raw_bytes, strict=True)):
        if i > first and (cost + unit_cost > budget or raw + unit_raw > max_raw):
            blocks.append((int(boundaries[first]), int(boundaries[i])))
            largest = max(largest, cost)
            first, cost, raw = i, 0, 0
        cost, raw = cost + int(unit_cost), raw + int(unit_raw)
    blocks.append((int(boundaries[first]), int(boundaries[-1])))
    return tuple(blocks), max(largest, cost)


def bytes_of_blocks(blocks, boundaries, chunk_bytes) -> tuple[int, ...]:
    """Raw bytes of each block, from the bytes of the units it is made of."""
    if not blocks:
        return ()
    total = np.concatenate([[0], np.cumsum(chunk_bytes)])
    starts = np.searchsorted(boundaries, [start for start, _ in blocks])
    stops = np.searchsorted(boundaries, [stop for _, stop in blocks])
    if np.all(boundaries[starts] == [b[0] for b in blocks]) and np.all(
        boundaries[stops] == [b[1] for b in blocks]
    ):
        return tuple(int(b) for b in total[stops] - total[starts])
    raise AssertionError("blocks must start and end on chunk boundaries")


def group_chunks(boundaries: np.ndarray, max_rows: int) -> tuple[tuple[int, int], ...]:
    """Group consecutive storage chunks into blocks of at most max_rows rows (>= one chunk)."""
    sizes = np.diff(boundaries)
    m = int(boundaries[-1])
    if sizes.size > 1 and np.all(sizes[:-1] == sizes[0]):
        # Regular chunks (zarr, numpy): whole chunks per block, computed without a loop.
        rows = max(int(sizes[0]), int(max_rows) // int(sizes[0]) * int(sizes[0]))
        starts = range(0, m, rows)
        return tuple((start, min(start + rows, m)) for start in starts)
    blocks = []
    start = end = int(boundaries[0])
    for stop in boundaries[1:]:
        if stop - start > max_rows and end > start:
            blocks.append((start, end))
            start = end
        end = int(stop)
    blocks.append((start, end))
    return tuple(blocks)


def _spill_bytes(m: int, width: int, blocks: int) -> int:
    """The final pass's spill: the Q_i, m x (width + 1) in all (a column of ones when the
    mean is found in that pass), and the two merge factors of each block after the first."""
    return 8 * (m * (width + 1) + 2 * max(blocks - 1, 0) * (width + 1) ** 2)


def _fixed_bytes(n: int, l: int, method: str) -> int:
    """Bytes of the working set that does not depend on the block size."""
    # X, Z (or B^T), the block's C^T, the merge and orthogonalization temporaries; and the
    # merge's l x l factors: the stacked pair [R; R_i], its copy, Q_stack, R and R_i, and
    # the backward sweep's products.
    final_pass = 8 * (6 * n * (l + 1) + 8 * (l + 1) ** 2) + sub_block_bytes(n)
    if method == "exact":
        # R, its SVD factors (or the previous R), the rows stacked under R for the next
        # QR (factored in place) and the R it returns.
        factoring = 8 * (4 * (n + 1) ** 2 + (stacked_rows(n) + n + 1) * (n + 1))
    elif method == "gram":
        # G, its symmetrized copy, the eigenvectors and eigh's workspace.
        factoring = 8 * 4 * n * n
    else:
        return final_pass
    # The n x n factor and its SVD (or eigenvectors) are let go before the final pass.
    return max(factoring + sub_block_bytes(n), final_pass)


def gram_seconds(rows: int, n: int, row_pairs: float | None) -> float:
    """Seconds to add the Gram matrix of ``rows`` rows: dense rows by dsyrk, sparse ones
    (``row_pairs``: the pairs of non-zeros that share a row) by the cheaper of the sparse
    kernel and densifying them for dsyrk (``sparse_gram_pays``)."""
    if row_pairs is None:
        return rows * n * n / SYRK_FLOPS_PER_S
    return min(_sparse_gram_seconds(rows, row_pairs), _densified_gram_seconds(rows, n))


def sparse_gram_pays(rows: int, n: int, row_pairs: float) -> bool:
    """Whether the sparse Gram kernel beats densifying these CSR rows for dsyrk: a row of
    r non-zeros costs it r (r + 1) / 2 products, where densified it costs n^2 / 2 in
    dsyrk, which runs about 300x faster a product."""
    return _sparse_gram_seconds(rows, row_pairs) < _densified_gram_seconds(rows, n)


def _sparse_gram_seconds(rows: int, row_pairs: float) -> float:
    return row_pairs / SPARSE_GRAM_PAIRS_PER_S + rows / SPARSE_GRAM_ROWS_PER_S


def _densified_gram_seconds(rows: int, n: int) -> float:
    return rows * n / CSR_FLOPS_PER_S + gram_seconds(rows, n, None)


@dataclass(frozen=True)
class _Work:
    """What a pass over A costs to read and to multiply by one column."""

    m: int
    n: int
    pass_bytes: int
    nnz: int | None  # None for dense

    def qr_seconds(self, width: int) -> float:
        """The final pass's local QRs of Y (m x width) and the backward sweep."""
        return 4 * self.m * width**2 / QR_FLOPS_PER_S

    def product_seconds(self, columns: float) -> float:
        """Seconds for products of A (or A^T) with ``columns`` columns."""
        if self.nnz is None:
            return 2 * self.m * self.n * columns / GEMM_FLOPS_PER_S
        return self.nnz * columns / CSR_FLOPS_PER_S

    def randomized_seconds(self, l: int, final: int, niter: int) -> float:
        """q fused power passes with l columns, then the final pass with ``final`` columns."""
        read = (niter + 1) * self.pass_bytes / READ_BYTES_PER_S
        return read + self.product_seconds(niter * 2 * l) + self.final_pass_seconds(final)

    def two_pass_seconds(self, k: int, factor_seconds: float, densify: bool) -> float:
        """A pass that factors A (TSQR, whose sparse rows are densified in cache-sized
        pieces where ``densify``, or Gram), then the final pass with the k columns of
        V_k."""
        densified = self.m * self.n / CSR_FLOPS_PER_S if densify and self.nnz is not None else 0
        read = 2 * self.pass_bytes / READ_BYTES_PER_S
        return read + densified + factor_seconds + self.final_pass_seconds(k)

    def final_pass_seconds(self, width: int) -> float:
        """Compute of the final pass (reading aside): A X and B = Q^T A, the streaming TSQR
        and the backward sweep, and writing and reading the spilled Q."""
        qr_and_sweep = self.qr_seconds(width)
        spill = 2 * self.m * width * 8 / READ_BYTES_PER_S
        return self.product_seconds(2 * width) + qr_and_sweep + spill


def qr_outweighs_products(m: int, nnz: int, width: int) -> bool:
    """Whether the local QRs of a sparse matrix's final pass (m rows, ``nnz`` non-zeros, a
    basis of ``width``) cost more than its products with A, at the cost model's rates: a
    wide basis (block Krylov, a large k) over rows of few non-zeros."""
    work = _Work(m, 0, 0, nnz)
    return work.qr_seconds(width) > work.product_seconds(2 * width)


def smallest_tol(method: str, n: int) -> float:
    """About the smallest relative residual that fixed-accuracy mode tells from zero with
    ``method`` (of the exact, gram and randomized methods): the randomized method measures
    it as ||A||_F^2 - sum S^2 (about 1.5e-5, more where sparse rows are centered); gram sums
    the tail of G's eigenvalues, each known to eps sigma_1^2 <= eps ||A||_F^2; exact
    resolves singular values to eps sigma_1. Below it, a method takes the rank cap
    (randomized) or says in the result's note that the tol is not confirmed."""
    if method == "exact":
        return 0.0
    if method == "gram":  # twice its rounding, as the randomized method's margin
        return float(2 * np.sqrt(RESIDUAL_ROUNDING * EPS64 * n))
    return float(2 * np.sqrt(DIFFERENCE_ROUNDING * EPS64))  # engine.meets_tol's margin


def _by_preference(n: int, costs: dict[str, float], tol: float | None) -> list[str]:
    """The methods 'auto' may take (an n x n factor only up to MAX_EXACT_COLUMNS), cheapest
    first, except that in fixed-accuracy mode those that resolve ``tol`` come first."""
    methods = ("exact", "gram", "randomized") if n <= MAX_EXACT_COLUMNS else ("randomized",)

    def unresolved(name: str) -> bool:
        return tol is not None and tol < smallest_tol(name, n)

    return sorted(methods, key=lambda name: (unresolved(name), costs[name]))


def _method_choices(
    method: str, n: int, costs: dict[str, float], tol: float | None = None
) -> list[tuple[str, str]]:
    """(method, why) to plan, in order: the requested method alone, or for 'auto' its choice
    and then, should that not fit the memory limit, the others it could take, in order."""
    best, why = _choose_method(method, n, costs, tol)
    if method != "auto":
        return [(best, why)]
    order = _by_preference(n, costs, tol)
    if _krylov_affordable(costs, tol):  # block Krylov before subspace iteration
        order.insert(order.index("randomized"), "krylov")
    fallbacks = [name for name in order if name != best]
    return [(best, why)] + [(name, _fallback_reason(name, n, tol)) for name in fallbacks]


def _krylov_affordable(costs: dict[str, float], tol: float | None) -> bool:
    """Whether block Krylov costs at most KRYLOV_PREMIUM times subspace iteration (it does
    not grow a basis to a tol)."""
    return tol is None and costs["krylov"] <= KRYLOV_PREMIUM * costs["randomized"]


def _fallback_reason(method: str, n: int, tol: float | None) -> str:
    if method == "krylov":
        return (f"block Krylov, at most {KRYLOV_PREMIUM - 1:.0%} dearer than subspace "
                "iteration and far more accurate on flat spectra, is the first that fits")
    why = f"{method} is the cheapest by the cost model that fits"
    if tol is not None and tol < smallest_tol(method, n):
        why += (f" (it resolves tol={tol:g} only to about {smallest_tol(method, n):.1g}; "
                "the result's note says what it confirms)")
    return why


def _choose_method(
    method: str, n: int, costs: dict[str, float], tol: float | None = None
) -> tuple[str, str]:
    predicted = ", ".join(f"{name} ~{seconds:.3g} s" for name, seconds in costs.items())
    if method not in (*METHODS, "auto"):
        choices = ", ".join(repr(name) for name in ("auto", *METHODS))
        raise InputError(f"method must be one of {choices}, not {method!r}")
    if method in ("exact", "gram") and n > MAX_EXACT_COLUMNS:
        raise InputError(
            f"method={method!r} needs an n x n factor; n={n} exceeds {MAX_EXACT_COLUMNS}"
        )
    if method == "krylov" and tol is not None:
        raise InputError("tol (fixed accuracy) works with 'exact', 'gram' and 'randomized'")
    if method != "auto":
        return method, f"method={method!r} was requested (cost model: {predicted})"
    best = _by_preference(n, costs, tol)[0]
    why = f"{best} is the cheapest by the cost model ({predicted})"
    if n > MAX_EXACT_COLUMNS:
        why = f"n={n} > {MAX_EXACT_COLUMNS} rules out an n x n factor ({predicted})"
    elif best != _by_preference(n, costs, None)[0]:  # tol ruled out the cheapest
        why = (f"{best} is the cheapest by the cost model of the methods that resolve "
               f"tol={tol:g} ({predicted})")
    exact = min(("exact", "gram"), key=costs.__getitem__)
    affordable = max(EXACT_PREMIUM * costs["randomized"],
                     costs["randomized"] + EXACT_ALLOWANCE_S)
    if best == "randomized" and n <= MAX_EXACT_COLUMNS and costs[exact] <= affordable:
        ratio = costs[exact] / costs["randomized"]
        return exact, (f"{exact} is exact to rounding at {ratio:.2g}x the cost of the cheapest "
                       f"(up to {EXACT_PREMIUM:g}x, or {EXACT_ALLOWANCE_S:g} s more, is taken "
                       f"for that) ({predicted})")
    if best == "randomized" and _krylov_affordable(costs, tol):
        best = "krylov"
        why = (
            "block Krylov reads A as often as subspace iteration, costs at most "
            f"{KRYLOV_PREMIUM - 1:.0%} more here, and is far more accurate on flat "
            f"spectra ({predicted})"
        )
    return best, why
