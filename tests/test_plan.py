"""The planner: pure functions of shapes and sizes."""

import re

import numpy as np
import pytest

from ooc_svd.errors import InputError, PlanError
from ooc_svd.plan import group_chunks, make_plan
from ooc_svd.sources.dense import regular_boundaries
from ooc_svd.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), ("1.5gb", 1.5e9), ("100", 100),
     (10**9, 10**9), ("64 KiB", 65536)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_a_need_shown_rounded_up_is_a_limit_that_holds_it():
    """What a refusal shows as the need, read back as a memory limit, is at least the need:
    on every three-digit value of each unit, and just above and below it."""
    for exponent in range(10):
        for digits in range(100, 1000):
            exact = digits * 10**exponent
            for need in (exact - 1, exact, exact + 1):
                if need > 0:
                    assert parse_bytes(format_bytes(need, round_up=True)) >= need


@pytest.mark.parametrize("value", [-5, 0, 0.5, "0MB", "1e", "..", "-1GB", float("nan"),
                                   float("inf"), True, "many"])
def test_parse_bytes_refuses_what_is_no_positive_size(value):
    with pytest.raises(InputError, match="memory size"):
        parse_bytes(value)


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (999.6, "1 kB"), (512_000, "512 kB"), (6_912_000, "6.91 MB"),
     (1_073_741_824, "1.07 GB"), (2.5e13, "25 TB")],
)
def test_format_bytes_in_the_units_limits_are_read_in(count, text):
    assert format_bytes(count) == text
    if count:  # no memory size is 0 B
        assert parse_bytes(text.replace(" ", "")) == pytest.approx(count, rel=5e-3, abs=0.5)


def test_group_chunks_keeps_whole_chunks():
    regular = regular_boundaries(1050, 100)
    assert group_chunks(regular, 250) == ((0, 200), (200, 400), (400, 600), (600, 800),
                                          (800, 1000), (1000, 1050))
    assert group_chunks(regular, 10) == tuple((s, min(s + 100, 1050)) for s in range(0, 1050, 100))
    irregular = np.array([0, 30, 100, 110, 300, 320])
    assert group_chunks(irregular, 100) == ((0, 100), (100, 110), (110, 300), (300, 320))


def plan(shape=(4_000_000, 256), k=20, niter=2, method="auto", limit=10**9, chunk=50_000):
    return make_plan(shape, 4, regular_boundaries(shape[0], chunk), k, 10, niter, method, limit)


def test_auto_explains_its_choice():
    wide = plan(shape=(500_000, 8192), chunk=5_000)
    assert wide.method == "randomized" and "8192 > 4096" in wide.reason
    assert plan(shape=(500_000, 4096), chunk=5_000).method == "randomized"  # n x n flops
    tall = plan(k=20, niter=2)
    assert tall.method == "gram" and tall.passes == 2
    for name in ("exact ~", "gram ~", "randomized ~"):  # every prediction is given
        assert name in tall.reason
    assert plan(method="randomized", niter=3).passes == 4
    assert "3 passes" in plan(method="randomized").describe()


def predicted(reason: str) -> dict[str, float]:
    """The cost model's seconds per method, as a plan's reason gives them."""
    return {name: float(value) for name, value in re.findall(r"(\w+) ~([0-9.e+-]+) s", reason)}


def test_auto_counts_the_n_by_n_factorizations():
    """Sparse rows of 3000 columns: the sparse Gram kernel makes G's pass cheap, but the
    eigendecomposition of G after it, O(n^3), takes seconds (and the SVD of R more), where
    the randomized method's passes take a fraction of one."""
    import scipy.sparse

    import ooc_svd

    A = scipy.sparse.random(15_000, 3000, density=0.01, random_state=0, format="csr")
    planned = ooc_svd.svd_plan(A, 10)
    seconds = predicted(planned.reason)
    assert seconds["gram"] > 3000**3 / 8e9 and seconds["exact"] > 3000**3 / 3.5e9
    assert planned.method in ("randomized", "krylov")
    narrow = ooc_svd.svd_plan(A[:, :500], 10)  # its eigendecomposition: 0.02 s
    assert narrow.method in ("exact", "gram")


