"""A^T of dense matrices on disk (``ooc-svd convert --transpose``): exact against numpy for
every input kind and chunking, chunks written whole within the memory limit, refusals, and
the SVD of a wide A through its transpose."""

import os
import warnings

import dask.array as da
import numpy as np
import pytest
import zarr
from naive import truncated_svd
from test_convert import ooc_svd_command

import ooc_svd
from ooc_svd.convert import convert
from ooc_svd.dense_transpose import RUN_TARGET_BYTES, plan_layout, transpose_dense
from ooc_svd.errors import InputError, OutputExistsError, PlanError
from ooc_svd.sources.dense import open_dense_source
from ooc_svd.sources.dtypes import first_rounded_integer


def matrix(m, n, dtype="float64", seed=0):
    values = np.random.default_rng(seed).standard_normal((m, n)) * 100
    return values.astype(dtype)


def write_input(tmp_path, A, kind, chunks=None):
    """A stored as ``kind``: 'zarr' (v3, ``chunks``), 'zarr2', 'npy', 'fortran' (a column-
    ordered .npy), 'npz' (uncompressed) or 'npz-compressed'. Returns its path."""
    if kind in ("zarr", "zarr2"):
        path = str(tmp_path / "A.zarr")
        native = A.astype(A.dtype.newbyteorder("="))
        zarr.create_array(path, data=native, chunks=chunks or A.shape,
                          zarr_format=3 if kind == "zarr" else 2)
        return path
    if kind in ("npy", "fortran"):
        path = str(tmp_path / "A.npy")
        np.save(path, np.asfortranarray(A) if kind == "fortran" else A)
        return path
    path = str(tmp_path / "A.npz")
    (np.savez if kind == "npz" else np.savez_compressed)(path, A=A)
    return path


@pytest.mark.parametrize("limit", ["1GB", "1MB"])
@pytest.mark.parametrize(("kind", "chunks"), [
    ("zarr", (16, 1001)),  # chunks of whole rows, ragged at the end
    ("zarr", (7, 90)),  # chunks in two dimensions, ragged both ways
    ("zarr", (1, 1001)),
    ("zarr2", (10, 300)),
    ("npy", None), ("fortran", None), ("npz", None), ("npz-compressed", None),
])
def test_transpose_is_exact_for_every_input(tmp_path, kind, chunks, limit):
    A = matrix(45, 1001, seed=1)
    out = transpose_dense(write_input(tmp_path, A, kind, chunks), tmp_path / "At.zarr",
                          memory_limit=limit)
    np.testing.assert_array_equal(out[:], A.T)
    assert out.dtype == A.dtype and out.attrs["ooc_svd_source"]["transposed"] is True


def test_many_bands_and_strips_are_exact(tmp_path):
    A = matrix(45, 1001, seed=4)
    path = write_input(tmp_path, A, "zarr", (7, 90))
    layout = plan_layout(open_dense_source(path), np.dtype("f8"), 150_000)
    assert layout.band_rows < 45 and layout.strip_columns < 1001  # several of each
    out = transpose_dense(path, tmp_path / "At.zarr", memory_limit=150_000)
    np.testing.assert_array_equal(out[:], A.T)
    assert out.chunks == (layout.chunk_rows, layout.band_rows)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("kind", ["npy", "npz"])
@pytest.mark.parametrize("limit", [1 << 30, 150_000])  # all of A at once, or strips of it
def test_a_file_is_read_from_the_file_not_its_mapping(tmp_path, monkeypatch, order, kind,
                                                      limit):
    """Pages read through the mapping stay in the process: RSS grew to the whole file
    (924 MB for an 800 MB column-ordered .npy at a 100 MB limit). Strips are read a run of
    the file (a row's columns, or a column's rows) at a time."""
    A = np.asarray(matrix(45, 1001, seed=5), order=order)
    path = write_input(tmp_path, A, kind)  # an .npz's member is stored, and mapped
    source = open_dense_source(path)
    assert isinstance(source.array, np.memmap) and source.array.flags[f"{order}_CONTIGUOUS"]
    layout = plan_layout(source, np.dtype("f8"), limit)
    assert (layout.strip_columns == 1001) == (limit == 1 << 30)

    def through_the_mapping(*args):
        raise AssertionError("read through the mapping")

    monkeypatch.setattr(np.memmap, "__getitem__", through_the_mapping)
    out = transpose_dense(path, tmp_path / "At.zarr", memory_limit=limit)
    monkeypatch.undo()
    np.testing.assert_array_equal(out[:], A.T)


