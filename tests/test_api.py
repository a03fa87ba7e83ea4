"""The public API: inputs, torch semantics, output stores, and errors that name the problem."""

import hashlib
import os
import subprocess
import sys
import zipfile

import naive
import numpy as np
import pytest
import scipy.sparse
import zarr

import ooc_svd
import ooc_svd.verify
from ooc_svd import (
    InputError,
    NonFiniteError,
    OutputExistsError,
    PlanError,
    ReadError,
    StoreNotFoundError,
)


@pytest.fixture
def matrix():
    return naive.matrix_with_spectrum(400, 30, np.logspace(0, -4, 30), seed=3)


def tree_digest(path):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(full.encode())
            with open(full, "rb") as file:
                digest.update(file.read())
            digest.update(str(os.stat(full).st_mtime_ns).encode())
    return digest.hexdigest()


# ---- inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "numpy",
        "npy_path",  # np.load(mmap_mode="r") inside
        "npz_path",  # np.savez: its member mapped
        "npz_compressed_path",  # np.savez_compressed: loaded whole
        "memmap",
        "zarr_v3_path",
        "zarr_v2_path",
        "zarr_file_url",  # fsspec URL
        "zarr_array",
        "dask_row_chunks",
        "dask_2d_chunks",  # blocks span several column chunks
    ],
)
def test_every_input_kind_gives_the_same_result(tmp_path, zarr_matrix, block_rows, matrix, kind):
    import dask.array as da
    import zarr

    block_rows(64, 30)
    if kind == "numpy":
        A = matrix
    elif kind in ("npy_path", "memmap"):
        np.save(tmp_path / "A.npy", matrix)
        A = str(tmp_path / "A.npy")
        if kind == "memmap":
            A = np.load(A, mmap_mode="r")
    elif kind.startswith("npz"):
        A = str(tmp_path / "A.npz")
        (np.savez if kind == "npz_path" else np.savez_compressed)(A, A=matrix)
    elif kind.startswith("zarr"):
        path = zarr_matrix(matrix, chunk_rows=50, zarr_format=2 if kind == "zarr_v2_path" else 3)
        A = {"zarr_file_url": "file://" + path, "zarr_array": zarr.open_array(path, mode="r")}.get(
            kind, path
        )
    else:
        A = da.from_array(matrix, chunks=(45, 30) if kind == "dask_row_chunks" else (45, 7))
    result = ooc_svd.svd(A, 5, method="randomized", seed=3)
    block_rows(400, 30)
    reference = ooc_svd.svd(matrix, 5, method="randomized", seed=3)
    assert len(reference.plan.blocks) == 1
    # Stores and dask arrays are read in blocks of whole chunks; arrays in memory in 1 MB
    # nominal chunks, which this 96 KB matrix fits in.
    in_memory = kind in ("numpy", "npy_path", "npz_path", "npz_compressed_path", "memmap")
    assert (len(result.plan.blocks) == 1) == in_memory
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)
    np.testing.assert_allclose(result.V, reference.V, atol=1e-10)
    np.testing.assert_allclose(result.U, reference.U, atol=1e-10)


@pytest.mark.parametrize("save", [np.save, np.savez])
def test_an_npy_or_npz_file_is_read_by_rows_not_through_its_mapping(tmp_path, save):
    """Rows read through the mapping stay mapped, and the process's RSS grew to the whole
    file; read from the file, they are in a new array, equal to the rows."""
    from ooc_svd.sources import open_dense_source

    A = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)
    path = str(tmp_path / ("A.npy" if save is np.save else "A.npz"))
    save(path, A) if save is np.save else save(path, member=A)
    source = open_dense_source(path)
    assert isinstance(source.array, np.memmap) and source.kind == path[-3:]
    rows = source.read(2, 6)
    assert not np.shares_memory(rows, source.array)
    np.testing.assert_array_equal(rows, A[2:6])
    assert rows.dtype == np.float32 and rows.flags.c_contiguous


def test_a_memmap_the_caller_passes_is_read_as_it_is_in_memory(tmp_path):
    """Its file may hold other values than the mapping (copy-on-write, edited), or be gone:
    only files ooc_svd opens itself are read from the file."""
    A = np.random.default_rng(0).standard_normal((300, 20)) + 100.0
    np.save(tmp_path / "A.npy", A)
    edited = np.load(tmp_path / "A.npy", mmap_mode="c")
    edited -= edited.mean(axis=0)  # in memory only
    centered = A - A.mean(axis=0)
    np.testing.assert_allclose(ooc_svd.svd(edited, 3, method="exact").S,
                               np.linalg.svd(centered, compute_uv=False)[:3], rtol=1e-10)
    mapped = np.load(tmp_path / "A.npy", mmap_mode="r")
    os.remove(tmp_path / "A.npy")  # the mapping still reads it
    np.testing.assert_allclose(ooc_svd.svd(mapped, 3, method="exact").S,
                               np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-10)


def test_an_npz_member_named_without_npy_is_read(tmp_path):
    """numpy reads a member 'a' as the array 'a', as it does 'a.npy'."""
    import io
    import zipfile

    from ooc_svd.sources import open_dense_source

    A = np.arange(12.0).reshape(4, 3)
    member = io.BytesIO()
    np.save(member, A)
    path = str(tmp_path / "A.npz")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a", member.getvalue())
    source = open_dense_source(path)
    assert source.reads_file
    np.testing.assert_array_equal(source.read(1, 4), A[1:4])


