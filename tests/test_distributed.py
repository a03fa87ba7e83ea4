"""The passes on a dask.distributed LocalCluster: the same results as the local run, workers
that die mid-pass, and no block of A through the scheduler or the client."""

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings

import dask
import naive
import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

import ooc_svd
import ooc_svd.distributed
import ooc_svd.engine
import ooc_svd.plan
import ooc_svd.sources.csr
import ooc_svd.sources.dense
from ooc_svd import ClusterError, InputError
from ooc_svd.distributed import RowSink, group_products, row_groups, tree_depth
from ooc_svd.sources.csr import CSRWriter
from ooc_svd.tsqr import StreamingTSQR, assemble_left_vectors, local_qr

pytestmark = pytest.mark.distributed

M, N = 2400, 48
CHUNK_ROWS, BLOCK_ROWS = 100, 200  # 12 blocks, in 8 groups on 2 one-thread workers


def local_cluster():
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                        dashboard_address=":0")


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as cluster, Client(cluster) as client:
        yield cluster, client


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory):
    A = naive.matrix_with_spectrum(M, N, 1.0 / np.arange(1, N + 1), seed=3) + 2.0
    path = str(tmp_path_factory.mktemp("dense") / "A.zarr")
    array = zarr.create_array(path, shape=A.shape, chunks=(CHUNK_ROWS, N), dtype=A.dtype)
    array[:] = A
    return path


@pytest.fixture(scope="module")
def sparse_matrix():
    return naive.sparse_with_decay(3000, 200, 0.03, 0.02, seed=5)


@pytest.fixture(scope="module")
def csr_store(tmp_path_factory, sparse_matrix):
    path = str(tmp_path_factory.mktemp("csr") / "S.zarr")
    with CSRWriter(path, sparse_matrix.shape[1], "float64", chunk_nnz=4096) as writer:
        for start in range(0, sparse_matrix.shape[0], 700):
            writer.append(sparse_matrix[start : start + 700])
        writer.close()
    return path


@pytest.fixture
def small_units(monkeypatch):
    """CSR blocks of about 20 kB, so a small matrix makes many blocks."""
    monkeypatch.setattr(ooc_svd.sources.csr, "UNIT_BYTES", 6000)
    monkeypatch.setattr(ooc_svd.plan, "MAX_BLOCK_BYTES", 20_000)


def assert_same_result(result, reference, atol=1e-10):
    """Signs are normalized the same way everywhere, so the factors compare directly.

    Singular values agree to rounding relative to sigma_1: a sum in another order moves
    each by about eps sigma_1, the small ones most relative to themselves. So does the
    (float64) mean, to the rounding of column sums, relative to the entries' size (about
    sigma_1 / sqrt(m)), which a mean near zero does not set."""
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-11, atol=1e-12 * reference.S[0])
    np.testing.assert_allclose(result.V, reference.V, atol=atol)
    np.testing.assert_allclose(np.asarray(result.U), np.asarray(reference.U), atol=atol)
    if reference.mean is not None:
        entries = reference.S[0] / np.sqrt(len(reference.U))
        np.testing.assert_allclose(result.mean, reference.mean, rtol=1e-13, atol=1e-13 * entries)
    assert result.passes == reference.passes


# ---- the tree algebra, without a cluster ----------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 3, 5, 8])
def test_tree_of_tsqr_merges_gives_q_w_of_the_stacked_rows(groups):
    """Groups' streaming TSQRs merged pairwise give B = Q^T A and, walking the tree down
    from W, U = Q W for the whole matrix: checked against numpy on the stacked rows."""
    rng = np.random.default_rng(groups)
    blocks = [rng.standard_normal((rows, 6)) for rows in rng.integers(3, 20, size=2 * groups)]
    Y = np.vstack(blocks)
    parts = row_groups(tuple((i, i + 1) for i in range(len(blocks))), groups)
    nodes, sweeps = [], []
    for part in parts:
        tsqr, spilled = StreamingTSQR(), []
        for i in range(part.first, part.first + len(part.blocks)):
            Q_i, R_i = local_qr(blocks[i].copy())
            spilled.append((Q_i, tsqr.add_block(R_i, blocks[i].T @ Q_i)))
        nodes.append((tsqr.R, tsqr.BT))
        sweeps.append(spilled)
    steps, factors, ids = [], [], list(range(len(nodes)))
    while len(nodes) > 1:  # the same pairing as ClusterPasses._reduce
        merged, merged_ids = [], []
        pairs = zip(nodes[0::2], nodes[1::2], ids[0::2], ids[1::2], strict=False)
        for a, b, ia, ib in pairs:
            tsqr = StreamingTSQR(a[0], a[1], 1)
            factors.append(tsqr.add_block(b[0], b[1]))
            steps.append((len(parts) + len(steps), ia, ib))
            merged.append((tsqr.R, tsqr.BT))
            merged_ids.append(steps[-1][0])
        if len(nodes) % 2:
            merged.append(nodes[-1])
            merged_ids.append(ids[-1])
        nodes, ids = merged, merged_ids
    assert len(steps) == groups - 1 and tree_depth(groups) == int(np.ceil(np.log2(groups)))
    R, BT = nodes[0]
    np.testing.assert_allclose(BT.T, R, atol=1e-12)  # B = Q^T Y = R when A = Y
    W = rng.standard_normal((R.shape[0], 3))
    U = np.empty((Y.shape[0], 3))
    offsets = np.cumsum([0] + [b.shape[0] for b in blocks])
    products = group_products(steps, factors, W, groups)
    for part, P, spilled in zip(parts, products, sweeps, strict=True):
        def store(i, rows, part=part):
            index = part.first + i
            U[offsets[index] : offsets[index + 1]] = rows

        assemble_left_vectors(len(spilled), P, lambda i, s=spilled: s[i][0],
                              lambda i, s=spilled: s[i][1], store)
    np.testing.assert_allclose(U, Y @ np.linalg.solve(R, W), atol=1e-10)  # Q = Y R^-1


def test_groups_split_blocks_evenly_and_in_order():
    blocks = tuple((10 * i, 10 * i + 10) for i in range(11))
    groups = row_groups(blocks, 4)
    assert [len(g.blocks) for g in groups] == [3, 3, 2, 3]
    assert sum((g.blocks for g in groups), ()) == blocks
    assert [g.first for g in groups] == [0, 3, 6, 8]
    assert len(row_groups(blocks[:2], 8)) == 2


@pytest.mark.parametrize(
    ("start", "stop", "owned"),
    [
        (0, 250, (0, 200)),  # chunk [200, 300) is shared with the next group
        (250, 600, (300, 600)),
        (600, 1000, (600, 1000)),  # the last rows, in a partial chunk, are the group's
        (120, 180, (120, 120)),  # inside one chunk: every row goes to the client
    ],
)
def test_workers_write_only_chunks_wholly_inside_their_rows(start, stop, owned):
    chunked = type("Chunked", (), {"chunks": (100, 2)})()
    sink = RowSink(chunked, np.dtype(np.float64), 1000)
    assert sink.owned_rows(start, stop) == owned