@pytest.mark.parametrize(("stored", "requested", "expected"), [
    (">f8", None, "<f8"),  # native byte order, the values unchanged
    ("int16", None, "int16"),  # integers stay integers
    ("float16", None, "float16"),
    ("float64", "float32", "float32"),
    ("uint8", "float64", "float64"),
])
def test_values_keep_their_dtype_unless_one_is_asked_for(tmp_path, stored, requested, expected):
    A = matrix(30, 200, stored if np.dtype(stored).kind == "f" else "float64", seed=2)
    A = np.clip(A, 0, 255).astype(stored) if np.dtype(stored).kind in "iu" else A
    out = transpose_dense(write_input(tmp_path, A, "npy"), tmp_path / "At.zarr", dtype=requested,
                          memory_limit="100kB")
    assert out.dtype == np.dtype(expected)
    np.testing.assert_array_equal(out[:], A.T.astype(expected))


@pytest.mark.parametrize("order", ["C", "F"])
def test_a_file_is_read_in_strips_that_keep_its_chunks_tall(tmp_path, order):
    """A^T's chunks are as tall (A's rows) as the limit holds a strip of the least width:
    read whole rows at a time, they shrank with the square of the limit (4.7 kB chunks, a
    15-fold longer convert, for a 1.6 GB .npy at 20 MB). A row-ordered file's strip holds
    runs of at least RUN_TARGET_BYTES of each row, each a read."""
    shape, limit = (400, 50_000), 2_000_000
    np.lib.format.open_memmap(tmp_path / "A.npy", mode="w+", dtype="f4", shape=shape,
                              fortran_order=order == "F").flush()  # its values unread
    layout = plan_layout(open_dense_source(str(tmp_path / "A.npy")), np.dtype("f4"), limit)
    assert layout.peak_bytes <= limit
    assert layout.band_rows * shape[1] * 4 > limit  # taller than a band of whole rows
    assert layout.strip_columns % layout.chunk_rows == 0
    least = RUN_TARGET_BYTES // 4 if order == "C" else 1
    assert least <= layout.strip_columns < shape[1]


@pytest.mark.parametrize(("shape", "chunks", "limit"), [
    ((300, 20_000), (40, 20_000), 20_000_000),
    ((300, 20_000), (40, 3_000), 5_000_000),
    ((300, 20_000), (40, 7), 2_000_000),
    ((2_000, 50), (64, 50), 10**9),
])
def test_the_layout_writes_whole_chunks_within_the_limit(tmp_path, shape, chunks, limit):
    """Bands are whole row chunks of A; strips whole column chunks of A and whole row chunks
    of A^T (which a multiple or a divisor of A's column chunks makes possible), so that
    every chunk of A is read once and every chunk of A^T written once; the predicted working
    set fits the limit."""
    zarr.create_array(str(tmp_path / "A.zarr"), shape=shape, chunks=chunks, dtype="float32")
    layout = plan_layout(open_dense_source(str(tmp_path / "A.zarr")), np.dtype("f4"), limit)
    assert layout.peak_bytes <= limit
    assert layout.band_rows % chunks[0] == 0 or layout.band_rows == shape[0]
    assert layout.strip_columns % chunks[1] == 0 or layout.strip_columns == shape[1]
    assert layout.strip_columns % layout.chunk_rows == 0 or layout.strip_columns == shape[1]
    assert layout.chunk_rows % chunks[1] == 0 or chunks[1] % layout.chunk_rows == 0 or \
        chunks[1] >= shape[1]


def test_a_nan_among_integers_held_as_floats_is_not_a_rounded_integer():
    data = np.array([3.0, np.nan, np.inf, 2.0**25 + 1, 5.0])
    assert first_rounded_integer(data, data.astype(np.float32)) == 3