def test_a_file_loaded_whole_counts_in_the_plan(tmp_path, monkeypatch):
    """A compressed .npz (or a scipy.sparse one) is loaded whole: the plan counts it
    beside the working set, and refuses where it does not fit, saying how it would be
    read by blocks; an uncompressed one is read by blocks and is not counted. Where its
    arrays alone exceed the limit, it is refused before it is loaded."""
    A = np.random.default_rng(0).standard_normal((20000, 50))  # 8 MB
    np.savez_compressed(tmp_path / "c.npz", A=A)
    np.savez(tmp_path / "u.npz", A=A)
    compressed = ooc_svd.svd_plan(str(tmp_path / "c.npz"), 5, method="randomized")
    uncompressed = ooc_svd.svd_plan(str(tmp_path / "u.npz"), 5, method="randomized")
    assert compressed.loaded_bytes == A.nbytes and uncompressed.loaded_bytes == 0
    assert compressed.predicted_peak_bytes >= uncompressed.predicted_peak_bytes + A.nbytes
    assert "(the input, loaded whole, 8 MB of it)" in compressed.describe()
    with pytest.raises(PlanError, match=r"the input, loaded whole \(8 MB\)\) .* save the "
                                        r"array uncompressed \(np.save, or np.savez\)"):
        ooc_svd.svd_plan(str(tmp_path / "c.npz"), 5, method="randomized", memory_limit="9MB")
    ooc_svd.svd_plan(str(tmp_path / "u.npz"), 5, method="randomized", memory_limit="7MB")
    sparse = scipy.sparse.random(20000, 50, density=0.5, format="csr", random_state=0)
    scipy.sparse.save_npz(tmp_path / "s.npz", sparse)
    plan = ooc_svd.svd_plan(str(tmp_path / "s.npz"), 5, method="randomized")
    sparse_bytes = sum(part.nbytes for part in (sparse.data, sparse.indices, sparse.indptr))
    assert plan.loaded_bytes == sparse_bytes  # 6.1 MB
    with pytest.raises(PlanError, match=r"the input, loaded whole .* convert the .npz to a "
                                        r"CSR store"):
        ooc_svd.svd_plan(str(tmp_path / "s.npz"), 5, method="randomized", memory_limit="7MB")

    # The same array, its .npy header of version 3.0 (utf-8), which numpy writes for field
    # names outside latin-1
    with zipfile.ZipFile(tmp_path / "v3.npz", "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open("A.npy", "w") as member:
        np.lib.format.write_array(member, A, version=(3, 0))

    def not_loaded(*args):
        raise AssertionError("loaded")

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", not_loaded)
    monkeypatch.setattr(scipy.sparse, "load_npz", not_loaded)
    for path, limit, way_out in [("c.npz", "7MB", "save the array uncompressed"),
                                 ("v3.npz", "7MB", "save the array uncompressed"),
                                 ("s.npz", "6MB", "convert the .npz to a CSR store")]:
        for call in (ooc_svd.svd_plan, ooc_svd.svd):
            with pytest.raises(PlanError, match=rf"{path}' is a .* loaded whole, and its "
                                                rf"arrays alone take [678](\.[0-9]+)? MB, more "
                                                rf"than memory_limit {limit[0]} MB: {way_out}"):
                call(str(tmp_path / path), 5, method="randomized", memory_limit=limit)


def test_a_dense_npz_numpy_cannot_read_is_refused_naming_it(tmp_path):
    """An object array, a damaged member, an encrypted one, data shorter than its header
    says: an InputError naming the file and numpy's reason, not a traceback."""
    import io
    import zipfile

    np.savez_compressed(tmp_path / "object.npz", A=np.array([[1, "x"], [2, "y"]], dtype=object))
    np.savez_compressed(tmp_path / "good.npz", A=np.arange(6000.0).reshape(300, 20))
    damaged = bytearray((tmp_path / "good.npz").read_bytes())
    damaged[60:120] = bytes(60)  # the member's first compressed bytes: its header
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    locked = bytearray((tmp_path / "good.npz").read_bytes())
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        locked[locked.find(signature) + flags] |= 1
    (tmp_path / "locked.npz").write_bytes(bytes(locked))
    saved = io.BytesIO()
    np.save(saved, np.zeros((300, 20)))
    with zipfile.ZipFile(tmp_path / "short.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("A.npy", saved.getvalue()[:3000])
    for name, reason in [("object", "Object arrays cannot be loaded"), ("damaged", ""),
                         ("locked", "encrypted"), ("short", "EOF")]:
        with pytest.raises(InputError, match=rf"cannot read the array 'A' of '.*{name}.npz': "
                                             rf".*{reason}"):
            ooc_svd.svd(str(tmp_path / f"{name}.npz"), 3)


def test_integer_input(matrix):
    A = np.round(matrix * 1000).astype(np.int32)
    result = ooc_svd.svd(A, 4, method="exact")
    np.testing.assert_allclose(result.S, naive.truncated_svd(A, 4)[1], rtol=1e-12)
    assert result.U.dtype == np.float64


@pytest.mark.parametrize(("stored", "result_dtype", "rtol"), [
    (">f8", np.float64, 1e-12),  # big-endian, as zarr v2 stores and .npy files may hold
    (">i4", np.float64, 1e-12),
    (np.float16, np.float32, 1e-5),  # read as float32
    (np.longdouble, np.float64, 1e-12),  # read as float64
])
def test_dtypes_numba_lacks_are_read_as_ones_it_has(tmp_path, matrix, stored, result_dtype,
                                                     rtol):
    import zarr

    A = np.asarray(np.round(matrix * 1000), dtype=stored)
    exact = naive.truncated_svd(A.astype(np.float64), 4)[1]
    inputs = [A]
    if np.dtype(stored).itemsize <= 8:  # zarr has no longdouble
        store = zarr.create_array(str(tmp_path / "A.zarr"), shape=A.shape, chunks=(64, 30),
                                  dtype=A.dtype, zarr_format=2)
        store[:] = A
        inputs.append(str(tmp_path / "A.zarr"))
    for source in inputs:
        result = ooc_svd.svd(source, 4, method="exact")
        assert result.U.dtype == result_dtype
        np.testing.assert_allclose(result.S, exact, rtol=rtol)


def test_input_store_is_not_modified(zarr_matrix, matrix):
    path = zarr_matrix(matrix)
    before = tree_digest(path)
    ooc_svd.svd(path, 3, center=True)
    assert tree_digest(path) == before


# ---- torch semantics ---------------------------------------------------------------------


def test_svd_lowrank_defaults_and_mean(matrix):
    U, S, V = ooc_svd.svd_lowrank(matrix)
    assert U.shape == (400, 6) and S.shape == (6,) and V.shape == (30, 6)
    np.testing.assert_allclose(S, naive.truncated_svd(matrix, 6)[1], rtol=1e-6)

    M = matrix.mean(axis=0, keepdims=True) + 0.5  # any row mean, as torch's M
    U, S, V = ooc_svd.svd_lowrank(matrix, q=4, niter=3, M=M)
    _, S_exact, V_exact = naive.truncated_svd(matrix - M, 4)
    np.testing.assert_allclose(S, S_exact, rtol=1e-6)
    assert naive.subspace_distance(V, V_exact) < 1e-4
    np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-10)


def test_svd_lowrank_runs_the_method_asked_for(matrix):
    """'randomized' is torch's algorithm, q columns and no oversampling, niter iterations:
    the same triplets as svd's with those settings, and as far from the exact ones."""
    U, S, V = ooc_svd.svd_lowrank(matrix, q=4, niter=1, method="randomized")
    same = ooc_svd.svd(matrix, 4, oversample=0, niter=1, method="randomized")
    assert_same_factors((U, S, V), (same.U, same.S, same.V))
    exact = ooc_svd.svd_lowrank(matrix, q=4, method="exact")
    assert_same_factors(exact, naive.truncated_svd(matrix, 4))
    assert np.abs(S - exact[1]).max() > 1e-6 * S[0]  # one iteration, no oversampling


def stack_of_matrices(shape=(2, 3), m=60, n=12):
    """Matrices of different spectra, stacked: shape + (m, n)."""
    matrices = [naive.matrix_with_spectrum(m, n, np.logspace(0, -1 - i, n), seed=i)
                for i in range(int(np.prod(shape)))]
    return np.stack(matrices).reshape(shape + (m, n))


def assert_same_factors(got, want):
    """Two factorizations of one matrix agree (their products, and S)."""
    (U, S, V), (U_want, S_want, V_want) = got, want
    np.testing.assert_allclose(S, S_want, rtol=1e-12, atol=0)
    np.testing.assert_allclose((U * S) @ V.T, (U_want * S_want) @ V_want.T, atol=1e-12)


@pytest.mark.parametrize("M_shape", [None, (12,), (3, 1, 12), (2, 1, 60, 1), (2, 3, 60, 12)])
def test_svd_lowrank_takes_a_stack_of_matrices_as_torch(M_shape):
    """A (*, m, n) is factored matrix by matrix, M broadcast to A's shape as torch does."""
    A = stack_of_matrices()
    M = None if M_shape is None else np.random.default_rng(5).standard_normal(M_shape)
    U, S, V = ooc_svd.svd_lowrank(A, q=4, niter=3, M=M)
    assert U.shape == (2, 3, 60, 4) and S.shape == (2, 3, 4) and V.shape == (2, 3, 12, 4)
    broadcast = np.zeros(A.shape) if M is None else np.broadcast_to(M, A.shape)
    for index in np.ndindex(2, 3):
        one = ooc_svd.svd_lowrank(A[index], q=4, niter=3, M=broadcast[index])
        assert_same_factors((U[index], S[index], V[index]), one)
        np.testing.assert_allclose(S[index], naive.truncated_svd(A[index] - broadcast[index],
                                                                 4)[1], rtol=1e-8)


def test_pca_lowrank_centers_each_matrix_of_a_stack_by_its_own_mean():
    import dask.array as da

    A = stack_of_matrices() + np.arange(6.0).reshape(2, 3, 1, 1)  # a mean per matrix
    U, S, V = ooc_svd.pca_lowrank(A, q=3)
    assert U.shape == (2, 3, 60, 3) and S.shape == (2, 3, 3) and V.shape == (2, 3, 12, 3)
    for index in np.ndindex(2, 3):
        assert_same_factors((U[index], S[index], V[index]), ooc_svd.pca_lowrank(A[index], q=3))
        centered = A[index] - A[index].mean(axis=0)
        np.testing.assert_allclose(S[index], naive.truncated_svd(centered, 3)[1], rtol=1e-8)
    lazy = ooc_svd.pca_lowrank(da.from_array(A, chunks=(1, 2, 25, 12)), q=3)
    for got, want in zip(lazy, (U, S, V), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_a_torch_stack_gives_torch_tensors(torch_stand_in):
    A = stack_of_matrices((3,))
    tensor = TensorStandIn(A, requires_grad=False, dtype="torch.float64")
    tensor.device = "cuda:0"
    U, S, V = ooc_svd.svd_lowrank(tensor, q=2)
    assert U.device == "cuda:0" and U.array.shape == (3, 60, 2) and V.array.shape == (3, 12, 2)
    np.testing.assert_allclose(S.array, ooc_svd.svd_lowrank(A, q=2)[1], rtol=1e-12)


@pytest.mark.parametrize(
    ("A_shape", "M_shape", "message"),
    [((2, 3, 60, 12), (4, 1, 12), r"M of shape \(4, 1, 12\) does not broadcast"),
     ((3, 60, 12), (2, 3, 60, 12), r"M of shape \(2, 3, 60, 12\) does not broadcast"),
     ((3, 60, 12), (3, 60, 5),
      r"^A\[0\] of the stack: M of shape \(60, 5\) does not broadcast to A's shape"),
     ((0, 60, 12), (2, 1, 12), r"M of shape \(2, 1, 12\) does not broadcast")],
)
def test_a_stack_refuses_an_m_that_does_not_broadcast(A_shape, M_shape, message):
    M = None if M_shape is None else np.zeros(M_shape)
    with pytest.raises(InputError, match=message):
        ooc_svd.svd_lowrank(np.ones(A_shape), q=2, M=M)


@pytest.mark.parametrize("function", ["svd_lowrank", "pca_lowrank"])
def test_a_stack_of_no_matrix_gives_empty_factors_as_torch(function):
    """torch gives U (0, m, q), S (0, q), V (0, n, q), as for the stack's matrices."""
    import dask.array as da

    factor = getattr(ooc_svd, function)
    for A in (np.zeros((0, 60, 12), np.float32), da.zeros((2, 0, 60, 12)),
              da.zeros((0, 60, 12), chunks=2)):  # one that dask cannot reshape
        U, S, V = factor(A, q=3)
        stack = A.shape[:-2]
        assert (U.shape, S.shape, V.shape) == (stack + (60, 3), stack + (3,), stack + (12, 3))
        assert U.dtype == S.dtype == V.dtype == A.dtype
    assert factor(np.zeros((0, 60, 12)))[1].shape == (0, 6)
    if function == "pca_lowrank":  # as for any of its matrices
        with pytest.raises(InputError, match=r"q=13 must be at most min\(m, n\) = 12"):
            factor(np.zeros((0, 60, 12)), q=13)
    else:
        assert factor(np.zeros((0, 60, 12)), q=13)[1].shape == (0, 12)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_wide_a_factored_through_its_transpose_is_spoken_of_as_a(sparse):
    """A^T's rows are A's columns: a NaN is named by its row of A, and other refusals say
    they are of A^T."""
    B = np.random.default_rng(0).standard_normal((10, 30))
    B[7, 25] = np.nan
    A = scipy.sparse.csr_matrix(B) if sparse else B
    calls = [lambda: ooc_svd.svd_lowrank(A), lambda: ooc_svd.svd_lowrank(A, M=np.ones(30)),
             lambda: ooc_svd.pca_lowrank(A, center=False)]
    if not sparse:  # (a sparse wide A is centered without its transpose)
        calls.append(lambda: ooc_svd.pca_lowrank(A))  # whose column means hold the NaN
    for call in calls:
        with pytest.raises(NonFiniteError, match=r"^the matrix holds NaN or Inf, first at row "
                                                 r"7$"):
            call()
    with pytest.raises(PlanError, match=r"on a 300 x 20 matrix.*\(of A\^T: a wide A held in "
                                        "memory is factored through its transpose"):
        ooc_svd.svd_lowrank(np.zeros((20, 300)), memory_limit="10KB")


def test_an_error_in_a_stack_names_the_matrix():
    import dask.array as da

    A = np.ones((3, 60, 12))
    A[2, 5, 3] = np.inf
    with pytest.raises(NonFiniteError, match=r"^A\[2\] of the stack: the matrix holds NaN or "
                                             "Inf, first at row 5$"):
        ooc_svd.svd_lowrank(A, q=2)
    unknown = da.from_array(A, chunks=(1, 60, 12))
    unknown = unknown[unknown[:, 0, 0] > 0]
    with pytest.raises(InputError, match="unknown chunk sizes; call compute_chunk_sizes"):
        ooc_svd.svd_lowrank(unknown, q=2)


def test_svd_takes_one_matrix_and_says_where_stacks_are_taken(tmp_path):
    import zarr

    stack = zarr.create_array(str(tmp_path / "stack.zarr"), shape=(2, 60, 12), dtype="f8")
    for A in (np.ones((2, 60, 12)), stack):
        with pytest.raises(InputError, match=r"a matrix needs 2 \(svd_lowrank and pca_lowrank"):
            ooc_svd.svd(A, k=2)
    with pytest.raises(InputError, match="dask.array.from_zarr"):
        ooc_svd.svd_lowrank(stack, q=2)


def full_mean(kind, M, tmp_path):
    """An m x n M held as ``kind``: numpy, a zarr array, a dask array, or torch."""
    if kind == "zarr":
        import zarr

        array = zarr.create_array(str(tmp_path / "M.zarr"), shape=M.shape, chunks=(70, 30),
                                  dtype=M.dtype)
        array[:] = M
        return array
    if kind == "dask":
        import dask.array as da

        return da.from_array(M, chunks=(90, 30))
    if kind == "torch":
        return TensorStandIn(M, requires_grad=False, dtype=f"torch.{M.dtype}")
    return M


@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask", "torch"])
@pytest.mark.parametrize("sparse", [False, True])
def test_svd_lowrank_subtracts_an_m_by_n_mean_as_torch_broadcasts_it(matrix, kind, sparse,
                                                                     tmp_path):
    """torch broadcasts M to A's shape: a full m x n M, or a column from a dense A, is
    subtracted block by block (also from sparse A), never formed whole; rows stay implicit,
    and so does a column taken from a sparse A (the next test)."""
    from ooc_svd.sources.difference import Difference, subtract

    rng = np.random.default_rng(5)
    A = scipy.sparse.random(400, 30, density=0.2, random_state=2, format="csr") if sparse \
        else matrix
    dense = A.toarray() if sparse else A
    full = 0.3 * np.outer(rng.standard_normal(400), rng.standard_normal(30))  # rank one
    column = 0.2 * rng.standard_normal((400, 1))
    for M, values in ((full_mean(kind, full, tmp_path), full), (column, column)):
        U, S, V = ooc_svd.svd_lowrank(A, q=4, niter=4, M=M)
        _, S_exact, V_exact = naive.truncated_svd(dense - values, 4)
        np.testing.assert_allclose(S, S_exact, rtol=1e-6)
        assert naive.subspace_distance(V, V_exact) < 1e-4
        np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-10)
        source, mean = subtract(ooc_svd.sources.open_source(A), M)
        assert mean is None and isinstance(source.array, Difference)
    row = matrix.mean(axis=0)
    expanded = TensorStandIn(np.broadcast_to(row, (400, 30)), dtype="torch.float64")
    for M in (row, row[None], 2.5, np.broadcast_to(row, (400, 30)), expanded):
        source, mean = subtract(ooc_svd.sources.open_source(A), M)
        assert source.array is A if not sparse else source.nnz == A.nnz
        np.testing.assert_array_equal(mean, row if M is expanded else
                                      np.broadcast_to(M, (400, 30))[0])


@pytest.mark.parametrize("kind", ["numpy", "zarr", "dask", "torch"])
def test_svd_lowrank_takes_a_column_from_a_sparse_a_without_densifying(kind, tmp_path,
                                                                      monkeypatch):
    """A - c 1^T of a sparse A of more than 4096 columns by rank-one corrections: the
    randomized method's result on the dense difference, to rounding, with no block of A
    densified. (Tall: a wide A in memory is factored as its transpose.)"""
    from ooc_svd.sources.difference import Difference

    rng = np.random.default_rng(7)
    A = scipy.sparse.random(4200, 4100, density=0.003, random_state=1, format="csr")
    column = 3.0 + rng.standard_normal((4200, 1))  # a large offset: B is mostly c 1^T
    column[17] = 0.0
    M = full_mean(kind, column, tmp_path)

    def refuse(*args):
        raise AssertionError("a block of A was densified")

    monkeypatch.setattr(Difference, "__getitem__", refuse)
    U, S, V = ooc_svd.svd_lowrank(A, q=6, niter=4, M=M)
    monkeypatch.undo()
    reference = ooc_svd.svd(A.toarray() - column, 6, oversample=0, niter=4,
                            method="randomized")
    np.testing.assert_allclose(S, reference.S, rtol=1e-12)
    np.testing.assert_allclose(np.abs(U.T @ reference.U), np.eye(6), atol=1e-8)
    np.testing.assert_allclose(np.abs(V.T @ reference.V), np.eye(6), atol=1e-8)
    float32 = ooc_svd.svd_lowrank(A.astype(np.float32), q=6, niter=4, M=M)[1]
    np.testing.assert_allclose(float32, reference.S, rtol=1e-6)


def test_an_expanded_column_of_m_is_read_as_that_column(matrix):
    """An m x n view that repeats one column (torch's ``expand``, numpy's ``broadcast_to``)
    is M's column: taken by the kernels from a sparse A, read as m x 1 with a dense A."""
    from ooc_svd.sources.difference import sparse_column, subtract

    A = scipy.sparse.random(300, 5000, density=0.01, random_state=3, format="csr")
    column = 2.0 + np.random.default_rng(9).standard_normal((300, 1))
    expanded = np.broadcast_to(column, A.shape)
    tensor = TensorStandIn(expanded, requires_grad=False, dtype="torch.float64")
    source = ooc_svd.sources.open_source(A)
    reference = ooc_svd.svd_lowrank(A, q=4, niter=3, M=column)
    for M in (expanded, tensor):
        assert sparse_column(source, M).shape == (300, 1)
        U, S, V = ooc_svd.svd_lowrank(A, q=4, niter=3, M=M)
        np.testing.assert_array_equal(S, reference[1])
        np.testing.assert_array_equal(V, reference[2])
    dense_column = np.random.default_rng(10).standard_normal((matrix.shape[0], 1))
    difference, mean = subtract(ooc_svd.sources.open_source(matrix),
                                np.broadcast_to(dense_column, matrix.shape))
    assert mean is None and difference.array.subtrahend.shape == (matrix.shape[0], 1)
    np.testing.assert_allclose(difference.read(0, 50), matrix[:50] - dense_column[:50])
    # Narrowed before the conversion that would copy it whole (bfloat16 to float32 here, as
    # a move from the GPU would), and only once its own shape is checked
    bfloat16 = TensorStandIn(np.broadcast_to(dense_column, matrix.shape), requires_grad=False)
    difference, _ = subtract(ooc_svd.sources.open_source(matrix), bfloat16)
    assert difference.array.subtrahend.shape == (matrix.shape[0], 1)
    for wrong in (np.broadcast_to(column, (300, 2)),
                  TensorStandIn(np.broadcast_to(np.ones((1, 5000)), (7, 5000)),
                                requires_grad=False)):
        with pytest.raises(InputError, match="does not broadcast to A's shape"):
            ooc_svd.svd_lowrank(A, q=3, M=wrong)


def test_a_column_taken_by_the_kernels_works_with_block_krylov_and_not_with_gram():
    from ooc_svd.api import _Request, _run, open_matrix
    from ooc_svd.engine import fixed_rank
    from ooc_svd.sources.difference import sparse_column

    A = scipy.sparse.random(300, 5000, density=0.01, random_state=2, format="csr")
    column = 1.0 + np.random.default_rng(8).standard_normal((300, 1))
    source = open_matrix(A)[0]
    request = _Request(5, fixed_rank(5), oversample=10, niter=2, method="krylov",
                       row_shift=sparse_column(source, column))
    result = _run(source, request)
    reference = ooc_svd.svd(A.toarray() - column, 5, niter=2, method="krylov")
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)
    assert result.frobenius_norm == pytest.approx(reference.frobenius_norm, rel=1e-12)
    small = open_matrix(A[:, :300].tocsr())[0]
    with pytest.raises(InputError, match="needs the randomized or Krylov method, not 'gram'"):
        _run(small, _Request(5, fixed_rank(5), method="gram",
                             row_shift=sparse_column(small, column)))
    for elsewhere in ({"client": "tcp://127.0.0.1:1"}, {"checkpoint": "state"}):
        with pytest.raises(InputError, match="runs locally, without a checkpoint"):
            _run(source, _Request(5, fixed_rank(5), method="randomized",
                                  row_shift=sparse_column(source, column), **elsewhere))