def test_a_copy_of_a_store_without_some_chunks_is_told_apart(dense_store, tmp_path):
    """What a worker's view of the input is compared by: a copy that lacks chunk files,
    with the same metadata (an interrupted rsync -a), would read them as zeros."""
    import shutil

    from ooc_svd.sources.paths import path_marker

    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(dense_store, copy, copy_function=shutil.copy2)  # times kept
    os.utime(copy, ns=(os.stat(dense_store).st_atime_ns, os.stat(dense_store).st_mtime_ns))
    assert path_marker(copy) == path_marker(dense_store)
    chunk = next(os.path.join(root, files[0]) for root, _, files in os.walk(copy)
                 if files and "zarr.json" not in files)
    os.remove(chunk)
    assert path_marker(copy) != path_marker(dense_store)
    assert path_marker(str(tmp_path / "absent")) is None


def test_rows_written_after_the_run_ended_are_removed_with_its_output(tmp_path):
    """A group task of U's sweep that runs on after the run failed or was interrupted (dask
    cannot stop a running task) wrote its rows into the output that the run had removed:
    zarr recreated the directories, chunk files without metadata, and the next run was
    refused, resume and overwrite alike. The task removes them again."""
    from concurrent.futures import CancelledError

    from ooc_svd.distributed import _GroupRows
    from ooc_svd.store import LeftVectors, ResultWriter, check_output_path

    out = str(tmp_path / "result.zarr")
    writer = ResultWriter(out, overwrite=False)
    left = LeftVectors(writer, 1000, np.dtype(np.float64), 100)
    left.allocate(3)
    rows = _GroupRows(RowSink(left.array, np.dtype(np.float64), 1000), 0, 1000)
    rows.add(0, np.ones((100, 3)))  # while the run goes on
    assert os.path.exists(os.path.join(writer.output.partial, "U", "c", "0", "0"))
    writer.abort()
    with pytest.raises(CancelledError, match="has ended"):
        rows.add(100, np.ones((100, 3)))
    assert not os.path.exists(writer.output.partial)
    assert check_output_path(out, overwrite=False) == os.path.abspath(out)


def test_a_worker_that_does_not_see_the_sweeps_marker_sends_its_rows_back(tmp_path):
    """A worker that joined after the check that every worker sees the output, with
    another view of its path, wrote U's rows where the client never saw them, and the run
    failed as if it had ended. The sweep's marker tells it: it sends its rows back."""
    from ooc_svd.distributed import _GroupRows
    from ooc_svd.store import LeftVectors, ResultWriter

    writer = ResultWriter(str(tmp_path / "result.zarr"), overwrite=False)
    left = LeftVectors(writer, 1000, np.dtype(np.float64), 100)
    left.allocate(3)
    marker = os.path.join(writer.output.partial, ".marker")
    for seen in (False, True):
        if seen:
            open(marker, "w").close()
        rows = _GroupRows(RowSink(left.array, np.dtype(np.float64), 1000, marker), 0, 200)
        rows.add(0, np.full((200, 3), 7.0))
        written = left.array[:200]
        assert np.all(written == 7.0) if seen else not np.any(written)
        assert [start for start, _ in rows.returned] == ([] if seen else [0])
    writer.abort()


# ---- on a LocalCluster ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
@pytest.mark.parametrize("center", [False, True])
def test_dense_store_matches_the_local_run(cluster, dense_store, block_rows, method, center):
    block_rows(BLOCK_ROWS, N)
    reference = ooc_svd.svd(dense_store, 6, method=method, center=center)
    result = ooc_svd.svd(dense_store, 6, method=method, center=center, client=cluster[1])
    assert len(result.plan.blocks) == M // BLOCK_ROWS
    # The workers keep no block cache: the plan counts every pass's reads, but for the
    # first block, which a centered run's first pass reads once more for its shift.
    assert result.plan.cached_blocks == 0 < reference.plan.cached_blocks
    shift_block = BLOCK_ROWS * N * 8 if center else 0
    assert result.bytes_read == result.plan.bytes_to_read + shift_block
    # The block Krylov basis amplifies rounding in its last columns: on this matrix the
    # local run's U moves by up to 1e-6 between block sizes of 200 and 2400 rows, as much
    # as between the local and the cluster's summation orders. The other methods agree to
    # rounding.
    assert_same_result(result, reference, atol=1e-5 if method == "krylov" else 1e-10)


@pytest.mark.parametrize(
    "options",
    [
        {"k": 5},
        {"k": 5, "center": True},
        {"k": 5, "center": True, "niter": 0},  # the mean is found by the final pass itself
        {"k": 5, "method": "exact", "center": True},
    ],
)
def test_csr_store_matches_the_local_run(cluster, csr_store, small_units, options):
    reference = ooc_svd.svd(csr_store, **options)
    result = ooc_svd.svd(csr_store, **options, client=cluster[1])
    assert len(result.plan.blocks) >= 8
    assert_same_result(result, reference)


def test_blocks_are_cut_at_units_into_pieces_for_the_groups_wanted():
    from ooc_svd.distributed import split_blocks

    MB = 1 << 20
    boundaries = np.arange(0, 1001, 100)  # ten units of 100 rows
    unit_bytes = np.full(10, 5 * MB)
    whole = ((0, 1000),)
    # 50 MB over 4 groups: pieces of at most 16 MB (MIN_TASK_BYTES, more than 12.5 MB)
    assert split_blocks(whole, boundaries, unit_bytes, 4) == \
        ((0, 300), (300, 600), (600, 900), (900, 1000))
    # Each of several blocks is cut on its own; none below a unit
    assert split_blocks(((0, 200), (200, 1000)), boundaries, unit_bytes, 100) == \
        ((0, 200), (200, 500), (500, 800), (800, 1000))
    big = np.array([40 * MB] + [MB] * 9)  # a unit past the target is a piece of its own
    assert split_blocks(whole, boundaries, big, 8) == ((0, 100), (100, 1000))


def test_a_plan_of_few_blocks_is_cut_for_the_clusters_threads(cluster, dense_store,
                                                              monkeypatch):
    """A plan of one block (A fits the limit) gave one task a pass, whatever the workers:
    its block is cut at chunks so that each thread has GROUPS_PER_THREAD tasks."""
    monkeypatch.setattr(ooc_svd.distributed, "MIN_TASK_BYTES", 1)
    mapped, row_groups = [], ooc_svd.distributed.row_groups
    monkeypatch.setattr(ooc_svd.distributed, "row_groups",
                        lambda blocks, count: mapped.append(len(blocks)) or
                        row_groups(blocks, count))
    reference = ooc_svd.svd(dense_store, 6, method="randomized", center=True)
    result = ooc_svd.svd(dense_store, 6, method="randomized", center=True, client=cluster[1])
    assert len(result.plan.blocks) == 1
    threads = sum(cluster[1].nthreads().values())
    assert set(mapped) == {ooc_svd.distributed.GROUPS_PER_THREAD * threads}
    assert result.bytes_read == result.plan.bytes_to_read + M // 8 * N * 8  # shift's block
    assert_same_result(result, reference)