def test_auto_takes_an_exact_method_within_a_second_of_the_cheapest():
    """More than twice the cost of the cheapest, but under a second more by the model:
    exact to rounding is worth that."""
    tall = plan(shape=(5_000, 1500), chunk=1_000, k=10)
    seconds = predicted(tall.reason)
    assert tall.method in ("exact", "gram") and "or 1 s more" in tall.reason
    assert 2 * seconds["randomized"] < seconds[tall.method] <= seconds["randomized"] + 1


def test_auto_falls_back_to_a_method_that_fits_the_limit():
    """gram is the cheapest here but needs n x n arrays (auto's, room for the fallback to
    exact too); under a tighter limit, auto takes randomized rather than refusing, and
    names what gram would need: as the limit, that is enough for it. A requested method is
    never replaced."""
    roomy = plan(shape=(200_000, 256), chunk=1000, limit=10**9)
    tight = plan(shape=(200_000, 256), chunk=1000, limit=10**7)
    assert roomy.method == "gram" and tight.method == "randomized"
    assert roomy.preferred is None and tight.preferred[0] == "gram"
    needed = tight.preferred[1]
    assert tight.reason.endswith(f"gram would need {format_bytes(needed, round_up=True)}, "
                                 "more than memory_limit")
    assert tight.predicted_peak_bytes <= 10**7 < needed
    enough = plan(shape=(200_000, 256), chunk=1000, limit=needed)
    assert enough.method == "gram" and enough.preferred is None
    assert plan(shape=(200_000, 256), chunk=1000, method="gram", limit=10**7).method == "gram"
    with pytest.raises(PlanError, match="cannot hold one storage chunk"):
        plan(shape=(200_000, 256), chunk=1000, method="exact", limit=10**7)


def test_with_a_block_cache_smaller_blocks_are_taken_when_they_save_reads():
    """Blocks as large as the limit allows leave the cache no room; smaller ones lower the
    peak, and then the cache holds all of A: the q + 1 = 4 passes read it once."""
    m, n = 200_000, 52

    def randomized(limit, cacheable):
        return make_plan((m, n), 4, regular_boundaries(m, 5000), 10, 10, 3, "randomized",
                         limit, cacheable=cacheable)

    for limit in (60 * 10**6, 200 * 10**6):
        cached = randomized(limit, cacheable=True)
        assert cached.cached_blocks == len(cached.blocks)
        assert cached.bytes_to_read == m * n * 4
        assert cached.predicted_peak_bytes + cached.cached_beside_bytes <= limit
        uncached = randomized(limit, cacheable=False)  # blocks as large as fit
        assert len(uncached.blocks) < len(cached.blocks)
        assert uncached.bytes_to_read == 4 * m * n * 4