def test_a_column_with_nan_taken_from_a_sparse_a_names_its_rows():
    A = scipy.sparse.random(300, 5000, density=0.01, random_state=1, format="csr")
    column = np.ones((300, 1))
    column[211] = np.nan
    with pytest.raises(NonFiniteError, match=r"M holds NaN or Inf in rows \[\d+, \d+\)"):
        ooc_svd.svd_lowrank(A, q=3, M=column)


@pytest.mark.parametrize("shape", [(300, 1), (300, 30)])
def test_nan_in_an_m_subtracted_from_the_blocks_is_blamed_on_m(shape):
    """A - M formed block by block: a NaN of M is M's, not the matrix's, and is not wrapped
    as a failed read."""
    A = np.random.default_rng(2).standard_normal((300, 30))
    M = np.zeros(shape)
    M[211, -1] = np.inf
    with pytest.raises(NonFiniteError, match=r"^M holds NaN or Inf in rows \[\d+, \d+\), "
                                             "first at row 211$"):
        ooc_svd.svd_lowrank(A, q=3, M=M)
    A[5, 5] = np.nan
    with pytest.raises(NonFiniteError, match="^the matrix holds NaN or Inf, first at row 5$"):
        ooc_svd.svd_lowrank(A, q=3, M=np.zeros(shape))