def test_the_backend_reaches_the_workers(cluster, csr_store):
    from ooc_svd.kernels.cuda_backend import cuda_available

    result = ooc_svd.svd(csr_store, 3, client=cluster[1], backend="cpu")
    assert result.backend == "cpu"  # what the workers' kernels ran on
    assert_same_result(result, ooc_svd.svd(csr_store, 3, backend="cpu"))
    gpu = cuda_available(allow_simulator=False)[0]
    assert ooc_svd.svd(csr_store, 3, client=cluster[1]).backend == ("cuda" if gpu else "cpu")
    if not gpu:
        # The workers have no GPU either: asked before any pass, they name what is missing.
        with pytest.raises(ValueError, match=r"needs a usable NVIDIA GPU on every worker; "
                                             r"2 of 2 have none \(tcp://"):
            ooc_svd.svd(csr_store, 3, client=cluster[1], backend="cuda")


def test_u_written_by_the_workers_into_out(cluster, csr_store, small_units, tmp_path):
    """CSR blocks do not line up with U's chunks: the shared chunks' rows go through the
    client, the rest is written by the workers; the stored U equals the local one."""
    reference = ooc_svd.svd(csr_store, 5, center=True)
    out = str(tmp_path / "result.zarr")
    scratch = tmp_path / "scratch"
    with pytest.raises(InputError, match="cannot make a scratch directory in .*: it is "
                                         "not a directory there$"):
        ooc_svd.svd(csr_store, 5, out=out, client=cluster[1], scratch_dir=str(scratch))
    assert sorted(os.listdir(tmp_path)) == []  # a mistyped scratch_dir is not created
    scratch.mkdir()
    result = ooc_svd.svd(csr_store, 5, center=True, out=out, client=cluster[1],
                         scratch_dir=str(scratch))
    assert isinstance(result.U, zarr.Array)
    assert not list(scratch.iterdir())  # the spilled factors are removed
    assert_same_result(result, reference)
    np.testing.assert_allclose(zarr.open_group(out, mode="r")["U"][:], reference.U, atol=1e-10)


def test_in_memory_inputs_are_scattered(cluster, sparse_matrix, small_units, block_rows,
                                        monkeypatch):
    monkeypatch.setattr(ooc_svd.sources.dense, "in_memory_boundaries",
                        lambda shape, itemsize: np.arange(0, shape[0] + 1, 100))
    A = naive.matrix_with_spectrum(1200, 30, np.logspace(0, -3, 30), seed=4).astype(np.float32)
    block_rows(100, 30, 4)
    assert_same_result(ooc_svd.svd(A, 4, center=True, client=cluster[1]),
                       ooc_svd.svd(A, 4, center=True), atol=1e-5)
    assert_same_result(ooc_svd.svd(sparse_matrix, 4, client=cluster[1]),
                       ooc_svd.svd(sparse_matrix, 4))


def test_npy_file_is_opened_by_the_workers(cluster, tmp_path, block_rows, monkeypatch):
    monkeypatch.setattr(ooc_svd.sources.dense, "in_memory_boundaries",
                        lambda shape, itemsize: np.arange(0, shape[0] + 1, 100))
    path = str(tmp_path / "A.npy")
    np.save(path, naive.matrix_with_spectrum(1200, 30, np.logspace(0, -3, 30), seed=8))
    block_rows(100, 30)
    source = ooc_svd.sources.open_source(path)
    assert isinstance(ooc_svd.distributed.shippable_source(source), ooc_svd.distributed._NpyFile)
    assert_same_result(ooc_svd.svd(path, 4, client=cluster[1]), ooc_svd.svd(path, 4))
    # A memmap passed as an array is scattered, even beside a file named as it is described.
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "memmap", np.zeros((1200, 30)))
    (tmp_path / "memmap.npy").rename(tmp_path / "memmap")
    mapped = np.load(path, mmap_mode="r")
    assert ooc_svd.distributed.shippable_source(ooc_svd.sources.open_source(mapped)) is None
    assert_same_result(ooc_svd.svd(mapped, 4, client=cluster[1]), ooc_svd.svd(path, 4))


def test_dask_array_input_and_torch_signatures(cluster, dense_store, block_rows):
    import dask.array as da

    block_rows(BLOCK_ROWS, N)
    A = da.from_zarr(dense_store)
    reference = ooc_svd.svd(A, 4, spectral_iters=2)
    result = ooc_svd.svd(A, 4, spectral_iters=2, client=cluster[1])
    assert_same_result(result, reference)
    assert result.spectral_error == pytest.approx(reference.spectral_error, rel=1e-10)
    for function in (ooc_svd.svd_lowrank, ooc_svd.pca_lowrank):
        local, remote = function(dense_store, 4), function(dense_store, 4, client=cluster[1])
        np.testing.assert_allclose(remote[1], local[1], rtol=1e-11, atol=1e-12 * local[1][0])


def scatters_of(client, monkeypatch) -> list:
    """What ``client`` scatters from now on, as it scatters it."""
    scattered = []
    scatter = client.scatter
    monkeypatch.setattr(client, "scatter", lambda data, **options: scattered.append(data) or
                        scatter(data, **options))
    return scattered


def test_the_spectral_estimate_reads_u_from_its_store_on_the_workers(cluster, dense_store,
                                                                    tmp_path, monkeypatch):
    """U in a store every worker reaches is read there; only U held by the client is
    scattered to the workers, a group's rows each."""
    reference = ooc_svd.svd(dense_store, 4, spectral_iters=2)
    client = cluster[1]
    scattered = scatters_of(client, monkeypatch)
    stored = ooc_svd.svd(dense_store, 4, spectral_iters=2, out=str(tmp_path / "result.zarr"),
                         client=client)
    assert scattered == []
    held = ooc_svd.svd(dense_store, 4, spectral_iters=2, client=client)
    assert sum(piece.shape[0] for piece in scattered) == 2 * M  # one scatter per pass
    assert all(piece.dtype == reference.U.dtype for piece in scattered)
    for result in (stored, held):
        assert result.spectral_error == pytest.approx(reference.spectral_error, rel=1e-10)


def test_a_worker_that_does_not_see_the_store_of_u_is_sent_its_rows(cluster, dense_store,
                                                                   tmp_path, monkeypatch):
    """A worker that joined after the check that every worker sees U's store may not see
    it, and would read U's rows as zeros (the spectral error was wrong, without a word):
    each read checks the pass's marker there, and the pass is run again with U's rows
    sent, as they are in the later passes."""
    reference = ooc_svd.svd(dense_store, 4, spectral_iters=2)
    shared = ooc_svd.distributed._SharedRows
    monkeypatch.setattr(ooc_svd.distributed, "_SharedRows",  # a marker no worker sees
                        lambda array, marker: shared(array, marker + ".elsewhere"))
    client = cluster[1]
    scattered = scatters_of(client, monkeypatch)
    result = ooc_svd.svd(dense_store, 4, spectral_iters=2, out=str(tmp_path / "result.zarr"),
                         client=client)
    assert sum(piece.shape[0] for piece in scattered) == 2 * M
    assert result.spectral_error == pytest.approx(reference.spectral_error, rel=1e-10)
    assert not [name for name in os.listdir(tmp_path / "result.zarr") if "ooc-svd-u" in name]