@pytest.mark.parametrize("sparse", [False, True])
def test_where_every_block_is_cached_the_last_is_the_working_sets(sparse):
    """A cache of every block holds, beside the working set, all but the last: that one is
    the block the working set computes, and the later passes read nothing. A matrix read as
    one block is cached at no cost, where the rule for a cache beside every block's working
    set read it q + 1 times (a 34 MB sparse store at 400 MB: 3 reads for 3 passes)."""
    m, n = 200_000, 52
    boundaries = regular_boundaries(m, 5000)
    chunk_bytes = np.full(len(boundaries) - 1, 5000 * n * 4) if sparse else None
    nnz = m * n if sparse else None

    def randomized(limit, cacheable=True):
        return make_plan((m, n), 4, boundaries, 10, 10, 3, "randomized", limit,
                         cacheable=cacheable, chunk_bytes=chunk_bytes, nnz=nnz)

    uncached = randomized(10**9, cacheable=False)
    assert len(uncached.blocks) == 1  # all of A, 41.6 MB, one block
    for limit in (uncached.predicted_peak_bytes, 10**9):
        whole = randomized(limit)
        assert len(whole.blocks) == 1 and whole.cached_blocks == 1
        assert whole.cached_beside_bytes == 0 and whole.bytes_to_read == m * n * 4
    if sparse:
        return  # sparse blocks keep their size: several are as large as the limit allows
    several = randomized(uncached.predicted_peak_bytes // 2)  # halved blocks, all cached
    assert 1 < len(several.blocks) == several.cached_blocks
    assert several.cached_beside_bytes == several.cached_bytes - several.block_bytes[-1]
    assert several.predicted_peak_bytes + several.cached_beside_bytes <= several.memory_limit
    assert several.bytes_to_read == m * n * 4


def test_peak_fits_the_limit_and_read_ahead_shrinks_before_failing():
    roomy = plan(method="randomized", limit=10**9)
    assert roomy.prefetch_depth == 2 and roomy.predicted_peak_bytes <= 10**9
    tight = plan(method="randomized", limit=250 * 10**6)
    assert tight.prefetch_depth == 1 and tight.predicted_peak_bytes <= 250 * 10**6
    assert all(stop - start == 50_000 for start, stop in tight.blocks[:-1])


def test_refusals_give_the_numbers():
    chunk = r"cannot hold one storage chunk of 50000 rows \(51.2 MB raw\)"
    with pytest.raises(PlanError, match=chunk):
        plan(method="randomized", limit=100 * 10**6)
    working_set = (r"working set \(n x l float64 arrays with l=30\) and the smallest block it "
                   r"can read need [0-9.]+ [kMG]B")
    with pytest.raises(PlanError, match=working_set):
        plan(shape=(1000, 10_000_000), method="randomized", limit=100 * 10**6, chunk=10)
    with pytest.raises(InputError, match="n=8192 exceeds 4096"):
        plan(shape=(100_000, 8192), method="exact")


@pytest.mark.parametrize("shape", [(20_000, 500), (2_000, 20_000), (5_000, 3_000)])
@pytest.mark.parametrize("limit", [10**5, 3 * 10**6])
def test_auto_refuses_with_the_least_limit_that_fits(shape, limit):
    """'auto' tries its methods in turn; the refusal names the need of the one needing the
    least (not of the first it tried), and that need, as the limit, fits that method."""
    from ooc_svd.api import svd_plan

    A = np.zeros(shape, dtype=np.float32)
    with pytest.raises(PlanError) as refused:
        svd_plan(A, k=10, memory_limit=limit)
    needed = refused.value.needed_bytes
    assert needed > limit
    assert format_bytes(needed, round_up=True) in str(refused.value)
    fits = svd_plan(A, k=10, memory_limit=needed)
    assert fits.predicted_peak_bytes <= needed
    for method in ("exact", "gram", "randomized", "krylov"):
        with pytest.raises(InputError) as each:  # a PlanError, or n too large for a method
            svd_plan(A, k=10, memory_limit=limit, method=method)
        assert getattr(each.value, "needed_bytes", np.inf) >= needed


@pytest.mark.parametrize("method", ["auto", "randomized", "krylov"])
def test_a_sparse_refusal_names_the_least_limit_that_fits(method, monkeypatch):
    """The sparse power kernel keeps a private accumulator per thread, as many as a quarter
    of the limit holds: the need is found at the limit it names, not the one refused."""
    import scipy.sparse

    import ooc_svd.api
    from ooc_svd.api import svd_plan

    monkeypatch.setattr(ooc_svd.api, "scatter_threads", lambda: 4)
    A = scipy.sparse.random(20_000, 2_000, density=0.01, format="csr", random_state=0)
    for limit in (10**5, 10**6, 10**7):
        with pytest.raises(PlanError) as refused:
            svd_plan(A, k=10, memory_limit=limit, method=method)
        needed = refused.value.needed_bytes
        assert format_bytes(needed, round_up=True) in str(refused.value)
        assert svd_plan(A, k=10, memory_limit=needed, method=method).predicted_peak_bytes <= needed
        with pytest.raises(PlanError):
            svd_plan(A, k=10, memory_limit=needed - 1, method=method)


def test_a_larger_limit_never_refuses_a_sparse_plan_that_a_smaller_one_takes(monkeypatch):
    """A limit that allows one more private accumulator (a quarter of it) than its blocks
    leave room for takes fewer accumulators: it was refused, where a smaller limit with
    fewer of them fitted."""
    import scipy.sparse

    import ooc_svd.api
    from ooc_svd.api import svd_plan

    monkeypatch.setattr(ooc_svd.api, "scatter_threads", lambda: 8)
    # (scipy.sparse.random draws from all m n positions: 16 GB for this shape)
    rng = np.random.default_rng(0)
    rows, columns = rng.integers(0, 20_000, 200_000), rng.integers(0, 100_000, 200_000)
    A = scipy.sparse.csr_matrix((np.ones(200_000), (rows, columns)), shape=(20_000, 100_000))

    def fits(limit: int) -> bool:
        try:
            svd_plan(A, k=20, memory_limit=limit, method="randomized")
        except PlanError:
            return False
        return True

    taken = [fits(int(limit)) for limit in np.geomspace(5e7, 5e8, 200)]
    assert True in taken and all(taken[taken.index(True):])


@pytest.mark.parametrize("sparse", [False, True])
def test_a_refusal_for_an_array_in_memory_does_not_speak_of_a_store(sparse):
    """An array in memory (or an .npy file) has no storage chunks to rewrite: the refusal
    names the least it reads at a time and asks for memory."""
    import scipy.sparse

    from ooc_svd.api import svd_plan

    A = scipy.sparse.random(20_000, 200, density=0.05, format="csr", rng=1)
    with pytest.raises(PlanError) as refused:
        svd_plan(A if sparse else A.toarray(), k=10, method="gram", memory_limit="3MB")
    message = str(refused.value)
    assert "the least it reads at a time" in message and message.endswith("raise memory_limit")
    assert "store" not in message and "chunk" not in message


def test_a_refusal_needs_more_than_the_limit_it_refuses():
    """The partly decoded chunks of a sparse store's reads count in the number given."""
    boundaries = regular_boundaries(10_000, 1_000)
    with pytest.raises(PlanError, match="partly decoded storage chunks per read") as refused:
        make_plan((10_000, 3_000), 4, boundaries, 3, 10, 2, "randomized", 6 * 10**6,
                  chunk_bytes=np.full(10, 70_000), nnz=50_000, read_overhead_bytes=3 * 10**6)
    needed = parse_bytes(re.search(r"need ([0-9.]+ [kMG]B)", str(refused.value)).group(1))
    assert needed > 6 * 10**6 and "--chunk-nnz" in str(refused.value)
    assert refused.value.needed_bytes == pytest.approx(needed, rel=5e-3)
    make_plan((10_000, 3_000), 4, boundaries, 3, 10, 2, "randomized",
              refused.value.needed_bytes, chunk_bytes=np.full(10, 70_000), nnz=50_000,
              read_overhead_bytes=3 * 10**6)


def test_more_cuda_streams_leave_less_room_for_each_block():
    """Each stream pins a staging copy of a block and two of its b x l matrices, which the
    memory limit must hold beside the working set."""
    from ooc_svd.api import _plan
    from ooc_svd.sources import open_source

    source = open_source(np.zeros((200_000, 64), dtype=np.float32))
    largest = [max(_plan(source, 5, 5, 2, "randomized", "64MB", gpu_streams=streams).block_bytes)
               for streams in (0, 1, 2, 4)]
    assert largest == sorted(largest, reverse=True) and len(set(largest)) == 4


def test_auto_falls_back_to_block_krylov_when_the_exact_method_it_prefers_does_not_fit():
    """gram is preferred at up to twice the cost, but its n x n factors need more than the
    limit: block Krylov, affordable next to subspace iteration, is taken, not plain
    subspace iteration."""
    m, n = 100_000, 2_000
    boundaries = regular_boundaries(m, 1_000)
    roomy = make_plan((m, n), 8, boundaries, 10, 10, 2, "auto", 10**10)
    assert roomy.method in ("exact", "gram") and "exact to rounding at" in roomy.reason
    tight = make_plan((m, n), 8, boundaries, 10, 10, 2, "auto", 200 * 10**6)
    assert tight.method == "krylov" and "more than memory_limit" in tight.reason