def test_a_minus_m_of_a_sparse_a_is_cut_finer_than_its_units(tmp_path):
    """A unit of sparse rows can take far more room dense: A - M's blocks are not made of
    whole units (here one unit of 3000 rows, 24 MB dense, under a 10 MB limit)."""
    from ooc_svd.sources.csr import CSRWriter
    from ooc_svd.sources.difference import subtract

    A = scipy.sparse.random(3000, 2000, density=0.001, random_state=3, format="csr",
                            dtype=np.float32)
    path = str(tmp_path / "A.zarr")
    with CSRWriter(path, A.shape[1], np.float32) as writer:
        writer.append(A)
        writer.close()
    column = np.random.default_rng(4).standard_normal((3000, 1))
    sparse = ooc_svd.sources.open_source(path)
    assert len(sparse.chunk_rows) == 2  # one unit
    source, _ = subtract(sparse, column)
    plan = ooc_svd.svd_plan(source, 4, oversample=4, memory_limit="10MB")
    assert len(plan.blocks) > 2 and plan.predicted_peak_bytes <= 10**7
    U, S, V = ooc_svd.svd_lowrank(path, q=4, niter=4, M=column)
    dense = A.toarray() - column
    assert S[0] == pytest.approx(np.linalg.norm(dense, 2), rel=1e-6)
    # The same sketch on A - M in memory: the blocks change only the rounding.
    np.testing.assert_allclose(S, ooc_svd.svd_lowrank(dense, q=4, niter=4)[1], rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_minus_m_counts_the_bytes_of_a_and_m_it_reads(sparse):
    """The plan's bytes to read, and a run's bytes read, are A's and M's, not those of the
    difference the kernels see (a float32 A with a float64 M reads three times more)."""
    from ooc_svd.api import _Request, _run, open_matrix
    from ooc_svd.engine import fixed_rank
    from ooc_svd.sources.difference import subtract

    rng = np.random.default_rng(6)
    A = rng.standard_normal((3000, 40)).astype(np.float32)
    if sparse:
        A = scipy.sparse.random(3000, 40, density=0.1, random_state=6, format="csr",
                                dtype=np.float32)
    a_bytes = open_matrix(A)[0].nbytes  # a sparse block's indptr is int64
    for M in (rng.standard_normal((3000, 40)), rng.standard_normal((3000, 1))):
        source, _ = subtract(open_matrix(A)[0], M)
        request = _Request(3, fixed_rank(3), oversample=2, niter=2, method="randomized")
        result = _run(source, request)
        assert result.plan.cached_blocks == 0 and result.passes == 3
        assert result.plan.bytes_to_read == pytest.approx(3 * (a_bytes + M.nbytes), rel=1e-9)
        assert result.bytes_read == pytest.approx(result.plan.bytes_to_read, abs=3)


def test_svd_lowrank_results_follow_a_dtype_whatever_m_is(matrix):
    A = matrix.astype(np.float32)
    for M in (matrix.mean(axis=0), np.ones((400, 1)), np.ones((400, 30))):
        U, S, V = ooc_svd.svd_lowrank(A, q=3, niter=3, M=M)
        assert U.dtype == S.dtype == V.dtype == np.float32
        np.testing.assert_allclose(S, naive.truncated_svd(A.astype(float) - M, 3)[1],
                                   rtol=1e-5)
    integers = np.arange(400 * 30).reshape(400, 30) % 7
    U, S, V = ooc_svd.svd_lowrank(integers.astype(np.uint8), q=3, niter=3, M=3 * np.ones((400, 1)))
    assert S.dtype == np.float64  # signed differences of integers
    np.testing.assert_allclose(S, naive.truncated_svd(integers - 3.0, 3)[1], rtol=1e-8)


@pytest.mark.parametrize(
    ("M", "message"),
    [
        (np.zeros(400), r"M of shape \(400,\) does not broadcast to A's shape \(400, 30\)"),
        (np.zeros((2, 400, 30)), "at most 2 dimensions"),
        (scipy.sparse.eye(400, 30, format="csr"), "M must be dense"),
        (np.full((400, 30), "a"), "M must hold real numbers"),
        (np.full(30, "a"), "M must hold real numbers"),
        (np.full(30, np.nan), "M holds NaN or Inf"),
    ],
)
def test_svd_lowrank_refuses_an_m_torch_would_not_broadcast(matrix, M, message):
    with pytest.raises(InputError, match=message):
        ooc_svd.svd_lowrank(matrix, q=3, M=M)


class StandInTensor:
    """torch.Tensor, in the stand-in for torch (``torch_stand_in``): torch itself is not a
    test dependency."""

    device = "cpu"


class TensorStandIn(StandInTensor):
    """What ooc_svd uses of a torch tensor, refusing numpy conversion as torch does for a
    tensor that requires grad, that has its negative bit set (as ``x.conj().imag`` has), or
    whose dtype numpy lacks."""

    def __init__(self, values, requires_grad=True, dtype="torch.bfloat16", negated=False):
        self.values, self.requires_grad, self.negated = values, requires_grad, negated
        self.shape, self.dtype = values.shape, dtype

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad.")

    def detach(self):
        return TensorStandIn(self.values, False, self.dtype, self.negated)

    def stride(self, dim):
        return self.values.strides[dim] // self.values.itemsize

    def __getitem__(self, rows):
        return TensorStandIn(self.values[rows], self.requires_grad, self.dtype, self.negated)

    def cpu(self):
        return self

    def resolve_conj(self):
        return self  # real values

    def resolve_neg(self):
        return TensorStandIn(-self.values if self.negated else self.values,
                             self.requires_grad, self.dtype)

    def float(self):
        detached = TensorStandIn(self.values.astype(np.float32), self.requires_grad)
        detached.dtype = "torch.float32"
        return detached

    def is_complex(self):
        return self.dtype.startswith("torch.complex")

    def numpy(self):
        if self.dtype in ("torch.float8_e4m3fn", "torch.complex32"):
            raise TypeError(f"Got unsupported ScalarType {self.dtype}")
        if self.requires_grad or self.negated or self.dtype == "torch.bfloat16":
            raise RuntimeError("numpy() refused")
        return self.values


def test_float32_singular_values_beyond_its_range_are_kept_in_float64(tmp_path):
    """Entries of 1e38 in float32 give singular values above float32's 3.4e38: S (and
    B = U diag(S)) are float64, and the note says why, where they were Inf."""
    rng = np.random.default_rng(13)
    A = (np.clip(rng.standard_normal((400, 30)), -3, 3) * 1e38).astype(np.float32)
    expected = np.linalg.svd(A.astype(np.float64), compute_uv=False)[:3]
    out = str(tmp_path / "result.zarr")
    result = ooc_svd.svd(A, 3, out=out, write_factors=True)
    assert result.S.dtype == np.float64 and result.U.dtype == np.float32
    np.testing.assert_allclose(result.S, expected, rtol=1e-5)
    assert "S is float64, as U and V are float32: its values exceed float32's range" in \
        result.note
    with pytest.warns(RuntimeWarning, match="S holds values beyond float32's range .* "
                                            "returned as inf") as caught:
        U, S, V = ooc_svd.svd_lowrank(A, 3)  # as torch returns S: in U's dtype
    assert caught[0].filename == __file__  # the call, not the package's code
    assert U.dtype == S.dtype == V.dtype == np.float32 and np.isinf(S).all()
    stored = zarr.open_group(out, mode="r")
    assert stored["B"].dtype == np.float64 and np.isfinite(stored["B"][:]).all()
    assert ooc_svd.verify.verify_result(out)["ok"]
    small = ooc_svd.svd(A / 1e30, 3)
    assert small.S.dtype == np.float32 and "S is float64" not in small.note


def test_a_masked_array_is_refused():
    A = np.ma.masked_equal(np.arange(12.0).reshape(4, 3), 5.0)
    for factor in (lambda: ooc_svd.svd(A, 1), lambda: ooc_svd.svd_lowrank(A, 1)):
        with pytest.raises(InputError, match="A is a masked array: .* fill them first"):
            factor()


@pytest.mark.parametrize("shape", [(6, 3), (3, 6)])  # a wide A's M is transposed first
def test_a_masked_mean_or_subtrahend_is_refused(shape):
    """numpy reads a masked array's masked entries as whatever lies under the mask."""
    A = np.arange(18.0).reshape(shape)
    masked_row = np.ma.masked_equal(np.arange(float(shape[1])), 1.0)
    with pytest.raises(InputError, match="mean is a masked array: .* fill them first"):
        ooc_svd.svd(A, 1, mean=masked_row)
    with pytest.raises(InputError, match="M is a masked array: .* fill them first"):
        ooc_svd.svd_lowrank(A, 1, M=masked_row)
    with pytest.raises(InputError, match="M is a masked array"):
        ooc_svd.svd_lowrank(A, 1, M=np.ma.masked_equal(np.zeros(shape), 1.0))  # nothing masked


def test_torch_tensors_are_read_detached_and_bfloat16_as_float32(matrix):
    U, S, V = ooc_svd.svd_lowrank(TensorStandIn(matrix), q=4)
    np.testing.assert_allclose(S, naive.truncated_svd(matrix.astype(np.float32), 4)[1],
                               rtol=1e-5)
    assert S.dtype == np.float32


class PlacedTensor:
    """A tensor made by torch.from_numpy, then moved to a device."""

    def __init__(self, array, device="cpu"):
        self.array, self.device = array, device
        self.dtype = array.dtype

    def to(self, device):
        return PlacedTensor(self.array, device)

    def __array__(self, dtype=None, copy=None):
        return self.array


class TorchStandIn:
    """What ooc_svd uses of the torch module: its Tensor class, to tell tensors (of any
    subclass) by, and from_numpy, to return tensors."""

    Tensor = StandInTensor
    from_numpy = PlacedTensor


@pytest.fixture(autouse=True)
def torch_stand_in():
    """The stand-in as torch, in every test here (its own patch: a test's
    ``monkeypatch.undo()`` keeps it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", TorchStandIn)
        yield


def test_tensors_torch_would_not_convert_to_numpy_are_read_or_refused_by_name(matrix):
    """A lazily negated tensor (``x.conj().imag``) is read as its values; one of a dtype
    numpy lacks is refused by name, not by numpy()'s TypeError."""
    negated = TensorStandIn(-matrix, requires_grad=False, dtype="torch.float64", negated=True)
    U, S, V = ooc_svd.svd_lowrank(negated, q=matrix.shape[1])
    np.testing.assert_allclose(np.asarray(U) * np.asarray(S) @ np.asarray(V).T, matrix,
                               atol=1e-10)
    float8 = TensorStandIn(matrix, requires_grad=False, dtype="torch.float8_e4m3fn")
    with pytest.raises(InputError, match="a torch tensor of torch.float8_e4m3fn has no numpy "
                                         r"dtype .*; convert it first \(e.g. tensor.float"):
        ooc_svd.svd_lowrank(float8, q=2)
    half_complex = TensorStandIn(matrix, requires_grad=False, dtype="torch.complex32")
    with pytest.raises(InputError, match="torch.complex32 has no numpy dtype .*; pass real "
                                         "data$"):  # .float() would drop the imaginary part
        ooc_svd.svd_lowrank(half_complex, q=2)


def test_torch_inputs_give_torch_tensors_on_their_device(matrix, torch_stand_in):
    """As torch's functions return them: U, S, V as tensors on the input's device."""
    tensor = TensorStandIn(matrix, requires_grad=False, dtype="torch.float64")
    tensor.device = "cuda:1"
    for function in (ooc_svd.svd_lowrank, ooc_svd.pca_lowrank):
        U, S, V = function(tensor, q=3)
        assert {U.device, S.device, V.device} == {"cuda:1"}
        expected = function(matrix, q=3)
        for got, want in zip((U, S, V), expected, strict=True):
            assert isinstance(want, np.ndarray) and got.array.dtype == np.float64
            np.testing.assert_allclose(got.array, want, atol=1e-12)


class SparseTensorStandIn(StandInTensor):
    """What ooc_svd uses of a torch sparse tensor of layout COO, CSR, CSC or BSR (its parts
    as ``TensorStandIn``), from a scipy matrix; uncoalesced COO keeps duplicate entries."""

    def __init__(self, matrix, layout, dtype=np.float64):
        self.matrix, self.layout, self.dtype = matrix, f"torch.sparse_{layout}", dtype
        self.shape = matrix.shape

    def part(self, values):
        return TensorStandIn(np.asarray(values), requires_grad=True, dtype="torch.int64")

    def detach(self):
        return self

    def cpu(self):
        return self

    def coalesce(self):
        return SparseTensorStandIn(self.matrix.tocsr().tocoo(), "coo", self.dtype)

    def values(self):
        return TensorStandIn(self.matrix.data.astype(self.dtype), requires_grad=True,
                             dtype=f"torch.{np.dtype(self.dtype)}")

    def indices(self):
        return self.part(np.stack([self.matrix.row, self.matrix.col]))

    def crow_indices(self):
        return self.part(self.matrix.indptr)

    def col_indices(self):
        return self.part(self.matrix.indices)

    ccol_indices, row_indices = crow_indices, col_indices


def test_torch_sparse_tensors_are_read_as_csr(matrix):
    """torch.svd_lowrank takes sparse tensors: COO (coalesced here), CSR and CSC give the
    scipy matrix's result; other layouts and a sparse M are refused."""
    A = scipy.sparse.random(200, 40, density=0.1, random_state=4, format="csr")
    reference = ooc_svd.svd(A, 4, method="exact")
    duplicated = scipy.sparse.coo_matrix((np.r_[A.tocoo().data, 1.0, -1.0],
                                          (np.r_[A.tocoo().row, 0, 0],
                                           np.r_[A.tocoo().col, 0, 0])), shape=A.shape)
    for tensor in (SparseTensorStandIn(duplicated, "coo"), SparseTensorStandIn(A, "csr"),
                   SparseTensorStandIn(A.tocsc(), "csc")):
        result = ooc_svd.svd(tensor, 4, method="exact")
        assert result.frobenius_norm == pytest.approx(reference.frobenius_norm, rel=1e-14)
        np.testing.assert_allclose(result.S, reference.S, rtol=1e-13)
    half = ooc_svd.svd(SparseTensorStandIn(A.tocoo(), "coo", np.float16), 4, method="exact")
    np.testing.assert_allclose(half.S, reference.S, rtol=1e-3)  # float16 values, as float32
    with pytest.raises(InputError, match="layout torch.sparse_bsr are not supported"):
        ooc_svd.svd(SparseTensorStandIn(A, "bsr"), 4)
    with pytest.raises(InputError, match="M must be dense"):
        ooc_svd.svd_lowrank(A, q=3, M=SparseTensorStandIn(A, "csr"))

    class Hybrid(SparseTensorStandIn):  # one sparse dimension, values of 40 numbers each
        def coalesce(self):
            return self

        def values(self):
            return TensorStandIn(np.ones((2, 40)), dtype="torch.float64")

        def indices(self):
            return self.part(np.array([[0, 2]]))

    with pytest.raises(InputError, match="a hybrid torch sparse tensor"):
        ooc_svd.svd_lowrank(Hybrid(A.tocoo(), "coo"), q=3)
    with pytest.raises(InputError, match="not the path 'M.zarr'"):
        ooc_svd.svd_lowrank(matrix, q=3, M="M.zarr")


def test_svd_lowrank_allows_q_equal_to_min_dimension():
    A = naive.matrix_with_spectrum(50, 8, np.arange(8, 0, -1.0), seed=1)
    U, S, V = ooc_svd.svd_lowrank(A, q=8)
    np.testing.assert_allclose(S, np.arange(8, 0, -1.0), rtol=1e-10)
    np.testing.assert_allclose((U * S) @ V.T, A, atol=1e-10)


@pytest.mark.parametrize("method", ["randomized", "krylov", "exact", "gram"])
@pytest.mark.parametrize("shape", [(60, 8), (8, 60)])
def test_k_may_be_the_full_rank_as_tol_and_torch_allow(method, shape):
    """k = min(m, n) gives the whole SVD, by every method, of a tall or a wide matrix."""
    A = naive.matrix_with_spectrum(*shape, np.logspace(0, -6, 8), seed=2)
    result = ooc_svd.svd(A, 8, method=method)
    np.testing.assert_allclose(result.S, np.logspace(0, -6, 8), rtol=1e-8)
    np.testing.assert_allclose((result.U * result.S) @ result.V.T, A, atol=1e-12)
    assert result.residual == 0.0  # not ||A||^2 - sum S^2's rounding
    centered = A - A.mean(axis=0)
    result = ooc_svd.svd(A, 8, method=method, center=True)
    np.testing.assert_allclose(result.S, np.linalg.svd(centered, compute_uv=False),
                               rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose((result.U * result.S) @ result.V.T, centered, atol=1e-12)


def test_svd_lowrank_q_beyond_the_smaller_dimension_gives_all_triplets_as_torch():
    A = np.diag([3.0, 2.0, 1.0])
    for q in (None, 10):
        U, S, V = ooc_svd.svd_lowrank(A, q=q)
        assert U.shape == V.shape == (3, 3)
        np.testing.assert_allclose(S, [3.0, 2.0, 1.0], rtol=1e-12)
    for lowrank in (ooc_svd.svd_lowrank, ooc_svd.pca_lowrank):  # empty factors, as torch's
        U, S, V = lowrank(A, q=0)
        assert (U.shape, S.shape, V.shape) == ((3, 0), (0,), (3, 0))
        with pytest.raises(InputError, match="q=-1 must be >= 0"):
            lowrank(A, q=-1)
        # a stack's runs, all empty, connect to no cluster (there is no scheduler there)
        U, S, V = lowrank(np.stack([A, A]), q=0, client="tcp://127.0.0.1:1")
        assert (U.shape, S.shape, V.shape) == ((2, 3, 0), (2, 0), (2, 3, 0))
    with pytest.raises(InputError, match="q=4 must be at most"):  # torch's pca_lowrank too
        ooc_svd.pca_lowrank(A, q=4)


@pytest.mark.parametrize("sparse", [False, True])
def test_torch_functions_factor_a_wide_a_as_its_transpose(sparse):
    """As torch does for m < n: the n x q arrays of a 150 x 300,000 sparse A do not fit
    40 MB; its transpose's, 150 x q, do. With M (A - M as A^T - M^T) and centered too. The
    exact method, which needs an n x n factor, tells the transpose was factored."""
    m, n, q = 150, 300_000, 10
    rng = np.random.default_rng(3)
    columns = rng.integers(0, n, 40 * m)
    A = scipy.sparse.csr_matrix((rng.standard_normal(40 * m) + 1.0,
                                 (np.repeat(np.arange(m), 40), columns)), shape=(m, n))
    if not sparse:
        A = A[:, : 20_000].toarray()
    n = A.shape[1]
    column = rng.standard_normal((m, 1))
    B = A - column if not sparse else None

    def exact(matrix):  # the singular values of a short-wide matrix, from its m x m Gram
        gram = matrix @ matrix.T
        gram = gram.toarray() if scipy.sparse.issparse(gram) else gram
        return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1][:q], 0, None))

    limit = "40MB"
    assert ooc_svd.svd_lowrank(A, q=q, memory_limit=limit)[2].shape == (n, q)  # 'auto'
    U, S, V = ooc_svd.svd_lowrank(A, q=q, method="exact", memory_limit=limit)
    assert U.shape == (m, q) and V.shape == (n, q)
    np.testing.assert_allclose(S, exact(A), rtol=1e-6)
    np.testing.assert_allclose(U.T @ (A @ V), np.diag(S), atol=1e-8 * S[0])
    if not sparse:
        _, S_M, _ = ooc_svd.svd_lowrank(A, q=q, M=column, method="exact", memory_limit=limit)
        np.testing.assert_allclose(S_M, exact(B), rtol=1e-6)
        centered = A - A.mean(axis=0)
        U, S, V = ooc_svd.pca_lowrank(A, q=q, method="exact", memory_limit=limit)
        np.testing.assert_allclose(S, exact(centered), rtol=1e-6)
        np.testing.assert_allclose(U.T @ (centered @ V), np.diag(S), atol=1e-8 * S[0])
    else:
        with pytest.raises(PlanError, match="memory_limit 40 MB is too small"):
            ooc_svd.svd(A, q, oversample=0, memory_limit=limit)  # A, not its transpose