@pytest.mark.parametrize(("dtype", "big"), [("float32", 2**24 + 1), ("float64", 2**53 + 1)])
def test_integers_a_float_dtype_rounds_are_warned_of(tmp_path, dtype, big):
    """As the CSR writer warns: integers beyond 2**24 (float32) or 2**53 (float64) are
    stored rounded."""
    A = np.arange(12, dtype=np.int64).reshape(3, 4)
    A[2, 1] = big
    path = write_input(tmp_path, A, "npy")
    bits = 24 if dtype == "float32" else 53
    with pytest.warns(RuntimeWarning, match=rf"integer values beyond 2\*\*{bits} are rounded in "
                                            rf"{dtype} \(the first, {big} of A\[2, 1\], is "
                                            rf"stored as {big - 1}\)"):
        out = transpose_dense(path, tmp_path / "At.zarr", dtype=dtype)
    assert out[1, 2] == big - 1
    A[2, 1] = 2**bits  # exactly held: no warning
    path = write_input(tmp_path, A, "zarr", (2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transpose_dense(path, tmp_path / "At2.zarr", dtype=dtype)


def test_values_float32_cannot_hold_are_refused_or_warned_of(tmp_path):
    A = np.ones((6, 9))
    A[2, 7] = 1e-50
    path = write_input(tmp_path, A, "npy")
    with pytest.warns(RuntimeWarning, match=r"values too small for float32 are stored as "
                                            r"zero \(the first, 1e-50 of "
                                            r"A\[2, 7\]\)"):
        out = transpose_dense(path, tmp_path / "At.zarr", dtype="float32")
    assert out[7, 2] == 0 and out[:].sum() == 53
    A[4, 1] = -1e39
    path = write_input(tmp_path, A, "zarr", (2, 9))
    with pytest.raises(InputError, match=r"the value -1e\+39 of A\[4, 1\] lies beyond the "
                                         r"range of float32: store float64 values"):
        transpose_dense(path, tmp_path / "At2.zarr", dtype="float32")
    assert not os.path.exists(tmp_path / "At2.zarr")


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="longdouble is float64 on this platform")
def test_extended_precision_beyond_float64_is_named_as_it_is(tmp_path):
    A = np.ones((3, 4), dtype=np.longdouble)
    A[1, 3] = np.longdouble("1e4000")
    with pytest.raises(InputError, match=r"the value 1e\+4000 of A\[1, 3\] lies beyond the "
                                         r"range of float64: rescale the matrix"):
        transpose_dense(write_input(tmp_path, A, "npy"), tmp_path / "At.zarr")
    assert not os.path.exists(tmp_path / "At.zarr")


def test_a_chunk_over_the_limit_is_refused_with_the_numbers(tmp_path):
    path = write_input(tmp_path, matrix(100, 5000, "float32"), "zarr", (50, 5000))
    with pytest.raises(InputError, match=r"memory_limit 1 MB cannot hold .* 50 rows x 5000 "
                                         r"columns .*needs [0-9.]+ MB\): raise memory_limit"):
        transpose_dense(path, tmp_path / "At.zarr", memory_limit="1MB")
    assert not os.path.exists(tmp_path / "At.zarr")
    # A compressed .npz is loaded whole: that is what the limit cannot hold, and where it
    # alone exceeds the limit, it is not loaded
    compressed = write_input(tmp_path, matrix(100, 5000, "float32"), "npz-compressed")
    with pytest.raises(InputError, match=r"2 MB cannot hold .* 1 row x [0-9]+ columns, with "
                                         r"zarr's chunks in flight, and the input, loaded whole "
                                         r"\(2 MB\) \(needs 2\.[0-9]+ MB\): raise memory_limit; or "
                                         r"save the array uncompressed"):
        transpose_dense(compressed, tmp_path / "At.zarr", memory_limit="2.0001MB")
    with pytest.raises(PlanError, match=r"is a compressed .npz, which is loaded whole, and its "
                                        r"arrays alone take 2 MB, more than memory_limit 1 MB: "
                                        r"save the array uncompressed"):
        transpose_dense(compressed, tmp_path / "At.zarr", memory_limit="1MB")


def test_outputs_are_refused_as_other_conversions_are(tmp_path):
    path = write_input(tmp_path, matrix(20, 300), "zarr", (5, 300))
    with pytest.raises(InputError, match="overlaps the input"):
        transpose_dense(path, os.path.join(path, "At"))
    out = tmp_path / "At.zarr"
    transpose_dense(path, out)
    with pytest.raises(OutputExistsError, match="exists"):
        transpose_dense(path, out)
    B = matrix(20, 300, seed=5)
    again = transpose_dense(write_input(tmp_path, B, "npy"), out, overwrite=True)
    np.testing.assert_array_equal(again[:], B.T)  # a transpose ooc_svd wrote is replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("kept")
    with pytest.raises(OutputExistsError, match="not a CSR store or a transposed matrix"):
        transpose_dense(path, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "kept"


def test_inputs_that_are_not_dense_matrices_on_disk_are_refused(tmp_path):
    with pytest.raises(InputError, match="A.T is free"):
        transpose_dense(np.ones((3, 4)), tmp_path / "out.zarr")
    complex_path = tmp_path / "C.npy"
    np.save(complex_path, np.ones((3, 4), dtype=complex))
    with pytest.raises(InputError, match="complex"):
        transpose_dense(complex_path, tmp_path / "out.zarr")
    empty = tmp_path / "E.npy"
    np.save(empty, np.ones((0, 4)))
    with pytest.raises(InputError, match="empty"):
        transpose_dense(empty, tmp_path / "out.zarr")


def test_convert_writes_a_dense_matrix_only_transposed(tmp_path):
    A = matrix(10, 40)
    path = write_input(tmp_path, A, "zarr", (5, 40))
    with pytest.raises(InputError, match="only transposed"):
        convert(path, tmp_path / "out.zarr")
    with pytest.raises(InputError, match="chunk_nnz does not apply"):
        convert(path, tmp_path / "out.zarr", transpose=True, chunk_nnz=10)
    np.testing.assert_array_equal(convert(path, tmp_path / "out.zarr", transpose=True)[:], A.T)
    by_url = convert(f"file://{path}", tmp_path / "url.zarr", transpose=True)
    np.testing.assert_array_equal(by_url[:], A.T)
    npz = write_input(tmp_path, A, "npz")  # a dense .npz, not scipy.sparse's
    np.testing.assert_array_equal(convert(npz, tmp_path / "npz.zarr", transpose=True)[:], A.T)


def test_a_wide_store_refused_for_its_n_by_l_arrays_is_factored_through_its_transpose(tmp_path):
    """The refusal names the way out, and the run on A^T gives A's factors, swapped: the
    command line end to end, against numpy's SVD of A."""
    rng = np.random.default_rng(3)
    A = ((rng.standard_normal((60, 8)) * np.exp(-0.5 * np.arange(8))) @
         rng.standard_normal((8, 40_000)) + 1e-3 * rng.standard_normal((60, 40_000)))
    path = write_input(tmp_path, A.astype(np.float32), "zarr", (20, 10_000))
    refused = ooc_svd_command("info", path, "--k", "5", "--memory-limit", "20MB")
    assert refused.returncode == 2
    assert "or factor A^T (40000 x 60) instead" in refused.stderr
    assert "ooc-svd convert --transpose writes it" in refused.stderr
    At = tmp_path / "At.zarr"
    done = ooc_svd_command("convert", path, At, "--transpose", "--memory-limit", "20MB")
    assert done.returncode == 0, done.stderr
    assert f"wrote {At}: 40000 x 60 float32 dense" in done.stdout
    result = tmp_path / "result.zarr"
    ran = ooc_svd_command("run", At, "--k", "5", "--memory-limit", "20MB", "--out", result,
                          "--quiet")
    assert ran.returncode == 0, ran.stderr
    U_ref, S_ref, V_ref = truncated_svd(A.astype(np.float32), 5)
    group = zarr.open_group(str(result), mode="r")
    np.testing.assert_allclose(group["S"][:], S_ref, rtol=1e-4)
    for ours, reference in ((group["V"][:], U_ref), (group["U"][:], V_ref)):
        cosines = np.linalg.svd(ours.T.astype(np.float64) @ reference, compute_uv=False)
        assert cosines.min() > 1 - 1e-4


def test_the_refusal_says_how_a_transpose_is_had_for_each_input(tmp_path):
    A = np.zeros((10, 2_000_000), np.float32)
    np.save(tmp_path / "A.npy", A)
    hints = {}
    for name, given in (("npy", str(tmp_path / "A.npy")), ("numpy", A),
                        ("dask", da.from_array(A, chunks=(5, 2_000_000)))):
        with pytest.raises(PlanError) as refused:
            ooc_svd.svd_plan(given, k=5, memory_limit="100MB")
        hints[name] = str(refused.value)
    assert hints["npy"].endswith("(ooc-svd convert --transpose writes it)")
    assert hints["numpy"].endswith("instead, whose U and V are V and U here")
    assert "factor A^T" not in hints["dask"]