def test_an_m_in_memory_too_large_to_ship_is_named(cluster, dense_store, monkeypatch):
    monkeypatch.setattr(ooc_svd.distributed, "MAX_SOURCE_BYTES", 10_000)  # M has 19 kB
    column = np.arange(float(M))[:, None]
    with pytest.raises(InputError, match=r"^M pickles to [0-9.]+ kB.*write M to a zarr store"):
        ooc_svd.svd_lowrank(dense_store, 2, M=column, client=cluster[1])


def test_a_scheduler_without_workers_is_named(dense_store):
    """The wait for a first worker is dask's configuration value ooc-svd.worker-timeout."""
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client, \
            dask.config.set({"ooc-svd.worker-timeout": "1.5s"}), \
            pytest.raises(InputError, match=f"no worker joined the scheduler at "
                                            f"{cluster.scheduler_address} within 1.5 s"):
        ooc_svd.svd(dense_store, 2, client=client)


@pytest.mark.parametrize("value", ["soon", 0, -3])
def test_a_malformed_worker_timeout_is_refused(value):
    with dask.config.set({"ooc-svd.worker-timeout": value}), \
            pytest.raises(InputError, match="^ooc-svd.worker-timeout must be"):
        ooc_svd.distributed.worker_timeout()


def test_a_stack_of_matrices_runs_on_one_local_cluster(monkeypatch):
    """client='local:N' with a stack: one LocalCluster for all the matrices, not one each
    (4 clusters took 5.7 s for what takes 0.2 s here)."""
    import distributed

    started = []

    class CountedCluster(distributed.LocalCluster):
        def __init__(self, *args, **kwargs):
            started.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", CountedCluster)
    A = np.random.default_rng(3).standard_normal((3, 300, 20))
    for function in (ooc_svd.svd_lowrank, ooc_svd.pca_lowrank):
        remote = function(A, 3, client="local:2")
        for got, want in zip(remote, function(A, 3), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-10)
    assert len(started) == 2  # one per call
    for bad in ({"q": -1}, {"niter": -1}, {"M": np.ones((2, 1, 20))}):  # refused first
        with pytest.raises(InputError):
            ooc_svd.svd_lowrank(A, **{"q": 3, **bad}, client="local:2")
    assert len(started) == 2


def test_svd_lowrank_with_an_m_by_n_mean_on_the_cluster(cluster, dense_store, tmp_path,
                                                        block_rows):
    """A - M is read by the workers when A is a store, with M as a store or as values
    shipped with it; its rows are scattered when A is in memory. Either way the result is
    the local one's."""
    from ooc_svd.distributed import shippable_source
    from ooc_svd.sources.difference import subtract

    block_rows(BLOCK_ROWS, N)
    rng = np.random.default_rng(2)
    values = np.outer(rng.standard_normal(M), rng.standard_normal(N))
    stored = zarr.create_array(str(tmp_path / "M.zarr"), shape=values.shape,
                               chunks=(CHUNK_ROWS, N), dtype=values.dtype)
    stored[:] = values
    column = rng.standard_normal((M, 1))
    in_memory = zarr.open_array(dense_store, mode="r")[:]
    for A, mean, shipped in ((dense_store, stored, True), (dense_store, values, True),
                             (dense_store, column, True), (in_memory, column, False)):
        difference, _ = subtract(ooc_svd.sources.open_source(A), mean)
        assert (shippable_source(difference) is not None) == shipped
        local = ooc_svd.svd_lowrank(A, 4, niter=3, M=mean)
        remote = ooc_svd.svd_lowrank(A, 4, niter=3, M=mean, client=cluster[1])
        np.testing.assert_allclose(remote[1], local[1], rtol=1e-11, atol=1e-12 * local[1][0])
        np.testing.assert_allclose(remote[2], local[2], atol=1e-10)


def test_scheduler_address_and_bad_clients(cluster, dense_store, block_rows, monkeypatch):
    block_rows(BLOCK_ROWS, N)
    result = ooc_svd.svd(dense_store, 3, client=cluster[0].scheduler_address)
    assert_same_result(result, ooc_svd.svd(dense_store, 3))
    with pytest.raises(InputError, match="local:N"):
        ooc_svd.svd(dense_store, 3, client="local:two")
    with pytest.raises(InputError, match="distributed.Client"):
        ooc_svd.svd(dense_store, 3, client=2)
    # A malformed address makes no Client: one made from it would fail and then take a
    # minute to close at garbage collection, with a traceback.
    import distributed

    made = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            made.append(args)

    monkeypatch.setattr(distributed, "Client", Recorder)
    with pytest.raises(InputError, match="missing port number"):
        ooc_svd.svd(dense_store, 3, client="no-port")
    assert made == []


def test_in_memory_dask_graph_is_refused(cluster, monkeypatch, tmp_path):
    import dask.array as da

    monkeypatch.setattr(ooc_svd.distributed, "MAX_SOURCE_BYTES", 100_000)
    A = da.from_array(np.ones((2000, 20)), chunks=(500, 20))
    with pytest.raises(InputError, match="to_zarr"):
        ooc_svd.svd(A, 3, client=cluster[1], scratch_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # the run's scratch directory is gone


def test_checkpoint_of_a_local_run_resumes_on_the_cluster(cluster, dense_store, block_rows,
                                                         monkeypatch, tmp_path):
    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    block_rows(BLOCK_ROWS, N)
    options = {"k": 5, "center": True, "method": "randomized"}
    reference = ooc_svd.svd(dense_store, **options)
    out = str(tmp_path / "result.zarr")
    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "tsqr_final_pass", die)
        with pytest.raises(Killed):
            ooc_svd.svd(dense_store, **options, out=out)
    result = ooc_svd.svd(dense_store, **options, out=out, resume=True, client=cluster[1])
    assert [r.name for r in result.records] == ["power0 (resumed)", "power1 (resumed)",
                                                "final pass"]
    assert_same_result(result, reference)