@pytest.mark.parametrize("sparse", [False, True])
def test_pca_lowrank_centers_a_wide_a_whether_or_not_it_is_transposed(sparse, tmp_path):
    """A wide sparse A of at most 4096 rows keeps its rows (A^T less a column would be
    densified), a wide .npy file too; both are centered as a transposed one is."""
    A = scipy.sparse.random(60, 3000, density=0.02, random_state=2, format="csr") * 4 + \
        scipy.sparse.random(60, 3000, density=0.001, random_state=3, format="csr") * 100
    if not sparse:
        A = A.toarray()
        np.save(tmp_path / "wide.npy", A)
    dense = A.toarray() if sparse else A
    centered = dense - dense.mean(axis=0)
    exact = np.linalg.svd(centered, compute_uv=False)[:4]
    inputs = [A] + ([] if sparse else [str(tmp_path / "wide.npy")])
    for matrix in inputs:
        U, S, V = ooc_svd.pca_lowrank(matrix, q=4, method="exact")
        np.testing.assert_allclose(S, exact, rtol=1e-6)
        np.testing.assert_allclose(U.T @ centered @ V, np.diag(S), atol=1e-6 * S[0])
        _, uncentered, _ = ooc_svd.pca_lowrank(matrix, q=4, center=False, method="exact")
        np.testing.assert_allclose(uncentered, np.linalg.svd(dense, compute_uv=False)[:4],
                                   rtol=1e-6)


def test_a_wide_npy_file_is_read_by_rows_not_transposed(tmp_path):
    """Its transpose would read the file by columns on every pass (and a cluster could no
    longer ship it by path): the exact method, which needs an n x n factor, is refused for
    the file and runs on the same matrix in memory, as its transpose."""
    A = np.random.default_rng(1).standard_normal((50, 5000))
    path = str(tmp_path / "wide.npy")
    np.save(path, A)
    np.savez(tmp_path / "wide.npz", A=A)  # uncompressed: mapped, as the .npy
    for stored in (path, np.load(path, mmap_mode="r"), str(tmp_path / "wide.npz")):
        with pytest.raises(InputError, match="needs an n x n factor"):
            ooc_svd.svd_lowrank(stored, q=3, method="exact")
    S = ooc_svd.svd_lowrank(np.load(path), q=3, method="exact")[1]
    np.testing.assert_allclose(S, np.linalg.svd(A, compute_uv=False)[:3], rtol=1e-12)


def test_torch_functions_take_a_seed_none_for_niter_and_empty_matrices(matrix):
    """torch's niter=None is 2; its global generator is no seed here (seed is a keyword);
    an empty A gives empty factors, as torch gives them."""
    def run(**options):
        return ooc_svd.svd_lowrank(matrix, q=3, method="randomized", niter=0, **options)[1]

    np.testing.assert_array_equal(run(seed=5), run(seed=5))
    assert not np.array_equal(run(seed=5), run(seed=6))
    np.testing.assert_array_equal(run(), run(seed=0))
    np.testing.assert_array_equal(ooc_svd.svd_lowrank(matrix, q=3, niter=None)[1],
                                  ooc_svd.svd_lowrank(matrix, q=3, niter=2)[1])
    for shape in [(0, 5), (5, 0), (0, 0)]:
        for function in (ooc_svd.svd_lowrank, ooc_svd.pca_lowrank):
            U, S, V = function(np.zeros(shape, np.float32))
            assert (U.shape, S.shape, V.shape) == ((shape[0], 0), (0,), (shape[1], 0))
            assert U.dtype == S.dtype == V.dtype == np.float32
    U, S, V = ooc_svd.svd_lowrank(np.zeros((0, 5)), M=np.ones(5))
    assert (U.shape, S.shape, V.shape) == ((0, 0), (0,), (5, 0))
    with pytest.raises(InputError, match=r"M of shape \(3, 5\) does not broadcast to A's "
                                         r"shape \(0, 5\)"):
        ooc_svd.svd_lowrank(np.zeros((0, 5)), M=np.ones((3, 5)))
    U, S, V = ooc_svd.svd_lowrank(np.zeros((2, 0, 4)))  # a stack of empty matrices
    assert (U.shape, S.shape, V.shape) == ((2, 0, 0), (2, 0), (2, 4, 0))
    with pytest.raises(InputError, match="q=3 must be at most min"):
        ooc_svd.pca_lowrank(np.zeros((0, 5)), q=3)


def test_pca_lowrank(matrix):
    U, S, V = ooc_svd.pca_lowrank(matrix)
    assert S.shape == (6,)
    mean = matrix.mean(axis=0)
    _, S_exact, V_exact = naive.truncated_svd(matrix, 6, mean=mean)
    np.testing.assert_allclose(S, S_exact, rtol=1e-6)
    assert naive.subspace_distance(V, V_exact) < 1e-4
    _, S_uncentered, _ = ooc_svd.pca_lowrank(matrix, q=3, center=False)
    np.testing.assert_allclose(S_uncentered, naive.truncated_svd(matrix, 3)[1], rtol=1e-6)
    _, S_krylov, _ = ooc_svd.pca_lowrank(matrix, q=4, niter=3, method="krylov")
    np.testing.assert_allclose(S_krylov, S_exact[:4], rtol=1e-8)


# ---- output stores -----------------------------------------------------------------------


def test_out_writes_a_zarr_group(tmp_path, block_rows, matrix):
    import zarr

    block_rows(64, 30)
    out = str(tmp_path / "result.zarr")
    result = ooc_svd.svd(matrix, 5, center=True, out=out, method="randomized")
    in_memory = ooc_svd.svd(matrix, 5, center=True, method="randomized")
    group = zarr.open_group(out, mode="r")
    np.testing.assert_allclose(group["U"][:], in_memory.U, atol=1e-12)
    np.testing.assert_allclose(group["S"][:], in_memory.S, rtol=1e-12)
    np.testing.assert_allclose(group["V"][:], in_memory.V, atol=1e-12)
    np.testing.assert_allclose(group["mean"][:], matrix.mean(axis=0), rtol=1e-12)
    attrs = group.attrs["ooc_svd"]
    assert attrs["passes"] == result.passes == 3
    assert attrs["residual"] == pytest.approx(result.residual)
    assert attrs["method"] == result.plan.method and attrs["seed"] == 0
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]


def test_existing_output_is_refused_and_left_untouched(tmp_path, matrix):
    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(matrix, 3, out=out)
    before = tree_digest(out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        ooc_svd.svd(matrix, 4, out=out)
    assert tree_digest(out) == before
    ooc_svd.svd(matrix, 4, out=out, overwrite=True)
    assert ooc_svd.svd(matrix, 4).S.shape == (4,)
    import zarr

    assert zarr.open_group(out, mode="r")["S"].shape == (4,)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]


@pytest.mark.parametrize("name", ["result.npy", "result.NPZ", "A.mtx.gz", "A.h5ad"])
def test_an_output_named_as_a_file_is_refused(tmp_path, matrix, name):
    """Outputs are zarr stores, directories: a result.npy would be one. A store that is
    there already, so named before, is replaced as any other."""
    from ooc_svd.convert import from_scipy

    for write in (lambda out: ooc_svd.svd(matrix, 3, out=out, overwrite=True),
                  lambda out: from_scipy(scipy.sparse.csr_matrix(np.eye(3)), out)):
        with pytest.raises(InputError, match=f"output '.*{name}' is named as an? .* file, but "
                                             "it is written as a zarr store"):
            write(str(tmp_path / name))
    assert os.listdir(tmp_path) == []
    ooc_svd.svd(matrix, 3, out=str(tmp_path / "result.zarr"))
    os.rename(tmp_path / "result.zarr", tmp_path / name)
    ooc_svd.svd(matrix, 2, out=str(tmp_path / name), overwrite=True)
    assert os.listdir(tmp_path) == [name]


def test_a_relative_path_through_a_link_names_what_the_filesystem_finds(tmp_path, monkeypatch):
    """'link/../A.zarr' is the A.zarr beside the link's target, not the one beside the link
    (a textual normalization would read that decoy)."""
    import zarr

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "link").symlink_to(tmp_path / "real" / "sub")
    A = naive.matrix_with_spectrum(60, 5, np.arange(5, 0, -1.0), seed=1)
    for path, values in (("real/A.zarr", A), ("work/A.zarr", 2 * A)):
        zarr.create_array(str(tmp_path / path), shape=A.shape, chunks=(20, 5),
                          dtype=A.dtype)[:] = values
    monkeypatch.chdir(tmp_path / "work")
    np.testing.assert_allclose(ooc_svd.svd("link/../A.zarr", 2).S, [5.0, 4.0], rtol=1e-12)


def test_overwrite_replaces_only_a_result_and_never_an_input(tmp_path, zarr_matrix, matrix):
    path = zarr_matrix(matrix, chunk_rows=100)
    before = tree_digest(path)
    for out in (path, path + "/", os.path.join(path, "result")):
        with pytest.raises(InputError, match="overlaps the input"):
            ooc_svd.svd(path, 3, out=out, overwrite=True)
        with pytest.raises(InputError, match="overlaps the input"):  # the input as a URL
            ooc_svd.svd(f"file://{path}", 3, out=out, overwrite=True)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("kept")
    with pytest.raises(InputError, match="overlaps the input"):  # A inside out
        ooc_svd.svd(zarr_matrix(matrix, name="folder/A.zarr"), 3, out=folder, overwrite=True)
    with pytest.raises(InputError, match="out must name a path, not ''"):
        ooc_svd.svd(path, 3, out="", overwrite=True)
    script = tmp_path / "script.py"
    script.write_text("kept")
    for out in (folder, script):
        with pytest.raises(OutputExistsError, match="is not an ooc_svd result"):
            ooc_svd.svd(matrix, 3, out=out, overwrite=True)
    assert tree_digest(path) == before and script.read_text() == "kept"
    assert sorted(os.listdir(folder)) == ["A.zarr", "notes.txt", "sub"]
    # A trailing separator names the same store; an empty directory is replaced.
    (tmp_path / "empty").mkdir()
    ooc_svd.svd(matrix, 3, out=str(tmp_path / "result.zarr") + os.sep)
    ooc_svd.svd(matrix, 3, out=str(tmp_path / "result.zarr") + os.sep, overwrite=True)
    ooc_svd.svd(matrix, 3, out=tmp_path / "empty", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["A.zarr", "empty", "folder", "result.zarr",
                                            "script.py"]
    assert sorted(os.listdir(tmp_path / "result.zarr")) == ["S", "U", "V", "zarr.json"]


def test_an_input_where_the_run_writes_its_partial_checkpoint_or_spill_is_refused(
        tmp_path, zarr_matrix, matrix):
    """A run replaces OUT.partial and OUT.checkpoint, and spills into scratch_dir: an input
    there would be deleted, or written into."""
    path = zarr_matrix(matrix, name="out.zarr.partial/A", chunk_rows=100)
    before = tree_digest(path)
    out = str(tmp_path / "out.zarr")
    with pytest.raises(InputError, match=r"output \(where it is written first: .*out.zarr"
                                         r".partial'\) overlaps the input"):
        ooc_svd.svd(path, 3, out=out)
    checkpointed = zarr_matrix(matrix, name="run.checkpoint/A", chunk_rows=100)
    with pytest.raises(InputError, match="checkpoint '.*run.checkpoint' overlaps the input"):
        ooc_svd.svd(checkpointed, 3, checkpoint=str(tmp_path / "run.checkpoint"))
    with pytest.raises(InputError, match="scratch_dir .* overlaps the input"):
        ooc_svd.svd(path, 3, scratch_dir=path)
    # A scratch_dir around the input is fine: the spill has a directory of its own there
    assert ooc_svd.svd(path, 3, scratch_dir=str(tmp_path)).rank == 3
    assert tree_digest(path) == before
    assert sorted(os.listdir(tmp_path)) == ["out.zarr.partial", "run.checkpoint"]


def test_an_input_opened_by_the_caller_is_protected_too(tmp_path, matrix):
    import zarr

    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(matrix, 2, out=out)
    zarr.open_group(out, mode="r+").create_array("B", shape=matrix.shape,
                                                 dtype=matrix.dtype)[:] = matrix
    with pytest.raises(InputError, match="overlaps the input"):
        ooc_svd.svd(zarr.open_group(out, mode="r")["B"], 2, out=out, overwrite=True)
    assert sorted(os.listdir(out)) == ["B", "S", "U", "V", "zarr.json"]
    from ooc_svd.convert import from_scipy

    sparse = str(tmp_path / "sparse.zarr")
    from_scipy(scipy.sparse.random(200, 20, density=0.2, format="csr", random_state=0), sparse)
    with pytest.raises(InputError, match="overlaps the input"):  # a CSR group, opened
        ooc_svd.svd(zarr.open_group(sparse, mode="r"), 2, out=os.path.join(sparse, "U"))


def test_a_dask_array_read_from_a_store_protects_that_store(tmp_path, matrix):
    import dask
    import dask.array as da
    import zarr

    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(matrix, 5, out=out)
    before = tree_digest(out)
    U = da.from_zarr(out, component="U")
    held = da.from_array(zarr.open_group(out, mode="r")["U"], chunks=(100, 5))
    inlined = da.from_zarr(out, component="U", inline_array=True)
    (optimized,) = dask.optimize(da.concatenate([U, U]).rechunk((150, 5)))
    for A in (U, 2 * U[:300], held, inlined, optimized):
        with pytest.raises(InputError, match="overlaps the input"):
            ooc_svd.svd(A, 2, out=out, overwrite=True)
    assert tree_digest(out) == before
    assert ooc_svd.svd(U, 2, out=str(tmp_path / "other.zarr")).rank == 2


def test_a_checkpoint_path_holding_something_else_is_not_replaced(tmp_path, matrix):
    taken = tmp_path / "result.zarr.checkpoint"
    taken.mkdir()
    (taken / "notes.txt").write_text("kept")
    with pytest.raises(InputError, match="holds something else than a checkpoint"):
        ooc_svd.svd(matrix, 2, out=str(tmp_path / "result.zarr"))
    assert (taken / "notes.txt").read_text() == "kept"


def test_a_partial_left_by_a_killed_run_is_replaced_and_anything_else_kept(tmp_path, matrix):
    import zarr

    from ooc_svd.store import UNFINISHED

    out = str(tmp_path / "result.zarr")
    zarr.open_group(out + ".partial", mode="w", attributes={UNFINISHED: "result"})
    ooc_svd.svd(matrix, 2, out=out)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]
    foreign = tmp_path / "other.zarr.partial"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("kept")
    with pytest.raises(OutputExistsError, match="is not an unfinished ooc_svd output"):
        ooc_svd.svd(matrix, 2, out=str(tmp_path / "other.zarr"))
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["other.zarr.partial", "result.zarr"]


def test_an_old_result_that_cannot_be_removed_is_named(tmp_path, matrix, monkeypatch):
    import ooc_svd.store

    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(matrix, 2, out=out)
    monkeypatch.setattr(ooc_svd.store.shutil, "rmtree", lambda path, **kwargs: None)
    with pytest.warns(UserWarning, match="could not be removed entirely: what is left of it "
                                         "is '.*result.zarr.old-"):
        ooc_svd.svd(matrix, 2, out=out, overwrite=True)


def test_a_run_killed_while_it_renames_its_result_is_resumed(tmp_path, matrix, monkeypatch):
    """Killed between finishing OUT.partial and renaming it: with nothing at OUT, that
    finished partial is a killed run's, and the next run replaces it (here resuming from the
    checkpoint); beside an OUT that appeared meanwhile, it is kept."""
    import ooc_svd.store

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    out = str(tmp_path / "result.zarr")
    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.store, "move_into_place", die)
        with pytest.raises(Killed):
            ooc_svd.svd(matrix, 2, method="randomized", out=out)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr.checkpoint", "result.zarr.partial"]
    result = ooc_svd.svd(matrix, 2, method="randomized", out=out, resume=True)
    assert any(record.name.endswith("(resumed)") for record in result.records)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]

    os.rename(out, out + ".partial")  # a finished partial, and something at OUT
    os.mkdir(out)
    with pytest.raises(OutputExistsError, match="is not an unfinished ooc_svd output"):
        ooc_svd.svd(matrix, 2, method="randomized", out=out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr", "result.zarr.partial"]


@pytest.mark.parametrize("failing", ["write_scaled_rows", "finish"])
def test_a_failure_while_s_v_and_b_are_written_removes_the_partial_and_keeps_passes(
        tmp_path, matrix, monkeypatch, failing):
    """After the last pass, writing B, S, V and the attributes may still fail (a full disk,
    a signal): the output being written is removed, and the checkpoint kept, as for U."""
    import ooc_svd.store

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ooc_svd.store.ResultWriter, failing, full)
    out = str(tmp_path / "result.zarr")
    with pytest.raises(OSError) as failed:
        ooc_svd.svd(matrix, 2, method="randomized", out=out, write_factors=True)
    assert failed.value.kept_checkpoint == out + ".checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["result.zarr.checkpoint"]


def test_a_result_named_like_a_partial_by_its_user_is_kept(tmp_path, matrix):
    """A finished result at X.partial is a killed run's only where it was made for X: a
    run's own output named X.partial is another result, not replaced by a run on X."""
    import zarr

    named = str(tmp_path / "result.zarr.partial")
    ooc_svd.svd(matrix, 3, out=named)
    with pytest.raises(OutputExistsError, match="is not an unfinished ooc_svd output"):
        ooc_svd.svd(matrix, 2, out=str(tmp_path / "result.zarr"))
    assert zarr.open_group(named, mode="r")["S"].shape == (3,)


def test_an_aborted_output_waits_for_the_writes_zarr_still_runs(tmp_path):
    """An interrupt cuts short the caller of a zarr write, not the write, which goes on in
    zarr's thread: the output is removed after it ends, not before (when the write would
    leave its chunk file in a partial output that every later run refuses)."""
    import asyncio

    import zarr
    from zarr.core.sync import _get_loop

    from ooc_svd.store import StagedOutput

    output = StagedOutput(str(tmp_path / "matrix.zarr"), overwrite=False, replaces="synthetic")
    zarr.open_group(output.partial, mode="w", attributes=output.mark)

    async def late_chunk_write():
        await asyncio.sleep(0.5)
        os.makedirs(os.path.join(output.partial, "c", "0"), exist_ok=True)
        with open(os.path.join(output.partial, "c", "0", "0"), "wb") as chunk:
            chunk.write(b"\0")

    in_flight = asyncio.run_coroutine_threadsafe(late_chunk_write(), _get_loop())
    output.abort()
    in_flight.result(timeout=10)
    assert os.listdir(tmp_path) == []


def test_two_aborts_at_once_wait_for_the_writes_not_for_each_other():
    """Each wait leaves out the other's (and so ends with the writes it waits for)."""
    import asyncio
    import threading
    import time

    from zarr.core.sync import _get_loop

    from ooc_svd.store import wait_for_zarr_writes

    async def busy():  # holds the loop, so both waits are queued before either looks
        time.sleep(0.5)

    write = asyncio.run_coroutine_threadsafe(asyncio.sleep(1.0), _get_loop())
    asyncio.run_coroutine_threadsafe(busy(), _get_loop())
    began = time.perf_counter()
    waits = [threading.Thread(target=wait_for_zarr_writes, kwargs={"timeout": 30})
             for _ in range(2)]
    for wait in waits:
        wait.start()
    for wait in waits:
        wait.join(timeout=60)
    assert write.done() and time.perf_counter() - began < 15