class TaskSizes(SchedulerPlugin):
    """A scheduler plugin: the largest result and task (its pickled arguments) of the run."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.largest_result = self.largest_task = 0
        self.keys = set()

    def transition(self, key, start, finish, *args, **kwargs):
        if not str(key).startswith("ooc-svd-"):
            return
        task = self.scheduler.tasks.get(key)
        if task is None:
            return
        self.keys.add(key)
        if finish == "memory":
            self.largest_result = max(self.largest_result, task.nbytes)
        elif finish == "processing" and task.run_spec is not None:
            self.largest_task = max(self.largest_task, len(pickle.dumps(task.run_spec)))


def test_inputs_and_outputs_are_named_as_the_workers_see_them(cluster, dense_store, tmp_path,
                                                              monkeypatch):
    """A relative input or output path reaches the workers as this process's absolute one;
    a store that the workers do not see (here a relative root, which they would resolve in
    their own working directory) is refused, where zarr would read zeros there."""
    reference = ooc_svd.svd(dense_store, 4)
    reached = []
    reach = ooc_svd.distributed.ClusterPasses._workers_reach
    monkeypatch.setattr(ooc_svd.distributed.ClusterPasses, "_workers_reach",
                        lambda self, path: reached.append(reach(self, path)) or reached[-1])
    monkeypatch.chdir(tmp_path)  # the workers stay where they started
    relative = os.path.relpath(dense_store)
    result = ooc_svd.svd(relative, 4, out="U.zarr", client=cluster[1])
    assert reached == [True]  # the workers wrote U's rows into the output themselves
    assert_same_result(result, reference)
    with pytest.raises(InputError, match="do not see the input .*relative to their working"):
        ooc_svd.svd(zarr.open_array(relative, mode="r"), 4, client=cluster[1])


def test_a_worker_that_sees_another_input_after_the_check_refuses_to_read_it(
    cluster, tmp_path, monkeypatch
):
    """The check before the first pass cannot see a worker that joins later: each worker's
    first read checks again. Here the store's files change right after the check, so every
    worker finds them other than the client did."""
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=(600, 8), chunks=(100, 8), dtype="f8")[:] = 1.0
    check = ooc_svd.distributed.ClusterPasses._check_inputs_reach

    def check_then_change(self, markers):
        check(self, markers)
        (tmp_path / "A.zarr" / "added").write_bytes(b"")

    monkeypatch.setattr(ooc_svd.distributed.ClusterPasses, "_check_inputs_reach",
                        check_then_change)
    with pytest.raises(InputError, match="a worker on .* does not see the input"):
        ooc_svd.svd(path, 2, client=cluster[1])


def test_a_worker_that_does_not_see_the_scratch_directory_refuses_to_spill(
    cluster, dense_store, monkeypatch
):
    """connect() checks the workers present; one that joins later checks before it spills
    (or reads a spill) instead of making a private copy of the directory. Here the marker
    by which workers see the directory is removed after the check, so none sees it."""
    shared = ooc_svd.distributed._shared_scratch

    def check_then_hide(client, scratch_dir):
        directory = shared(client, scratch_dir)
        os.remove(os.path.join(directory, ooc_svd.distributed.SCRATCH_MARKER))
        return directory

    monkeypatch.setattr(ooc_svd.distributed, "_shared_scratch", check_then_hide)
    with pytest.raises(InputError, match="scratch directory .* not shared by all workers "
                                         r"\(a worker on .* does not see it\)"):
        ooc_svd.svd(dense_store, 2, method="randomized", client=cluster[1])


def test_the_client_makes_no_spill_of_its_own_and_names_scratch_dir_absolutely(
    cluster, dense_store, monkeypatch, tmp_path
):
    """The workers spill; the client, which may not reach scratch_dir (a compute node's
    /scratch seen from a login node), made an unused spill there and failed where it could
    not. A relative scratch_dir is the client's, whatever the workers' directory."""
    methods = ("randomized", "exact")
    references = [ooc_svd.svd(dense_store, 3, method=method) for method in methods]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scratch").mkdir()

    def no_spill_here(*args, **kwargs):
        raise AssertionError("the client made a spill")

    monkeypatch.setattr(ooc_svd.engine, "QSpill", no_spill_here)
    for method, reference in zip(methods, references, strict=True):
        result = ooc_svd.svd(dense_store, 3, method=method, client=cluster[1],
                             scratch_dir="scratch", memory_limit="4MB")
        assert_same_result(result, reference)
    assert list((tmp_path / "scratch").iterdir()) == []


def test_the_client_removes_the_scratch_directory_when_no_worker_is_left(
    dense_store, monkeypatch, tmp_path
):
    """Every worker gone by the end of the run (killed, or retired by the cluster): the
    client removes the scratch directory where it sees it, and names it where it cannot."""
    import time

    close = ooc_svd.distributed.ClusterPasses.close
    for removable in (True, False):
        scratch = tmp_path / f"scratch-{removable}"
        scratch.mkdir()
        if not removable:
            monkeypatch.setattr(ooc_svd.distributed.shutil, "rmtree", lambda *a, **k: None)
        with local_cluster() as cluster, Client(cluster) as client:

            def close_after_the_workers_left(self, cluster=cluster):
                cluster.scale(0)
                while self.client.nthreads():
                    time.sleep(0.1)
                close(self)

            monkeypatch.setattr(ooc_svd.distributed.ClusterPasses, "close",
                                close_after_the_workers_left)
            if removable:
                ooc_svd.svd(dense_store, 2, client=client, scratch_dir=str(scratch))
                assert list(scratch.iterdir()) == []
            else:
                with pytest.warns(RuntimeWarning, match=f"the scratch directory '{scratch}/"
                                  "ooc-svd-cluster-.*' .* may be left: the cluster has no worker, "
                                  "and this process cannot reach it"):
                    ooc_svd.svd(dense_store, 2, client=client, scratch_dir=str(scratch))


def test_only_stores_given_by_url_have_their_rows_compared(dense_store, csr_store):
    """The first and last rows cost a chunk's decoding on the client and on each worker:
    only a store that local paths cannot check has them compared, and a dask array's
    graph is computed on the workers alone."""
    import dask.array as da

    from ooc_svd.sources import open_source
    from ooc_svd.sources.difference import subtract
    from ooc_svd.sources.paths import reads_remote_store

    url = f"memory://ooc-svd-test-{os.getpid()}/remote.zarr"
    zarr.create_array(url, shape=(M, N), chunks=(CHUNK_ROWS, N), dtype="f8")[:] = 1.0
    assert reads_remote_store(open_source(url))
    assert not reads_remote_store(open_source(dense_store))
    assert not reads_remote_store(open_source(csr_store))
    assert not reads_remote_store(open_source(da.from_zarr(url)))
    assert not reads_remote_store(subtract(open_source(dense_store), np.ones((M, 1)))[0])
    assert reads_remote_store(subtract(open_source(dense_store), zarr.open_array(url))[0])


def test_a_worker_that_reads_other_values_from_a_url_refuses_them(cluster):
    """A store given by URL is read where it lies: here an in-memory filesystem that the
    worker processes hold empty, whose chunks zarr would read as zeros."""
    A = np.random.default_rng(3).standard_normal((600, 8)) + 1.0
    url = f"memory://ooc-svd-test-{os.getpid()}/A.zarr"
    zarr.create_array(url, shape=A.shape, chunks=(100, 8), dtype="f8")[:] = A
    np.testing.assert_allclose(ooc_svd.svd(url, 2).S, np.linalg.svd(A, compute_uv=False)[:2])
    with pytest.raises(InputError, match="a worker on .* reads other values .* first or last "
                                         "row of the input 'memory://"):
        ooc_svd.svd(url, 2, client=cluster[1])


@pytest.mark.parametrize("method", ["randomized", "gram"])
def test_no_block_of_a_reaches_the_scheduler(cluster, tmp_path, block_rows, method):
    """Results and task arguments stay O(n l) (O(n^2) for gram): far below one block."""
    m, n, rows = 9600, 48, 600
    A = naive.matrix_with_spectrum(m, n, np.logspace(0, -4, n), seed=6)
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=A.shape, chunks=(300, n), dtype=A.dtype)[:] = A
    block_rows(rows, n)
    scheduler = cluster[0].scheduler
    sizes = TaskSizes(scheduler)
    scheduler.add_plugin(sizes, name="task-sizes")
    try:
        ooc_svd.svd(path, 5, method=method, out=str(tmp_path / "out.zarr"), client=cluster[1])
    finally:
        scheduler.remove_plugin(name="task-sizes")
    block_bytes = rows * n * 8
    assert any("-group-" in key for key in sizes.keys)
    assert 0 < sizes.largest_result < block_bytes / 8
    assert 0 < sizes.largest_task < block_bytes / 8


class KillAfterFirstGroup(SchedulerPlugin):
    """After the first group of the pass ``pass_name`` finishes, SIGKILL a worker."""

    def __init__(self, scheduler, pids, pass_name):
        self.scheduler, self.pids, self.pass_name = scheduler, pids, pass_name
        self.killed, self.removed = None, 0

    def transition(self, key, start, finish, *args, **kwargs):
        if self.killed or finish != "memory" or f"-{self.pass_name}-group-" not in str(key):
            return
        done = [w.address for w in self.scheduler.tasks[key].who_has]
        busy = [w.address for w in self.scheduler.workers.values() if w.processing]
        # Prefer a worker in the middle of another group; else the one holding a result.
        victim = ([w for w in busy if w not in done] or busy or done)[0]
        self.killed = victim
        os.kill(self.pids[victim], signal.SIGKILL)

    def remove_worker(self, scheduler, worker, **kwargs):
        self.removed += 1


@pytest.mark.parametrize("pass_name", ["power", "final"])
def test_a_worker_killed_mid_pass_is_replaced_and_the_result_is_unchanged(
    dense_store, block_rows, monkeypatch, pass_name
):
    """After the first group of a pass finishes, a worker busy with another group is killed
    (SIGKILL): its nanny restarts it, and dask recomputes what it held (in the final pass,
    rewriting the same Q spill files)."""
    block_rows(BLOCK_ROWS, N)
    monkeypatch.setattr(ooc_svd.distributed, "GROUPS_PER_THREAD", 6)  # 12 groups, 2 workers
    options = {"k": 5, "center": True, "method": "randomized"}
    reference = ooc_svd.svd(dense_store, **options)
    with local_cluster() as cluster, Client(cluster) as client:
        plugin = KillAfterFirstGroup(cluster.scheduler, client.run(os.getpid), pass_name)
        cluster.scheduler.add_plugin(plugin)
        result = ooc_svd.svd(dense_store, **options, client=client)
        assert plugin.killed is not None and plugin.removed >= 1
        client.wait_for_workers(2, timeout=60)  # the nanny brought it back
    assert_same_result(result, reference)


class GroupsPerPass(SchedulerPlugin):
    """The groups of each map of the run, by the map's number in their keys."""

    def __init__(self):
        self.groups = {}

    def transition(self, key, start, finish, *args, **kwargs):
        parts = str(key).split("-")  # ooc-svd-NAME-group-COUNT-INDEX-TOKEN
        if finish == "processing" and len(parts) == 7 and parts[3] == "group":
            self.groups.setdefault((int(parts[4]), parts[2]), set()).add(int(parts[5]))