def hold_lock(path):
    """A process of its own holding the output lock of ``path`` until its stdin closes."""
    code = ("import sys; from ooc_svd.store import OutputLock; lock = OutputLock(sys.argv[1]); "
            "print('locked', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "locked\n"
    return child


def release(child):
    child.stdin.close()
    assert child.wait(timeout=60) == 0
    child.stdout.close()


def test_a_second_run_on_the_same_out_is_refused_and_the_first_ones_files_kept(
        tmp_path, matrix):
    import zarr

    from ooc_svd.store import UNFINISHED

    out = str(tmp_path / "result.zarr")
    # What the first run has written so far: its partial result and its checkpoint
    zarr.open_group(out + ".partial", mode="w", attributes={UNFINISHED: "result"})
    os.makedirs(out + ".checkpoint")
    with open(os.path.join(out + ".checkpoint", "state.json"), "w") as file:
        file.write("{}")
    first = hold_lock(out)
    before = tree_digest(tmp_path)
    try:
        for overwrite, resume in [(False, False), (True, False), (True, True)]:
            with pytest.raises(OutputExistsError, match="another run is writing the output"):
                ooc_svd.svd(matrix, 2, out=out, overwrite=overwrite, resume=resume)
        assert tree_digest(tmp_path) == before
    finally:
        release(first)
    ooc_svd.svd(matrix, 2, out=out)  # once the first has ended
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]


def test_a_run_holds_its_locks_until_it_ends_and_removes_them(tmp_path, matrix, monkeypatch):
    import ooc_svd.api
    from ooc_svd.store import OutputLock

    out, checkpoint = str(tmp_path / "result.zarr"), str(tmp_path / "elsewhere")
    assemble = ooc_svd.api.assemble_result
    refused = []

    def assemble_and_try_the_locks(*args, **kwargs):
        for path, what in [(out, "output"), (checkpoint, "checkpoint")]:
            with pytest.raises(OutputExistsError, match=f"writing the {what}"):
                OutputLock(path, what)
            refused.append(path)
        return assemble(*args, **kwargs)

    monkeypatch.setattr(ooc_svd.api, "assemble_result", assemble_and_try_the_locks)
    ooc_svd.svd(matrix, 2, out=out, checkpoint=checkpoint)
    assert refused == [out, checkpoint]
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]


def test_a_lock_held_as_nfs_holds_it_is_not_lost_to_a_second_try_in_the_same_process(
        tmp_path, monkeypatch):
    """NFS turns flock into POSIX locks, which belong to the process (another thread's
    lock would be granted) and which closing any descriptor of the file drops. Emulated
    here by lockf, which has those semantics on any file system."""
    import fcntl
    import threading

    import ooc_svd.store
    from ooc_svd.store import OutputLock

    monkeypatch.setattr(ooc_svd.store.fcntl, "flock", fcntl.lockf)
    path = str(tmp_path / "result.zarr")
    probe = ("import fcntl, sys; file = open(sys.argv[1], 'a')\n"
             "try: fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError: print('held')\nelse: print('free')")

    def seen_from_another_process():
        return subprocess.run([sys.executable, "-c", probe, path + ".lock"], check=True,
                              capture_output=True, text=True).stdout.strip()

    first = OutputLock(path)
    assert seen_from_another_process() == "held"  # its mark was read without dropping it
    refusals = []

    def second_run():
        try:
            OutputLock(path)
        except OutputExistsError as error:
            refusals.append(str(error))

    thread = threading.Thread(target=second_run)
    thread.start()
    thread.join()
    assert len(refusals) == 1 and "another run is writing the output" in refusals[0]
    assert seen_from_another_process() == "held"
    first.release()
    with OutputLock(path):  # free again, in this process too
        assert seen_from_another_process() == "held"
    assert not os.path.exists(path + ".lock")


def test_a_run_with_an_explicit_checkpoint_in_use_is_refused(tmp_path, matrix):
    checkpoint = str(tmp_path / "state")
    first = hold_lock(checkpoint)
    try:
        for named in (checkpoint, checkpoint + os.sep):
            with pytest.raises(OutputExistsError, match="another run is writing the checkpoint"):
                ooc_svd.svd(matrix, 2, checkpoint=named)
        assert sorted(os.listdir(tmp_path)) == ["state.lock"]  # the first run's
    finally:
        release(first)
    ooc_svd.svd(matrix, 2, checkpoint=checkpoint + os.sep)
    assert sorted(os.listdir(tmp_path)) == []


def test_a_lock_file_left_unlocked_is_taken_and_removed(tmp_path, matrix):
    out = str(tmp_path / "result.zarr")
    open(out + ".lock", "w").close()  # as a kill -9 leaves it: the kernel dropped the lock
    ooc_svd.svd(matrix, 2, out=out)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]


def test_a_lock_path_that_cannot_be_a_file_is_named(tmp_path, matrix):
    out = str(tmp_path / "result.zarr")
    os.mkdir(out + ".lock")
    with pytest.raises(IsADirectoryError,
                       match=r"cannot create the lock file beside the output \(Is a directory\)"
                             r": '.*result.zarr.lock'"):
        ooc_svd.svd(matrix, 2, out=out)
    assert sorted(os.listdir(tmp_path)) == ["result.zarr.lock"]


@pytest.mark.parametrize("content", [b"someone's notes\n", b"\xff\xfe binary"])
def test_a_lock_file_that_is_not_ooc_svds_is_refused_and_kept(tmp_path, matrix, content):
    out = str(tmp_path / "result.zarr")
    with open(out + ".lock", "wb") as file:
        file.write(content)
    for _ in range(2):  # refused again: the first refusal left nothing held
        with pytest.raises(OutputExistsError, match="is not an ooc_svd lock file"):
            ooc_svd.svd(matrix, 2, out=out)
    with open(out + ".lock", "rb") as file:
        assert file.read() == content
    assert sorted(os.listdir(tmp_path)) == ["result.zarr.lock"]


def test_a_lock_whose_release_fails_is_still_let_go(tmp_path, monkeypatch):
    import ooc_svd.store
    from ooc_svd.store import OutputLock

    path = str(tmp_path / "result.zarr")
    lock = OutputLock(path)

    def unlink_fails(path):
        raise PermissionError(13, "Permission denied", path)

    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.store.os, "unlink", unlink_fails)
        with pytest.raises(PermissionError):
            lock.release()
    assert lock.file is None
    with OutputLock(path):  # neither the file's lock nor this process's record is left
        pass
    assert not os.path.exists(path + ".lock")


def test_an_output_finished_while_the_run_waited_for_the_lock_is_refused_at_once(
        tmp_path, matrix, monkeypatch):
    """The output is checked again once the lock is held: a run that held it may have just
    written OUT, and this run would otherwise compute all its passes before finding it."""
    import ooc_svd.api
    from ooc_svd.store import OutputLock

    out = str(tmp_path / "result.zarr")
    computed = []

    class LockAfterAnotherRunFinished(OutputLock):
        def __init__(self, path, what="output"):
            if what == "output" and not os.path.exists(out):  # that other run
                monkeypatch.setattr(ooc_svd.api, "OutputLock", OutputLock)
                ooc_svd.svd(matrix, 3, out=out)
            super().__init__(path, what)

    monkeypatch.setattr(ooc_svd.api, "OutputLock", LockAfterAnotherRunFinished)
    monkeypatch.setattr(ooc_svd.api, "_connect_cluster", lambda *args: computed.append(1))
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        ooc_svd.svd(matrix, 2, out=out)
    assert computed == [1]  # the other run's: this one stopped before its passes
    assert sorted(os.listdir(tmp_path)) == ["result.zarr"]
    assert ooc_svd.svd(out + "/U", 1).rank == 1  # the other run's result, untouched


def test_checkpoint_paths_need_not_exist_and_may_not_be_out(tmp_path, matrix):
    nested = tmp_path / "runs" / "today" / "state"
    ooc_svd.svd(matrix, 2, checkpoint=str(nested))
    assert sorted(os.listdir(tmp_path / "runs" / "today")) == []
    out = str(tmp_path / "result.zarr")
    for checkpoint in (out, os.path.join(out, "state"), str(tmp_path)):
        with pytest.raises(InputError, match="must be apart"):
            ooc_svd.svd(matrix, 2, out=out, checkpoint=checkpoint)
    assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_writers_of_stores_are_refused_while_another_writes_the_same_path(tmp_path):
    from ooc_svd.convert import from_scipy
    from ooc_svd.synthetic import write_dense_matrix, write_sparse_matrix

    out = str(tmp_path / "A.zarr")
    first = hold_lock(out)
    try:
        writers = [
            lambda: from_scipy(scipy.sparse.random(50, 10, density=0.2, format="csr"), out),
            lambda: write_dense_matrix(out, (50, 10)),
            lambda: write_sparse_matrix(out, (50, 10), nnz=100),
        ]
        for write in writers:
            with pytest.raises(OutputExistsError, match="another run is writing the output"):
                write()
        assert sorted(os.listdir(tmp_path)) == ["A.zarr.lock"]
    finally:
        release(first)
    write_dense_matrix(out, (50, 10))
    assert sorted(os.listdir(tmp_path)) == ["A.zarr"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_what_appears_at_out_during_a_run_is_kept_with_the_result_beside_it(
        tmp_path, matrix, monkeypatch, overwrite):
    import ooc_svd.api

    out = tmp_path / "result.zarr"
    assemble = ooc_svd.api.assemble_result

    def assemble_while_someone_writes_out(*args, **kwargs):
        out.mkdir()
        (out / "notes.txt").write_text("kept")
        return assemble(*args, **kwargs)

    monkeypatch.setattr(ooc_svd.api, "assemble_result", assemble_while_someone_writes_out)
    with pytest.raises(OutputExistsError, match="appeared while the output was written"):
        ooc_svd.svd(matrix, 2, out=str(out), overwrite=overwrite)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    import zarr

    kept = zarr.open_group(str(out) + ".partial", mode="r")
    assert kept["S"].shape == (2,) and "ooc_svd" in kept.attrs
    assert "ooc_svd_unfinished" not in kept.attrs


def test_failed_run_leaves_no_output(tmp_path, zarr_matrix, matrix):
    A = matrix.copy()
    A[333, 4] = np.nan
    out = str(tmp_path / "result.zarr")
    with pytest.raises(NonFiniteError):
        ooc_svd.svd(zarr_matrix(A), 3, out=out)
    assert sorted(os.listdir(tmp_path)) == ["A.zarr"]


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 31}, r"k=31 must be at most min\(m, n\) = 30"),
        ({"k": 0}, "k=0 must be >= 1"),
        ({"k": 2.5}, "k must be an integer"),
        ({"k": 3, "niter": -1}, "niter=-1 must be >= 0"),
        ({"k": 3, "seed": 2**64}, "seed=18446744073709551616 must be <= 18446744073709551615"),
        ({"k": 3, "oversample": -2}, "oversample=-2 must be >= 0"),
        ({"k": 3, "mean": np.zeros(29)}, r"mean must have shape \(30,\) or \(1, 30\)"),
        ({"k": 3, "mean": np.zeros((400, 30))}, "mean must have shape"),
        ({"k": 3, "method": "lanczos"},
         "method must be one of 'auto', 'exact', 'gram', 'randomized', 'krylov'"),
        ({"k": 3, "memory_limit": "lots"}, "cannot read a memory size"),
        ({"k": 3, "memory_limit": "1MB"}, "memory_limit 1 MB is too small"),
        ({"k": 3, "mean": np.zeros(30), "center": True}, "center=True .* or mean .*, not both"),
        ({"k": 3, "center": "no"}, "center must be True or False, not 'no'"),
        ({"k": 3, "write_factors": True}, "write_factors writes the factors into out"),
        ({"k": 3, "resume": True}, "resume continues from a checkpoint: give out"),
        ({"k": 3, "scratch_dir": "/no/such/directory"}, "scratch_dir '/no/such/directory' is "
                                                        "not a directory"),
    ],
)
def test_bad_arguments_are_named(matrix, kwargs, message):
    with pytest.raises(InputError, match=message):
        ooc_svd.svd(matrix, **kwargs)


@pytest.mark.parametrize(
    ("A", "message"),
    [
        (np.array([["a", "b"], ["c", "d"]]), "non-numeric dtype <U1"),
        (np.ones((5, 4), dtype=complex), "complex dtype"),
        (np.ones(5), "has 1 dimensions; a matrix needs 2"),
        (np.array(3.0), r"A of shape \(\) has 0 dimensions; a matrix needs 2"),
        (np.float64(3.0), "has 0 dimensions"),
    ],
)
def test_bad_matrices_are_named(A, message):
    with pytest.raises(InputError, match=message):
        ooc_svd.svd(A, 1)


def test_a_dask_array_of_sparse_chunks_is_refused_by_name():
    """Its blocks would reach numpy as arrays of sparse matrices, which numpy cannot
    convert: the refusal says where sparse matrices are read instead."""
    import dask.array as da
    import scipy.sparse

    A = da.from_array(scipy.sparse.random(300, 20, density=0.1, format="csr", random_state=0),
                      chunks=(50, 20), asarray=False)
    with pytest.raises(InputError, match="dask array of scipy.sparse.* chunks is not "
                                         "supported.*pass a scipy.sparse matrix itself"):
        ooc_svd.svd(A, 3)


def test_nan_names_the_rows(zarr_matrix, block_rows, matrix):
    block_rows(100, 30)
    A = matrix.copy()
    A[237, 11] = np.inf
    with pytest.raises(NonFiniteError, match=r"^the matrix holds NaN or Inf, first at row 237$"):
        ooc_svd.svd(zarr_matrix(A, chunk_rows=100), 3, memory_limit="4MB", method="randomized")
    with pytest.raises(NonFiniteError, match="first at row 237"):
        ooc_svd.svd(A, 3, method="exact")


@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "krylov"])
def test_a_matrix_whose_squares_underflow_is_named_not_mistaken(matrix, method):
    """Entries near 1e-200 square to zero in float64: the norm (and gram's G) would vanish
    and 1/sigma overflow; such a matrix is refused. One whose centered norm cancels to
    about zero is not such a matrix."""
    with pytest.raises(NonFiniteError, match="too small for float64.*rescale"):
        ooc_svd.svd(matrix * 1e-200, 3, method=method)
    constant = np.full((400, 30), 3.7)
    for A in (constant, scipy.sparse.csr_matrix(constant)):
        assert ooc_svd.svd(A, 3, method=method, center=True).S[0] < 1e-10


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_an_input_refused_after_a_pass_keeps_no_checkpoint_to_resume(tmp_path, matrix,
                                                                     method):
    """Found too small for float64 once its passes are done: resumed, the same input fails
    the same way, so its passes are not kept, and the error does not offer them."""
    out = str(tmp_path / "result.zarr")
    with pytest.raises(NonFiniteError, match="too small for float64") as refused:
        ooc_svd.svd(matrix * 1e-200, 3, method=method, out=out)
    assert not hasattr(refused.value, "kept_checkpoint")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "krylov"])
@pytest.mark.parametrize("sparse", [False, True])
def test_a_squared_norm_that_overflows_only_in_total_is_named(method, sparse):
    """Entries of 3e151 square to 9e302: a sub-block's sum is finite, the matrix's (2.7e308)
    is not. Left unchecked, the residual came out NaN (or Z overflowed into an unnamed
    error), depending on how the blocks fell."""
    A = np.full((30_000, 10), 3e151)
    A[::2] *= -1
    if sparse:
        A = scipy.sparse.csr_matrix(A)
    with pytest.raises(NonFiniteError, match="Frobenius norm .*overflows float64.*rescale"):
        ooc_svd.svd(A, 3, method=method)
    ooc_svd.svd(A / 2, 3, method=method)  # a total of 6.8e307 is fine


def test_missing_and_unreadable_stores(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no such file or store"):
        ooc_svd.svd(str(tmp_path / "absent.zarr"), 2)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreNotFoundError, match="cannot open"):
        ooc_svd.svd(str(tmp_path / "junk"), 2)
    (tmp_path / "junk.npy").write_bytes(bytes(range(256)))
    with pytest.raises(StoreNotFoundError, match="is not a .npy file"):
        ooc_svd.svd(str(tmp_path / "junk.npy"), 2)
    # Files that convert reads are named as such, others as no input at all
    for name, kind in (("A.mtx", "a Matrix Market file"), ("A.mtx.gz", "a Matrix Market file"),
                       ("A.h5ad", "an HDF5 file")):
        (tmp_path / name).write_text("%%MatrixMarket")
        with pytest.raises(StoreNotFoundError, match=f"is {kind}, which is read through a CSR "
                                                     r"store: convert it first \(ooc-svd"):
            ooc_svd.svd(str(tmp_path / name), 2)
    (tmp_path / "A.csv").write_text("1,2\n3,4\n")
    with pytest.raises(StoreNotFoundError, match="is a file that is neither .npy nor .npz"):
        ooc_svd.svd(str(tmp_path / "A.csv"), 2)


def test_a_store_an_ooc_svd_command_left_unfinished_is_refused(tmp_path):
    """What a command that stopped left under PATH.partial lacks the chunks it had not
    written, which would read as zeros."""
    import zarr

    from ooc_svd.convert import convert, from_scipy
    from ooc_svd.store import UNFINISHED

    A = scipy.sparse.random(50, 8, density=0.3, random_state=0, format="csr")
    from_scipy(A, tmp_path / "sparse.zarr")
    zarr.create_array(str(tmp_path / "dense.zarr"), data=np.ones((50, 8)))
    for name in ("sparse.zarr", "dense.zarr"):
        path = str(tmp_path / name)
        assert ooc_svd.svd(path, 2).S.shape == (2,)  # finished, it is read
        zarr.open(path, mode="r+").attrs[UNFINISHED] = "converted"
        message = "is unfinished: ooc-svd convert stopped while it wrote it, .* run " \
                  "ooc-svd convert again"
        for opened in (path, zarr.open(path, mode="r")):
            with pytest.raises(InputError, match=message):
                ooc_svd.svd(opened, 2)
        with pytest.raises(InputError, match=message):
            convert(path, tmp_path / "out.zarr", transpose=True)


def test_a_group_is_not_a_matrix(tmp_path):
    import zarr

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("A_index", shape=(10,), dtype="i8")  # listed first, not a matrix
    group.create_array("X", shape=(10, 4), dtype="f8")
    group.create_group("layers")
    with pytest.raises(InputError, match=r"not an array or a CSR matrix \(its arrays: "
                                         r"\[.A_index., .X.\]; its groups: \[.layers.\]\); "
                                         r"pass the path of the array or CSR group, e.g. "
                                         r".*g.zarr/X$"):
        ooc_svd.svd(str(tmp_path / "g.zarr"), 2)


def test_corrupt_chunk_names_the_rows(zarr_matrix, matrix):
    path = zarr_matrix(matrix, chunk_rows=100)
    chunk = os.path.join(path, "c", "2", "0")
    with open(chunk, "r+b") as file:
        file.truncate(20)
    with pytest.raises(ReadError, match=r"chunk of rows \[200, 300\) .*Zstd decompression"):
        ooc_svd.svd(path, 3, memory_limit="4MB", method="randomized")


def test_a_run_failing_before_its_checkpoint_removes_the_directories_made_for_it(
    tmp_path, monkeypatch
):
    def unreachable(*args):
        raise InputError("cannot reach the scheduler")

    monkeypatch.setattr(ooc_svd.api, "_connect_cluster", unreachable)
    (tmp_path / "runs").mkdir()
    A = np.random.default_rng(0).standard_normal((200, 10))
    with pytest.raises(InputError, match="cannot reach the scheduler"):
        ooc_svd.svd(A, 2, checkpoint=str(tmp_path / "runs" / "today" / "late" / "state"))
    assert [path.name for path in tmp_path.rglob("*")] == ["runs"]  # it was there before


def test_a_bad_backend_leaves_no_output_or_checkpoint(tmp_path):
    A = np.random.default_rng(0).standard_normal((200, 10))
    out = tmp_path / "r.zarr"
    with pytest.raises(InputError, match="backend must be 'auto', 'cpu' or 'cuda'"):
        ooc_svd.svd(A, 3, out=str(out), backend="gpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("options", "message"), [
    ({"accumulate": "float16"}, r"cuda_options\['accumulate'\] must be one of"),
    ({"csr_transposed": "atomic"}, r"cuda_options\['csr_transposed'\] must be one of"),
    ({"streams": 0}, r"cuda_options\['streams'\]=0 must be >= 1"),
    ({"streams": True}, r"cuda_options\['streams'\] must be an integer"),
    ({"tile": 4}, "unknown cuda option 'tile'"),
    (["accumulate"], "cuda_options must be a dict"),
])
def test_bad_cuda_options_are_refused_before_any_work(tmp_path, options, message):
    """Checked without a GPU, whatever the backend, and before the output is made."""
    A = np.random.default_rng(0).standard_normal((200, 10))
    out = tmp_path / "r.zarr"
    with pytest.raises(InputError, match=message):
        ooc_svd.svd(A, 3, out=str(out), cuda_options=options)
    assert list(tmp_path.iterdir()) == []


def test_cuda_options_with_the_cpu_backend_are_a_mistake():
    A = np.random.default_rng(0).standard_normal((200, 10))
    with pytest.raises(InputError, match="cuda_options apply to the cuda backend"):
        ooc_svd.svd(A, 3, backend="cpu", cuda_options={"accumulate": "float32"})
    # On 'auto' they wait for a GPU; without one the run is the CPU's.
    result = ooc_svd.svd(A, 3, backend="auto", cuda_options={"streams": 3})
    assert result.backend in ("cpu", "cuda")
    if result.backend == "cpu":  # and the plan says that they were not used
        assert result.plan.backend_reason.endswith("; the cuda_options are unused")


def test_absent_chunks_and_a_zero_matrix_are_noted(tmp_path):
    """zarr reads a chunk never written as its fill value: the note counts those chunks,
    and says when every value read was zero (or every row the mean)."""
    import zarr

    path = str(tmp_path / "A.zarr")
    array = zarr.create_array(path, shape=(1000, 20), chunks=(100, 20), dtype="f4")
    empty = ooc_svd.svd(path, 3)
    assert np.all(empty.S == 0) and "every value of A read as zero" in empty.note
    assert "10 of the 10 storage chunks" in empty.note
    array[:500] = np.random.default_rng(0).standard_normal((500, 20))
    half = ooc_svd.svd(path, 3)
    assert "5 of the 10 storage chunks" in half.note and "read as zero" not in half.note
    array[:] = 1.0
    constant = ooc_svd.svd(path, 3, center=True)
    assert constant.note == "every row of A read as the mean: A - 1 mu^T is zero"
    rank_one = ooc_svd.svd(path, 1)  # every chunk written; gram's residual is its rounding
    assert rank_one.note.startswith("the residual ") and "chunks" not in rank_one.note
    sharded = zarr.create_array(str(tmp_path / "S.zarr"), shape=(1000, 20), chunks=(50, 20),
                                shards=(200, 20), dtype="f4")
    sharded[:400] = 1.0
    assert "3 of the 5 shards (files of storage chunks)" in ooc_svd.svd(sharded, 1).note