def test_workers_that_join_a_run_take_a_share_of_its_next_passes(dense_store, block_rows,
                                                                  monkeypatch):
    """A cluster that grows after the first pass (an adaptive one, or batch jobs that start
    apart): the passes after it are cut into groups for the threads there then, and the
    result is the local run's. The U sweep keeps the final pass's groups."""
    block_rows(BLOCK_ROWS // 2, N)  # 24 blocks
    options = {"k": 5, "center": True, "method": "randomized", "niter": 2}
    reference = ooc_svd.svd(dense_store, **options)
    first_pass = ooc_svd.distributed.ClusterPasses.fused_power_pass
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:

        def grow_after_the_first_pass(self, context, X):
            result = first_pass(self, context, X)
            if len(client.nthreads()) == 1:
                cluster.scale(3)
                client.wait_for_workers(3, timeout=60)
            return result

        monkeypatch.setattr(ooc_svd.distributed.ClusterPasses, "fused_power_pass",
                            grow_after_the_first_pass)
        plugin = GroupsPerPass()
        cluster.scheduler.add_plugin(plugin)
        result = ooc_svd.svd(dense_store, **options, client=client)
    counts = [len(groups) for _, groups in sorted(plugin.groups.items())]
    names = [name for _, name in sorted(plugin.groups)]
    assert names == ["power", "power", "final", "U"] and counts == [4, 12, 12, 12]
    assert_same_result(result, reference)


def test_a_lost_worker_holding_scattered_rows_is_named(dense_store, block_rows, monkeypatch):
    """Rows scattered from memory are lost with their worker, and dask cannot recompute
    them: one line says so and what to do, where dask's error was 'lost dependencies'."""
    block_rows(BLOCK_ROWS, N)
    monkeypatch.setattr(ooc_svd.distributed, "GROUPS_PER_THREAD", 6)
    monkeypatch.setattr(ooc_svd.sources.dense, "in_memory_boundaries",
                        lambda shape, itemsize: np.arange(0, shape[0] + 1, CHUNK_ROWS))
    A = zarr.open_array(dense_store, mode="r")[:]
    with local_cluster() as cluster, Client(cluster) as client:
        plugin = KillSoleHolderOfScatteredRows(cluster.scheduler, client.run(os.getpid),
                                               "power")
        cluster.scheduler.add_plugin(plugin)
        with pytest.raises(InputError, match="a worker holding rows of the in-memory input "
                                             "was lost.*write the matrix to a store"):
            ooc_svd.svd(A, 5, method="randomized", client=client)
        assert plugin.killed is not None


class KillSoleHolderOfScatteredRows(KillAfterFirstGroup):
    """As the first group of the pass ``pass_name`` starts, SIGKILL a worker that alone
    holds rows scattered from the client (data without a task to make it). Not later: a
    group run away from its rows copies them, and by the end of a pass every group's rows
    may be held by both workers."""

    def transition(self, key, start, finish, *args, **kwargs):
        if self.killed or finish != "processing" or \
                f"-{self.pass_name}-group-" not in str(key):
            return
        scattered = [task for task in self.scheduler.tasks.values() if task.run_spec is None]
        sole_holders = [task.who_has for task in scattered if len(task.who_has) == 1]
        assert sole_holders, "every scattered piece is held by two workers"
        self.killed = next(iter(sole_holders[0])).address
        os.kill(self.pids[self.killed], signal.SIGKILL)


def test_a_lost_worker_holding_scattered_rows_of_u_is_recomputed(dense_store, block_rows,
                                                                 monkeypatch):
    """The spectral estimate's pass reads U's rows, scattered from the client when no store
    of U reaches the workers: a worker lost with some of them runs the pass again, with
    rows scattered afresh, where dask's error was 'already forgotten'."""
    block_rows(BLOCK_ROWS, N)
    monkeypatch.setattr(ooc_svd.distributed, "GROUPS_PER_THREAD", 6)
    options = {"k": 4, "method": "randomized", "spectral_iters": 1}
    reference = ooc_svd.svd(dense_store, **options)
    with local_cluster() as cluster, Client(cluster) as client:
        plugin = KillAfterFirstGroup(cluster.scheduler, client.run(os.getpid), "residual")
        cluster.scheduler.add_plugin(plugin)
        result = ooc_svd.svd(dense_store, **options, client=client)
        assert plugin.killed is not None
    assert_same_result(result, reference)
    assert result.spectral_error == pytest.approx(reference.spectral_error, rel=1e-10)


def test_a_task_whose_workers_die_running_it_is_named_in_one_line(dense_store, block_rows):
    """dask's KilledWorker (a task lost with as many workers as it may, most often out of
    memory) ends the run with one line that says what to change."""
    block_rows(BLOCK_ROWS, N)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            local_cluster() as cluster, Client(cluster) as client:
        plugin = KillAfterFirstGroup(cluster.scheduler, client.run(os.getpid), "power")
        cluster.scheduler.add_plugin(plugin)
        with pytest.raises(ClusterError, match="on 1 different workers.* Most often a worker "
                                               "ran out of memory"):
            ooc_svd.svd(dense_store, 4, method="randomized", client=client)


class AfterFirstGroup(SchedulerPlugin):
    """After the first group of a power pass finishes, do ``to_each`` to every worker
    (in-process)."""

    def __init__(self, cluster, to_each):
        self.cluster, self.to_each, self.done = cluster, to_each, False

    def transition(self, key, start, finish, *args, **kwargs):
        if not self.done and finish == "memory" and "-power-group-" in str(key):
            self.done = True
            for worker in list(self.cluster.workers.values()):
                self.to_each(worker)


def close(worker):
    import asyncio

    asyncio.ensure_future(worker.close())


def pause(worker):
    """What a worker's memory monitor does above distributed.worker.memory.pause."""
    from distributed.core import Status

    worker.status = Status.paused


def test_a_run_whose_last_worker_left_ends_after_the_worker_timeout(dense_store, block_rows,
                                                                      monkeypatch):
    """dask waits without end for a worker to run what the last one left: the run counts
    the workers while it waits, and ends when there has been none for
    ooc-svd.worker-timeout."""
    block_rows(BLOCK_ROWS, N)
    monkeypatch.setattr(ooc_svd.distributed, "WORKER_CHECK_SECONDS", 0.2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client, \
            dask.config.set({"ooc-svd.worker-timeout": "1s"}):
        plugin = AfterFirstGroup(cluster, close)
        cluster.scheduler.add_plugin(plugin)
        began = time.monotonic()
        with pytest.raises(ClusterError, match="the cluster has had no worker for 1 s"):
            ooc_svd.svd(dense_store, 3, method="randomized", client=client)
        assert plugin.done and time.monotonic() - began < 30


def test_a_run_whose_workers_all_stay_paused_ends_after_the_worker_timeout(
        dense_store, block_rows, monkeypatch):
    """A worker paused for memory starts no task until it resumes, and dask waits for that
    without end: a run whose workers have all been paused, running nothing, for
    ooc-svd.worker-timeout ends. (No memory limit here: the monitor would resume them.)"""
    block_rows(BLOCK_ROWS, N)
    monkeypatch.setattr(ooc_svd.distributed, "WORKER_CHECK_SECONDS", 0.2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, memory_limit=0,
                      dashboard_address=":0") as cluster, Client(cluster) as client, \
            dask.config.set({"ooc-svd.worker-timeout": "1s"}):
        plugin = AfterFirstGroup(cluster, pause)
        cluster.scheduler.add_plugin(plugin)
        began = time.monotonic()
        with pytest.raises(ClusterError, match="the cluster has had every worker paused for "
                                               "memory and running no task for 1 s"):
            ooc_svd.svd(dense_store, 3, method="randomized", client=client)
        assert plugin.done and time.monotonic() - began < 30


@pytest.mark.parametrize("workers, stall", [
    ({}, "no worker"),
    ({"a": {"status": "running", "metrics": {"task_counts": {}}}}, None),
    ({"a": {"status": "paused", "metrics": {"task_counts": {}}},
      "b": {"status": "paused", "metrics": {"task_counts": {"memory": 3}}}},
     "every worker paused for memory and running no task"),
    ({"a": {"status": "paused", "metrics": {"task_counts": {"executing": 1}}},
      "b": {"status": "paused", "metrics": {"task_counts": {}}}}, None),
    ({"a": {"status": "paused", "metrics": {"task_counts": {}}},
      "b": {"status": "running", "metrics": {"task_counts": {}}}}, None),
])
def test_a_cluster_stalls_only_where_no_worker_can_run_a_task(workers, stall):
    """A paused worker that still runs a task frees its memory when it ends, and may
    resume: only a cluster where no worker runs or can start a task has stalled."""
    assert ooc_svd.distributed._stall(workers) == stall


def test_workers_without_the_package_are_named(cluster, monkeypatch):
    """Each task of a worker without ooc_svd would fail to unpickle, with dask's traceback.
    The workers here have it; one whose search finds nothing stands for one without."""
    client = cluster[1]
    ooc_svd.distributed._check_worker_package(client)  # found on every worker
    monkeypatch.setattr(ooc_svd.distributed, "_IMPORTABLE",
                        "__import__('importlib.util').util.find_spec('ooc_svd_absent') "
                        "is not None")
    with pytest.raises(InputError, match=r"the workers \['tcp://.*', 'tcp://.*'\] cannot "
                                         "import ooc_svd"):
        ooc_svd.distributed._check_worker_package(client)


@pytest.mark.parametrize(("reason", "said"), [
    ("scheduler-connection-lost", "the connection to the dask scheduler was lost"),
    ("scheduler-restart", "the dask scheduler was restarted during the run"),
])
@pytest.mark.parametrize("wait", ["reduced", "rows", "result"])
def test_a_lost_scheduler_is_named_whatever_the_run_waits_on(cluster, wait, reason, said):
    """A future cancelled for a lost or restarted scheduler (as the client cancels them all
    then) ends the run with one line, whether it is a pass's leaf, a group of U's rows
    (whose as_completed hands the cancellation over as a result) or a single task."""
    from ooc_svd.distributed import ClusterPasses, _add_partials

    client = cluster[1]
    passes = ClusterPasses.__new__(ClusterPasses)  # what waiting needs: the client
    passes.client, passes.backends, passes.scattered = client, set(), True
    passes.total_bytes, passes.group_bytes, passes.count = 1, [1], 0
    passes.token = "test"
    future = client.submit(time.sleep, 30, pure=False)
    future.cancel(reason=reason)
    context = type("Context", (), {"progress": lambda self, name, total: disabled_bar()})()
    with pytest.raises(ClusterError, match=said):
        if wait == "reduced":  # the in-memory input's own message must not take it
            passes._reduced(context, "power", [future], _add_partials)
        elif wait == "rows":
            passes._store_returned_rows([future], lambda start, rows: None)
        else:
            passes._result(future)


def disabled_bar():
    from ooc_svd.progress import progress_bars

    return progress_bars(False)("pass", 1)


def test_a_client_closed_during_the_run_is_named(dense_store, block_rows):
    """Closing the client cancels the run's tasks for no reason dask names: the run says
    what happened, in one line."""
    block_rows(BLOCK_ROWS, N)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster:
        client = Client(cluster)
        plugin = AfterFirstGroup(cluster, lambda worker: threading.Thread(
            target=client.close).start())
        cluster.scheduler.add_plugin(plugin)
        with pytest.raises(ClusterError, match="the run's dask client was closed during the "
                                               "run"):
            ooc_svd.svd(dense_store, 3, method="randomized", client=client)
        assert plugin.done


def test_workers_paused_before_the_run_are_named(dense_store, monkeypatch):
    """dask waits for a running worker, and counts paused ones out: a cluster whose
    workers are all paused for memory is not said to have none."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, memory_limit=0,
                      dashboard_address=":0") as cluster, Client(cluster) as client, \
            dask.config.set({"ooc-svd.worker-timeout": "1s"}):
        for worker in cluster.workers.values():
            pause(worker)
        with pytest.raises(ClusterError, match="every worker of the cluster has been paused "
                                               "for memory for 1 s: a worker pauses above"):
            ooc_svd.svd(dense_store, 3, method="randomized", client=client)


def test_parallel_kernels_take_turns_on_workqueue(csr_store, small_units, monkeypatch):
    """numba's workqueue threading layer (where neither OpenMP nor TBB is found) aborts a
    process whose threads run parallel kernels at once, as the tasks of a worker with two
    threads did: there they take turns, and the result is the local run's."""
    reference = ooc_svd.svd(csr_store, 5, method="randomized", seed=4, center=True)
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "workqueue")  # for the worker processes
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        assert set(client.run(ooc_svd.distributed.threading_layer).values()) == {"workqueue"}
        result = ooc_svd.svd(csr_store, 5, method="randomized", seed=4, center=True,
                             client=client)
    assert len(result.plan.blocks) > 4
    assert_same_result(result, reference)


def test_a_command_interrupted_while_it_connects_exits_at_once(dense_store, tmp_path):
    """A Client whose connection SIGTERM (or Ctrl-C) cut short closed itself in its
    finalizer for dask's minute, then printed a traceback."""
    import socket

    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{unused.getsockname()[1]}"
    script = os.path.join(os.path.dirname(sys.executable), "ooc-svd")
    command = subprocess.Popen([script, "run", dense_store, "--k", "3", "--out",
                                str(tmp_path / "out.zarr"), "--scheduler", address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # the imports, then the attempts to connect
    command.send_signal(signal.SIGTERM)
    began = time.monotonic()
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 143 and "terminated (SIGTERM)" in stderr
    assert time.monotonic() - began < 20 and "Traceback" not in stderr


def test_workers_too_small_for_a_task_on_each_thread_are_warned_of():
    """memory_limit is each task's, and a worker runs one per thread: a worker whose own
    limit is less would be killed by its nanny, which a warning says before the run."""
    from ooc_svd.distributed import _warn_of_small_workers

    workers = {"tcp://a:1": {"memory_limit": 300 * 10**6, "nthreads": 2},
               "tcp://b:1": {"memory_limit": 4 * 10**9, "nthreads": 2},
               "tcp://c:1": {"memory_limit": 0, "nthreads": 8}}  # 0: no limit
    with pytest.warns(RuntimeWarning, match=r"1 of the cluster's workers \(as tcp://a:1: a "
                                            r"memory limit of 300 MB for 2 threads\) cannot "
                                            r"hold a task of this run on each thread, 200 MB"):
        _warn_of_small_workers(workers, 200 * 10**6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_of_small_workers(workers, 150 * 10**6)


def test_a_closed_client_is_named():
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        client = Client(cluster)
        client.close()
        with pytest.raises(InputError, match="the dask client is closed"):
            ooc_svd.svd(np.ones((20, 4)), 2, client=client)


def test_an_unshared_scratch_directory_is_removed_by_a_worker_that_sees_it(tmp_path):
    """The refused run's directory is removed where it was made (a worker that does not
    see it could not), and by the client where it sees it."""
    from concurrent.futures import Future

    class Client:
        def __init__(self):
            self.removed_on = []

        def submit(self, function, *args, workers=None, **options):
            self.removed_on += workers or []
            future = Future()
            future.set_result(function(*args))
            return future

        def run(self, function, *args):
            return {"tcp://a:1": True, "tcp://b:2": False}

    client = Client()
    with pytest.raises(InputError, match=r"\['tcp://b:2'\] do not see the one that "
                                         r"\['tcp://a:1'\] see\)"):
        ooc_svd.distributed._shared_scratch(client, str(tmp_path))
    assert client.removed_on == ["tcp://a:1"] and list(tmp_path.iterdir()) == []


def slow_rows(block):
    """A dask block that takes a second to read."""
    time.sleep(1)
    return block


class FinishedGroups(SchedulerPlugin):
    """Counts the groups of passes that ran to the end."""

    def __init__(self):
        self.finished = 0

    def transition(self, key, start, finish, *args, **kwargs):
        self.finished += "-group-" in str(key) and finish == "memory"


def test_an_interrupted_pass_leaves_none_of_its_groups_to_run(block_rows, monkeypatch):
    """Ctrl-C (or SIGTERM) in the first pass: the groups not started are let go, not run
    for a run that has ended (the interrupt waited for all of them, behind which the
    scratch cleanup was queued, and they read A on a cluster that may serve others)."""
    import _thread
    import threading

    import dask.array as da

    block_rows(BLOCK_ROWS, N)
    monkeypatch.setattr(ooc_svd.distributed, "GROUPS_PER_THREAD", 6)  # 12 groups, 2 threads
    A = da.from_array(np.ones((M, N)), chunks=(BLOCK_ROWS, N)).map_blocks(slow_rows)
    with local_cluster() as cluster, Client(cluster) as client:
        plugin = FinishedGroups()
        cluster.scheduler.add_plugin(plugin)
        threading.Timer(1.5, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            ooc_svd.svd(A, 3, method="randomized", client=client)
        time.sleep(3)  # the groups running at the interrupt finish; no other starts
        # 2 at a time, 1 s each: at most 2 done at the interrupt and the 2 running then,
        # where the others ran on (8 or more done by now).
        assert plugin.finished <= 4


def test_cli_runs_on_a_local_cluster(dense_store, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "ooc-svd")
    out = str(tmp_path / "result.zarr")
    done = subprocess.run(
        [script, "run", dense_store, "--k", "4", "--out", out, "--scheduler", "local:2",
         "--json", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    reference = ooc_svd.svd(dense_store, 4)
    np.testing.assert_allclose(summary["S"], reference.S, rtol=1e-11, atol=1e-12 * reference.S[0])
    np.testing.assert_allclose(zarr.open_group(out, mode="r")["U"][:], reference.U, atol=1e-10)
    # Bad input found by a worker: the one-line error, without the worker's log of it
    bad = zarr.create_array(str(tmp_path / "nan.zarr"), shape=(400, 10), chunks=(100, 10),
                            dtype="f8")
    bad[:] = np.ones((400, 10))
    bad[250, 3] = np.nan
    done = subprocess.run(
        [script, "run", str(tmp_path / "nan.zarr"), "--k", "2", "--out", str(tmp_path / "r"),
         "--scheduler", "local:2"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and "first at row 250" in done.stderr
    assert "Traceback" not in done.stderr and "Compute Failed" not in done.stderr, done.stderr


