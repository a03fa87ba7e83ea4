"""Converters to the CSR layout on zarr: exact round trips against scipy, bounded-memory paths,
refusals, the ``convert`` and ``generate --density`` commands, and the sparse generator."""

import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import zarr

import ooc_svd
from ooc_svd.convert import convert, from_h5ad, from_mtx, from_npz, from_scipy, from_zarr
from ooc_svd.errors import InputError, OutputExistsError, StoreNotFoundError
from ooc_svd.float_parse import parse_float
from ooc_svd.sources.csr import open_csr_group
from ooc_svd.synthetic import write_sparse_matrix

SCRIPT = os.path.join(os.path.dirname(sys.executable), "ooc-svd")
# Small budgets so that every path runs over many blocks, chunks and buckets.
SMALL = {"memory_limit": "2MB", "chunk_nnz": 1000}


def read_back(group):
    """The stored matrix as scipy CSR, through the reader the SVD uses."""
    source = open_csr_group(group, "converted")
    return source.read(0, source.shape[0]).to_scipy()


def assert_same_csr(got, expected, dtype=None):
    """Same shape, structure (sorted columns, summed duplicates) and values, exactly."""
    expected = sp.csr_matrix(expected)
    expected.sum_duplicates()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data.astype(got.dtype))
    if dtype is not None:
        assert got.dtype == dtype


def with_gaps(m=600, n=90, density=0.05, seed=0, dtype=np.float64):
    """Random sparse rows with an all-empty range of rows and trailing empty rows."""
    rng = np.random.default_rng(seed)
    A = sp.random(m, n, density=density, format="lil", random_state=rng, dtype=np.float64)
    A[200:320] = 0
    A[-15:] = 0
    A = A.tocsr()
    A.data = (A.data * 100).astype(dtype) if np.dtype(dtype).kind in "iu" else A.data.astype(dtype)
    return A


# ---------------------------------------------------------------- scipy objects and .npz


@pytest.mark.parametrize(
    "build, dtype",
    [
        (lambda: with_gaps(), np.float64),                       # csr, float64 kept
        (lambda: with_gaps(dtype=np.float32).tocsc(), np.float32),  # csc: converted to csr
        (lambda: with_gaps(dtype=np.int64).tocoo(), np.float32),  # integers become float32
        (lambda: sp.csr_array(with_gaps(seed=1)), np.float64),   # sparse arrays too
        (lambda: sp.csr_matrix(([2.5], ([3], [7])), shape=(5, 9)), np.float64),  # one non-zero
        (lambda: sp.csr_matrix((7, 4)), np.float64),             # no non-zeros at all
    ],
)
def test_from_scipy_round_trips_exactly(tmp_path, build, dtype):
    A = build()
    group = from_scipy(A, tmp_path / "A.zarr", **SMALL)
    assert_same_csr(read_back(group), A, dtype)


def test_from_scipy_sorts_and_sums_without_touching_the_input(tmp_path):
    indptr = np.array([0, 3, 3, 5], dtype=np.int64)  # int64 indices as well
    indices = np.array([4, 1, 4, 2, 0], dtype=np.int64)
    data = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    A = sp.csr_matrix((data, indices, indptr), shape=(3, 6))
    group = from_scipy(A, tmp_path / "A.zarr")
    got = read_back(group)
    np.testing.assert_array_equal(got.indices, [1, 4, 0, 2])
    np.testing.assert_array_equal(got.data, [2.0, 4.0, 5.0, 4.0])
    np.testing.assert_array_equal(A.indices, [4, 1, 4, 2, 0])  # unchanged
    assert group["indices"].dtype == np.int32 and group["indptr"].dtype == np.int64


@pytest.mark.parametrize("layout", ["csr", "csc", "coo", "bsr"])
@pytest.mark.parametrize("compressed", [True, False])
def test_from_npz_matches_load_npz(tmp_path, layout, compressed):
    A = with_gaps(m=3000, n=400, density=0.02, seed=2, dtype=np.float32).asformat(layout)
    if layout == "coo":  # out of row order, as a COO may be
        order = np.random.default_rng(2).permutation(A.nnz)
        A = sp.coo_matrix((A.data[order], (A.row[order], A.col[order])), shape=A.shape)
    path = tmp_path / "A.npz"
    sp.save_npz(path, A, compressed=compressed)
    group = from_npz(path, tmp_path / "A.zarr", **SMALL)
    assert_same_csr(read_back(group), sp.load_npz(path), np.float32)
    source = group.attrs["ooc_svd_source"]
    assert source["row_sorted"] is (layout in ("csr", "bsr"))
    if layout in ("csc", "coo"):
        assert source["buckets"] > 1


def test_store_opens_as_a_csr_source_with_anndata_attributes(tmp_path):
    A = with_gaps(seed=3)
    group = convert(A, tmp_path / "A.zarr")
    assert group.attrs["encoding-type"] == "csr_matrix"
    assert group.attrs["encoding-version"] == "0.1.0"
    assert list(group.attrs["shape"]) == [600, 90]
    reopened = zarr.open_group(str(tmp_path / "A.zarr"), mode="r")
    source = open_csr_group(reopened, "A.zarr")
    assert source.shape == (600, 90) and source.nnz == A.nnz
    assert not os.path.exists(tmp_path / "A.zarr.partial")


def test_overwrite_replaces_only_a_csr_store_written_here(tmp_path):
    A, B = with_gaps(seed=4), with_gaps(seed=5)
    theirs = write_zarr_sparse(tmp_path / "theirs.zarr", A)  # AnnData's layout, not ours
    with pytest.raises(OutputExistsError,
                       match="is not a CSR store or a transposed matrix ooc_svd wrote"):
        from_scipy(B, theirs, overwrite=True)
    assert_same_csr(read_back(zarr.open_group(theirs, mode="r")), A)
    # Written before the ooc_svd_csr mark: known by the provenance convert recorded
    zarr.open_group(theirs, mode="r+").attrs["ooc_svd_source"] = {"input": "A.mtx"}
    assert_same_csr(read_back(from_scipy(B, theirs, overwrite=True)), B)
    # A generator replaces only what it generated
    with pytest.raises(OutputExistsError, match="is not a matrix ooc_svd generated"):
        write_sparse_matrix(theirs, (50, 20), density=0.1, overwrite=True)
    assert_same_csr(read_back(zarr.open_group(theirs, mode="r")), B)
    mtx = tmp_path / "A.mtx"
    scipy.io.mmwrite(mtx, A)
    with pytest.raises(InputError, match="is named as a Matrix Market file"):  # or overlaps
        convert(mtx, mtx, overwrite=True)
    with pytest.raises(InputError, match="overlaps the input"):
        convert(theirs, theirs, overwrite=True)
    assert scipy.io.mmread(mtx).nnz == A.nnz


@pytest.mark.parametrize("layout", ["bsr", "dia", "coo"])
def test_an_npz_that_scipy_loads_whole_is_not_overwritten_by_its_own_output(tmp_path, layout):
    """BSR, DIA and a COO of coords go through scipy's load_npz: the output may still not
    lie around the input, which overwrite would remove with it."""
    store = str(tmp_path / "A.zarr")
    from_scipy(with_gaps(seed=3), store)
    A = scipy.sparse.random(20, 20, density=0.2, format=layout, rng=1)
    if layout == "coo":
        A = scipy.sparse.coo_array(A)  # saved with coords, not row and col
    inside = os.path.join(store, "in.npz")
    scipy.sparse.save_npz(inside, A)
    with pytest.raises(InputError, match="overlaps the input"):
        convert(inside, store, overwrite=True)
    assert_same_csr(scipy.sparse.load_npz(inside).tocsr(), A.tocsr())
    group = convert(inside, tmp_path / "B.zarr")
    assert group.attrs["ooc_svd_source"]["input"] == inside
    assert_same_csr(read_back(group), A.tocsr(), np.float64)


def test_a_scratch_dir_inside_the_input_is_refused(tmp_path):
    path = write_zarr_sparse(tmp_path / "A.zarr", with_gaps(seed=17), layout="csc")
    with pytest.raises(InputError, match="scratch_dir .* overlaps the input"):
        convert(path, tmp_path / "B.zarr", scratch_dir=path)
    assert sorted(os.listdir(tmp_path)) == ["A.zarr"]


def test_a_store_appearing_at_out_during_a_conversion_is_kept(tmp_path):
    from ooc_svd.sources.csr import CSRWriter

    out = tmp_path / "A.zarr"
    with pytest.raises(OutputExistsError, match="appeared while the output was written"), \
            CSRWriter(out, 90, overwrite=True) as writer:
        writer.append(with_gaps(seed=6))
        out.mkdir()
        (out / "notes.txt").write_text("kept")
        writer.close()
    assert os.listdir(out) == ["notes.txt"]
    kept = zarr.open_group(str(out) + ".partial", mode="r")
    assert_same_csr(read_back(kept), with_gaps(seed=6))
    assert "ooc_svd_csr" in kept.attrs and "ooc_svd_unfinished" not in kept.attrs


def test_existing_output_is_refused_and_kept(tmp_path):
    A, B = with_gaps(seed=4), with_gaps(seed=5)
    out = tmp_path / "A.zarr"
    from_scipy(A, out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        from_scipy(B, out)
    assert_same_csr(read_back(zarr.open_group(str(out), mode="r")), A)
    assert_same_csr(read_back(from_scipy(B, out, overwrite=True)), B)
    result = tmp_path / "result.zarr"  # a store of another kind is not replaced
    ooc_svd.svd(A, 2, out=result)
    with pytest.raises(OutputExistsError, match="is not a CSR store"):
        from_scipy(B, result, overwrite=True)
    assert sorted(os.listdir(result)) == ["S", "U", "V", "zarr.json"]


# ---------------------------------------------------------------- Matrix Market


def write_mtx(path, lines, header="real general", shape=None):
    m, n = shape
    text = [f"%%MatrixMarket matrix coordinate {header}", "% a comment", f"{m} {n} {len(lines)}"]
    path.write_text("\n".join(text + lines) + "\n")
    return path


def test_mtx_row_sorted_file_streams_in_one_pass(tmp_path):
    A = with_gaps(m=3000, n=400, density=0.02, seed=6)
    path = tmp_path / "A.mtx"
    scipy.io.mmwrite(path, A.tocoo())  # rows in order: csr -> coo keeps them
    group = from_mtx(path, tmp_path / "A.zarr", **SMALL)
    assert group.attrs["ooc_svd_source"]["row_sorted"] is True
    assert_same_csr(read_back(group), scipy.io.mmread(path), np.float64)


def test_mtx_unsorted_file_is_bucketed(tmp_path):
    A = sp.random(3000, 400, density=0.02, format="coo", random_state=7)
    order = np.random.default_rng(7).permutation(A.nnz)
    A = sp.coo_matrix((A.data[order], (A.row[order], A.col[order])), shape=A.shape)
    path = tmp_path / "A.mtx"
    scipy.io.mmwrite(path, A)
    group = from_mtx(path, tmp_path / "A.zarr", **SMALL)
    source = group.attrs["ooc_svd_source"]
    assert source["row_sorted"] is False and source["buckets"] > 2
    assert_same_csr(read_back(group), scipy.io.mmread(path), np.float64)


def test_convert_of_a_dense_array_says_it_needs_none(tmp_path):
    with pytest.raises(InputError, match="not ndarray \\(a dense array needs no conversion"):
        convert(np.ones((3, 3)), tmp_path / "out.zarr")


def test_a_killed_bucketed_convert_leaves_no_scratch_after_the_next(tmp_path):
    """A convert killed while bucketing (no chance to clean up) left its bucket files in
    the scratch directory; the next convert to the same output removes them with the
    killed one's partial output, which recorded where they were."""
    A = sp.random(3000, 400, density=0.02, format="coo", random_state=7)
    order = np.random.default_rng(7).permutation(A.nnz)
    A = sp.coo_matrix((A.data[order], (A.row[order], A.col[order])), shape=A.shape)
    path, out, scratch = tmp_path / "A.mtx", tmp_path / "A.zarr", tmp_path / "scratch"
    scipy.io.mmwrite(path, A)
    scratch.mkdir()
    killed = ("import os, ooc_svd.coordinates as c\n"
              "c._write_bucket = lambda *args: os._exit(9)  # killed, no clean-up\n"
              "from ooc_svd.convert import from_mtx\n"
              f"from_mtx({str(path)!r}, {str(out)!r}, scratch_dir={str(scratch)!r}, "
              f"**{SMALL!r})\n")
    done = subprocess.run([sys.executable, "-c", killed], capture_output=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert [p.name[:16] for p in scratch.iterdir()] == ["ooc-svd-buckets-"]
    group = from_mtx(path, out, scratch_dir=scratch, **SMALL)
    assert list(scratch.iterdir()) == [] and ".ooc-svd-scratch" not in os.listdir(out)
    assert_same_csr(read_back(group), scipy.io.mmread(path), np.float64)


@pytest.mark.parametrize(
    "case",
    [
        "skewed",  # 90% of the entries in 100 rows: buckets over the budget are split again
        "late",  # in row order but for the last entries: the one-pass attempt is abandoned
    ],
)
def test_mtx_bucketing_edge_cases_stay_exact(tmp_path, case):
    rng = np.random.default_rng(15)
    m, n, k = 20000, 300, 40000
    rows = np.where(rng.random(k) < 0.9, rng.integers(0, 100, k), rng.integers(0, m, k))
    if case == "late":
        rows = np.sort(rows)
        rows[-3:] = [5, 0, 17]
    A = sp.coo_matrix((rng.standard_normal(k), (rows, rng.integers(0, n, k))), shape=(m, n))
    path = tmp_path / "A.mtx"
    scipy.io.mmwrite(path, A)
    group = from_mtx(path, tmp_path / "A.zarr", **SMALL)
    source = group.attrs["ooc_svd_source"]
    assert source["row_sorted"] is False and source["buckets"] > (10 if case == "skewed" else 1)
    assert_same_csr(read_back(group), scipy.io.mmread(path), np.float64)


def test_mtx_duplicates_long_rows_and_unsorted_columns(tmp_path):
    rng = np.random.default_rng(8)
    long_row = [f"2 {j} {j % 7 + 1}" for j in rng.permutation(np.arange(1, 3001))]
    lines = ["1 5 1.5", "1 2 1", "1 5 2.25", *long_row, "2 17 4", "5 1 -3"]
    path = write_mtx(tmp_path / "A.mtx", lines, "real general", (9, 3000))
    group = from_mtx(path, tmp_path / "A.zarr", memory_limit="1.2MB", chunk_nnz=100)
    assert group.attrs["ooc_svd_source"]["row_sorted"] is True
    assert_same_csr(read_back(group), scipy.io.mmread(path), np.float64)
    assert read_back(group)[0, 4] == 3.75 and read_back(group)[1, 16] == 8


@pytest.mark.parametrize("header", ["real symmetric", "real skew-symmetric", "real hermitian",
                                    "pattern general", "pattern symmetric", "integer symmetric"])
def test_mtx_symmetry_and_pattern_match_mmread(tmp_path, header):
    lines = ["1 1 2.5", "3 1 -1", "4 2 7", "4 4 1e-3", "5 3 0.25", "3 1 1"]
    if "skew" in header:
        lines = [line for line in lines if line.split()[0] != line.split()[1]]
    if "pattern" in header:
        lines = [" ".join(line.split()[:2]) for line in lines]
    if "integer" in header:
        lines = [f"{line.rsplit(' ', 1)[0]} {i - 3}" for i, line in enumerate(lines)]
    path = write_mtx(tmp_path / "A.mtx", lines, header, (5, 5))
    expected_dtype = np.float64 if header.startswith("real") else np.float32
    assert_same_csr(read_back(from_mtx(path, tmp_path / "A.zarr")), scipy.io.mmread(path),
                    expected_dtype)


def test_mtx_values_parse_like_python(tmp_path):
    values = ["1", "-0", "0.1", "-2.5e-3", "1E+10", "6.02214076e23", "4.9e-324",
              "1.7976931348623157e308", "2.2250738585072011e-308", ".5", "7.",
              "0.30000000000000004441", "123456789012345678901234567890",  # > 19 digits
              "  3.25\t", "1.0D+01", "-2.5d-3", "12345678901234567890123D-2"]  # Fortran's
    lines = [f"{i + 1} 1 {value}" for i, value in enumerate(values)]
    path = write_mtx(tmp_path / "A.mtx", lines, "real general", (len(values), 1))
    got = read_back(from_mtx(path, tmp_path / "A.zarr")).toarray().ravel()
    np.testing.assert_array_equal(got, [float(v.replace("d", "e").replace("D", "e"))
                                        for v in values])


def test_float_parser_rounds_like_python():
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 2**63, 20000, dtype=np.int64).view(np.float64)
    tokens = [repr(float(x)) for x in bits[np.isfinite(bits)]]
    tokens += [f"{rng.integers(1, 10**18)}e{rng.integers(-340, 310)}" for _ in range(5000)]
    # Digits that shift the exponent by more than any written one is allowed to be
    tokens += ["1" + "0" * 1_000_000 + "e-1000000", "0." + "0" * 1_000_000 + "1e1000000",
               "1e99999999999999999999", "1e-99999999999999999999"]
    for token in tokens:
        value, end, ok = parse_float(np.frombuffer(token.encode(), np.uint8), 0)
        assert ok and end == len(token) and value == float(token), token[:40]


def test_read_ahead_keeps_order_raises_in_place_and_stops_when_closed():
    from ooc_svd.threaded import read_ahead

    produced = []

    def items(fail_at=None):
        for i in range(1000):
            if i == fail_at:
                raise OSError("broken read")
            produced.append(i)
            yield i

    assert list(read_ahead(items())) == list(range(1000))
    produced.clear()
    stream = read_ahead(items())
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert len(produced) <= 6  # the producer stopped a few items ahead
    got = []
    with pytest.raises(OSError, match="broken read"):
        got.extend(read_ahead(items(fail_at=5)))
    assert got == [0, 1, 2, 3, 4]


def test_closing_read_ahead_ends_even_when_an_interrupt_left_the_queue_locked(monkeypatch):
    """Ctrl-C raised in the consumer just after it took the queue's lock can leave that lock
    held: closing the stream (what Ctrl-C does next) then must not wait on the queue."""
    import queue
    import threading

    import ooc_svd.threaded

    class LeftLocked(queue.Queue):
        def get(self, *args, **kwargs):
            item = super().get(*args, **kwargs)
            self.mutex.acquire()  # as an interrupt between acquire and release leaves it
            return item

    monkeypatch.setattr(ooc_svd.threaded, "Queue", LeftLocked)
    monkeypatch.setattr(ooc_svd.threaded, "PRODUCER_STOP_S", 0.2)
    stream = ooc_svd.threaded.read_ahead(iter(range(1000)))
    assert next(stream) == 0
    closing = threading.Thread(target=stream.close, daemon=True)
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive()


def test_mtx_gzip_and_header_variations(tmp_path):
    A = with_gaps(m=300, n=40, seed=10)
    plain = tmp_path / "A.mtx"
    scipy.io.mmwrite(plain, A.tocoo())
    zipped = tmp_path / "A.mtx.gz"
    with open(plain, "rb") as source, gzip.open(zipped, "wb") as target:
        target.write(source.read().replace(b"\n", b"\r\n", 40))  # CRLF on some lines
    assert_same_csr(read_back(convert(zipped, tmp_path / "A.zarr")), A)


@pytest.mark.parametrize(
    "content, message",
    [
        ("%%MatrixMarket matrix array real general\n2 2\n1\n2\n3\n4\n", "dense"),
        ("%%MatrixMarket matrix coordinate complex general\n1 1 1\n1 1 1 0\n", "complex"),
        ("%%MatrixMarket matrix coordinate real skew-hermitian\n1 1 1\n1 1 1\n", "hermitian"),
        ("1 1 1\n", "not a Matrix Market file"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 2\n1 1 1\n2 x 1\n", "line 4"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 1\n1 4 1\n", r"column index \(4\)"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 1\n0 1 1\n", r"row index \(0\)"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 3\n1 1 1\n", "announces 3"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 1\n1 1 1\n2 2 2\n", "more entries"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 1\n1 1 abc\n", "line 3"),
        # Python's float() reads digit grouping; the format has none.
        ("%%MatrixMarket matrix coordinate real general\n3 3 2\n1 1 1\n2 2 2_5.0_1\n",
         "line 4"),
        ("%%MatrixMarket matrix coordinate integer general\n3 3 1\n1 1 1_000\n", "line 3"),
        ("%%MatrixMarket matrix coordinate integer general\n3 3 3\n1 1 2\n% note\n\n"
         "2 2 1.5\n3 3 1\n", "line 6: '2 2 1.5' holds a value that is not an integer"),
        ("%%MatrixMarket matrix coordinate integer general\n3 3 1\n1 1 nan\n",
         "line 3: '1 1 nan' holds a value that is not an integer"),
        ("%%MatrixMarket matrix coordinate integer general\n3 3 2\n1 1 3\n2 2 -inf\n",
         "line 4: '2 2 -inf' holds a value that is not an integer"),
        ("%%MatrixMarket matrix coordinate real general\n99999999999999999999 3 1\n1 1 1\n",
         "the size line '99999999999999999999 3 1' exceeds 2\\*\\*63 - 1"),
        ("%%MatrixMarket matrix coordinate real general\n3 -3 1\n1 1 1\n",
         r"the size line '3 -3 1' is not 'ROWS COLUMNS ENTRIES' \(three integers >= 0\)$"),
        ("%%MatrixMarket matrix coordinate real general\n3 3\n1 1 1\n",
         "the size line '3 3' is not"),
        ("%%MatrixMarket matrix coordinate real general\n+3 3 1\n1 1 1\n",
         "the size line '\\+3 3 1' is not"),
        ("%%MatrixMarket matrix coordinate real general\n3 3 0_1\n1 1 1\n",
         "the size line '3 3 0_1' is not"),
        ("%%MatrixMarket matrix coordinate pattern skew-symmetric\n3 3 1\n2 1\n",
         "a pattern matrix cannot be skew-symmetric"),
    ],
)
def test_mtx_refusals_name_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.mtx"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        from_mtx(path, tmp_path / "out.zarr")
    assert not any(p.name.startswith("out.zarr") for p in tmp_path.iterdir())


@pytest.mark.parametrize(("values", "dtype"), [
    ([100, 100, 7], np.int8), ([200, 100, 7], np.uint8), ([True, True, True], np.bool_),
    ([2.0**24, 1.0, 1.0], np.float32), ([1000.0, 60000.0, 0.5], np.float16)])
def test_repeated_columns_of_csr_input_are_summed_in_float64(tmp_path, values, dtype):
    """A CSR input's repeated columns are summed as COO and Matrix Market entries are, in
    float64: not in the input's dtype, where int8 wraps, a bool saturates, float32 rounds
    (and scipy refuses float16)."""
    import scipy.sparse

    data = np.array(values, dtype=dtype)
    unsorted = scipy.sparse.csr_matrix((data, [1, 1, 0], [0, 3, 3]), shape=(2, 3))
    path = tmp_path / "A.npz"
    scipy.sparse.save_npz(path, unsorted, compressed=False)
    summed = np.array(values, dtype=np.float64)
    expected = scipy.sparse.csr_matrix(([summed[2], summed[0] + summed[1]], [0, 1], [0, 2, 2]),
                                       shape=(2, 3))
    for source in (path, tmp_path / "A.zarr"):
        if source != path:  # the same rows as a zarr CSR group
            write_zarr_sparse(source, unsorted)
        group = convert(source, tmp_path / f"{source.stem}-{source.suffix[1:]}.zarr",
                        dtype="float64")
        assert_same_csr(read_back(group), expected, np.float64)


def test_an_indented_comment_before_the_size_line_is_a_comment(tmp_path):
    path = tmp_path / "A.mtx"
    path.write_text("%%MatrixMarket matrix coordinate real general\n  % indented note\n"
                    "\t%\n3 2 2\n1 1 5\n3 2 -1\n")
    expected = scipy.sparse.csr_matrix(([5.0, -1.0], ([0, 2], [0, 1])), shape=(3, 2))
    assert_same_csr(read_back(from_mtx(path, tmp_path / "A.zarr")), expected)


@pytest.mark.parametrize("source", ["mtx", "npz"])
def test_a_value_beyond_float32_is_refused_not_stored_as_inf(tmp_path, source):
    """Integer and pattern files become float32 by default, and --dtype float32 narrows
    float64: a finite value beyond float32's range would be stored as Inf, which the run
    would then report as bad data. (The integer file's 1e39, beyond 2**53, is also warned
    of as read to the nearest float64.)"""
    import contextlib

    import scipy.sparse

    from ooc_svd.convert import convert

    if source == "mtx":
        path = tmp_path / "A.mtx"
        path.write_text("%%MatrixMarket matrix coordinate integer general\n3 2 2\n"
                        "1 1 5\n3 2 1000000000000000000000000000000000000000\n")
        options = {}
    else:
        path = tmp_path / "A.npz"
        scipy.sparse.save_npz(path, scipy.sparse.csr_matrix(
            np.array([[5.0, 0.0], [0.0, 0.0], [0.0, 1e39]])))
        options = {"dtype": "float32"}
    def read_as_float64():
        if source == "npz":
            return contextlib.nullcontext()
        return pytest.warns(RuntimeWarning, match="holds an integer beyond 2\\*\\*53")

    with pytest.raises(InputError, match=r"the value 1e\+39 of row 2 lies beyond the range "
                                         r"of float32: store float64 values"), \
            read_as_float64():
        convert(path, tmp_path / "out.zarr", **options)
    assert not any(p.name.startswith("out.zarr") for p in tmp_path.iterdir())
    with read_as_float64():
        wide = read_back(convert(path, tmp_path / "out.zarr", dtype="float64"))
    assert wide.data.dtype == np.float64 and wide[2, 1] == 1e39


def test_values_float32_holds_as_zero_are_warned_of(tmp_path):
    """float64 values below float32's smallest become zeros with --dtype float32, which a
    warning names with the first one's row (overflow is refused)."""
    A = sp.csr_matrix(np.array([[1.0, 2.0], [3e-50, 4.0], [5.0, 1e-60]]))
    with pytest.warns(RuntimeWarning, match=r"values too small for float32 are stored as "
                                            r"zero \(the first, 3e-50 of "
                                            r"row 1\): store float64 values"):
        narrowed = read_back(from_scipy(A, tmp_path / "A.zarr", dtype="float32"))
    assert narrowed[1, 0] == 0 and narrowed[2, 1] == 0 and narrowed[1, 1] == 4


@pytest.mark.parametrize("source", ["mtx", "npz"])
def test_integers_that_float32_rounds_are_warned_of(tmp_path, source):
    """Integer data becomes float32 by default, exact up to 2**24: a larger value is
    rounded, which one warning names with its place (float64 keeps it)."""
    import scipy.sparse

    from ooc_svd.convert import convert

    if source == "mtx":
        path = tmp_path / "A.mtx"
        path.write_text("%%MatrixMarket matrix coordinate integer general\n3 2 3\n"
                        "1 1 5\n3 1 16777216\n3 2 123456789\n")
    else:
        path = tmp_path / "A.npz"
        scipy.sparse.save_npz(path, scipy.sparse.csr_matrix(
            np.array([[5, 0], [0, 0], [16777216, 123456789]], dtype=np.int64)))
    place = "row 2" if source == "mtx" else "value 2 of data in .*A.npz"  # as the file has it
    with pytest.warns(RuntimeWarning, match=r"integer values beyond 2\*\*24 are rounded in "
                                            rf"float32 \(the first, 123456789 of {place}, is "
                                            r"stored as 123456792\): store float64 values \("
                                            r"convert --dtype float64\)") as caught:
        rounded = read_back(convert(path, tmp_path / "out.zarr"))
    assert len([w for w in caught if "rounded" in str(w.message)]) == 1
    assert rounded[2, 1] == 123456792
    exact = read_back(convert(path, tmp_path / "exact.zarr", dtype="float64"))
    assert exact[2, 1] == 123456789 and exact[2, 0] == 16777216


def test_matrix_market_integers_beyond_float64s_exact_range_are_warned_of(tmp_path):
    """Values are read as float64, whose integers are exact up to 2**53: a larger one in an
    integer file is named, once, since float64 may round it (2**53 + 1 becomes 2**53)."""
    from ooc_svd.convert import convert

    path = tmp_path / "A.mtx"
    path.write_text("%%MatrixMarket matrix coordinate integer general\n3 2 3\n"
                    f"1 1 {2**53 - 1}\n3 1 {2**53 + 1}\n3 2 {-2**60}\n")
    with pytest.warns(RuntimeWarning, match=f"line 4: '3 1 {2**53 + 1}' holds an integer "
                                            "beyond 2\\*\\*53") as caught:
        stored = read_back(convert(path, tmp_path / "out.zarr", dtype="float64"))
    assert len(caught) == 1 and stored[0, 0] == 2**53 - 1
    assert stored[2, 0] == 2**53 and stored[2, 1] == -2**60


@pytest.mark.parametrize("layout", ["coo", "csc", "csr with repeated columns", "csr"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_integers_the_store_rounds_are_warned_of_once_in_every_layout(tmp_path, layout, dtype):
    """COO and CSC entries, and CSR rows with repeated columns, are summed in float64: the
    writer, given float64, could not see that 2**53 + 1 had become 2**53, and named 2**53
    where float32 rounded it further. One warning names the value given and the one
    stored."""
    values = np.array([5, 2**53 + 1, -2**60, 0], dtype=np.int64)
    rows, cols = np.array([0, 2, 2, 2]), np.array([0, 0, 1, 1])
    matrix = sp.coo_matrix((values, (rows, cols)), shape=(3, 2))
    if layout.startswith("csr"):
        parts = (values[:3], cols[:3], [0, 1, 1, 3]) if layout == "csr" else \
            (values, cols, [0, 1, 1, 4])  # column 1 of row 2 twice: summed
        matrix = sp.csr_matrix(parts, shape=(3, 2))
    else:
        matrix = matrix.asformat(layout)
    sp.save_npz(tmp_path / "A.npz", matrix, compressed=False)
    bits = 53 if dtype == "float64" else 24
    with pytest.warns(RuntimeWarning, match=rf"integer values beyond 2\*\*{bits} are rounded "
                                            rf"in {dtype} \(the first, 9007199254740993 of "
                                            r"value 1 of data in .*, is stored as "
                                            r"9007199254740992\)") as caught:
        stored = read_back(convert(tmp_path / "A.npz", tmp_path / "out.zarr", dtype=dtype))
    assert len([w for w in caught if "rounded" in str(w.message)]) == 1
    np.testing.assert_array_equal(stored.toarray(), [[5, 0], [0, 0], [2**53, -2**60]])


def malformed_npz(path, **arrays):
    """An archive as scipy.sparse.save_npz writes one, with ``arrays`` replaced."""
    members = {"format": np.array(b"csr"), "shape": np.array([3, 4]),
               "data": np.ones(4), "indices": np.array([0, 1, 2, 3], dtype=np.int32),
               "indptr": np.array([0, 1, 2, 4], dtype=np.int64)}
    np.savez(path, **{**members, **arrays})
    return str(path)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"shape": np.array([12])}, r"shape \(12,\), not 2-D"),
    ({"shape": np.array([3.5, 4])}, r"must be two integers \[m, n\], not \[3.5, 4.0\]"),
    ({"shape": np.array([-3, 4])}, r"must be two integers \[m, n\], not \[-3, 4\]"),
    ({"format": np.array(b"xyz")}, "its format member b'xyz' is not one of csr, csc"),
    ({"indptr": np.array([0, 3, 2, 4])}, "indptr in .*bad.npz decreases between positions 1 "
                                         "and 2"),
    ({"format": np.array("csr", dtype=object)}, "the member 'format' of '.*bad.npz' cannot "
                                                "be read without unpickling"),
])
def test_npz_refusals_name_the_file_and_the_problem(tmp_path, arrays, message):
    path = malformed_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message):
        from_npz(path, tmp_path / "out.zarr")
    assert not any(p.name.startswith("out.zarr") for p in tmp_path.iterdir())


def encrypted(path):
    """The zip archive at ``path`` with every member flagged encrypted, as zipfile sees it."""
    content = bytearray(path.read_bytes())
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = content.find(signature)
        while at >= 0:
            content[at + flags] |= 1
            at = content.find(signature, at + 4)
    path.write_bytes(bytes(content))
    return str(path)


def test_npz_files_loaded_whole_are_refused_before_they_load(tmp_path, monkeypatch):
    """A DIA .npz, which scipy loads whole, whose arrays alone exceed the limit; a dense
    compressed .npz, which convert refuses without --transpose, however large; an archive of
    encrypted members: each refused without loading anything."""
    sp.save_npz(tmp_path / "dia.npz", sp.diags([np.ones(500_000)] * 2, [0, 1], format="dia"))
    np.savez_compressed(tmp_path / "dense.npz", A=np.ones((1000, 500)))
    sp.save_npz(tmp_path / "locked.npz", sp.random(30, 20, density=0.3, format="csr"))

    def not_loaded(*args):
        raise AssertionError("loaded")

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", not_loaded)
    monkeypatch.setattr(sp, "load_npz", not_loaded)
    with pytest.raises(InputError, match=r"dia.npz' is a scipy.sparse .npz of the dia layout, "
                                         r"which is loaded whole, and its arrays alone take "
                                         r"8.0[0-9]* MB, more than memory_limit 5 MB: save it "
                                         r"as CSR, CSC or COO"):
        convert(tmp_path / "dia.npz", tmp_path / "out.zarr", memory_limit="5MB")
    with pytest.raises(InputError, match="is a dense matrix, which svd reads as it is"):
        convert(tmp_path / "dense.npz", tmp_path / "out.zarr")
    with pytest.raises(InputError, match="locked.npz' holds encrypted members"):
        convert(encrypted(tmp_path / "locked.npz"), tmp_path / "out.zarr")
    assert not os.path.exists(tmp_path / "out.zarr")


def test_missing_input_and_unknown_format(tmp_path):
    with pytest.raises(StoreNotFoundError):
        from_mtx(tmp_path / "absent.mtx", tmp_path / "out.zarr")
    with pytest.raises(StoreNotFoundError):
        from_npz(tmp_path / "absent.npz", tmp_path / "out.zarr")
    with pytest.raises(InputError, match="cannot tell the format"):
        convert(tmp_path / "A.txt", tmp_path / "out.zarr")
    with pytest.raises(InputError, match="group does not apply"):
        convert(tmp_path / "A.npz", tmp_path / "out.zarr", group="X")


# ---------------------------------------------------------------- HDF5 / AnnData


def write_h5_sparse(path, A, layout="csr", old_attributes=False):
    h5py = pytest.importorskip("h5py")
    A = A.asformat(layout)
    with h5py.File(path, "w") as file:
        group = file.create_group("X")
        if old_attributes:
            group.attrs["h5sparse_format"] = layout
            group.attrs["h5sparse_shape"] = A.shape
        else:
            group.attrs["encoding-type"] = f"{layout}_matrix"
            group.attrs["encoding-version"] = "0.1.0"
            group.attrs["shape"] = A.shape
        group.create_dataset("data", data=A.data, chunks=True, compression="gzip")
        group.create_dataset("indices", data=A.indices.astype(np.int32), chunks=True)
        group.create_dataset("indptr", data=A.indptr.astype(np.int64))
        file.create_dataset("dense", data=np.zeros((3, 3)))
    return path


@pytest.mark.parametrize("old_attributes", [False, True])
def test_h5ad_csr_group_round_trips(tmp_path, old_attributes):
    A = with_gaps(m=2000, n=300, seed=11, dtype=np.float32)
    path = write_h5_sparse(tmp_path / "A.h5ad", A, old_attributes=old_attributes)
    group = from_h5ad(path, tmp_path / "A.zarr", **SMALL)
    assert_same_csr(read_back(group), A, np.float32)
    assert group.attrs["ooc_svd_source"]["row_sorted"] is True


def test_damaged_or_misnamed_files_are_named_not_a_traceback(tmp_path):
    """A gzip stream cut short or not gzip at all, an .npz with a bad checksum or without
    indptr, a file that is no HDF5: InputErrors naming the file, nothing written. An
    upper-case suffix is read as its lower-case one."""
    A = with_gaps(m=300, n=40, seed=12)
    plain = tmp_path / "A.mtx"
    scipy.io.mmwrite(plain, A.tocoo())
    zipped = tmp_path / "A.mtx.gz"
    with open(plain, "rb") as source, gzip.open(zipped, "wb") as target:
        target.write(source.read())
    upper = tmp_path / "B.MTX.GZ"
    upper.write_bytes(zipped.read_bytes())
    assert_same_csr(read_back(convert(upper, tmp_path / "B.zarr")), A)
    truncated = tmp_path / "T.mtx.gz"
    truncated.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])
    not_gzip = tmp_path / "N.mtx.gz"
    not_gzip.write_bytes(plain.read_bytes())
    npz = tmp_path / "C.npz"
    sp.save_npz(npz, A.tocsr(), compressed=True)
    corrupt = tmp_path / "corrupt.npz"
    damaged = bytearray(npz.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(damaged))
    without_indptr = tmp_path / "noindptr.npz"
    np.savez(without_indptr, format=np.array(b"csr"), shape=np.array(A.shape), data=A.data,
             indices=A.tocsr().indices)
    cases = [(truncated, "cannot read .*T.mtx.gz'"), (not_gzip, "cannot read .*N.mtx.gz'"),
             (corrupt, "corrupt.npz"), (without_indptr, "without indptr and indices")]
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"not hdf5 at all")
    try:
        import h5py  # noqa: F401 - the hdf5 extra
        cases.append((junk, "cannot open .*junk.h5ad' as an HDF5 file"))
    except ImportError:
        pass
    for path, message in cases:
        with pytest.raises(InputError, match=message):
            convert(path, tmp_path / "out.zarr", **SMALL)
        assert not any(p.name.startswith("out.zarr") for p in tmp_path.iterdir())


def test_a_big_endian_csr_group_converts(tmp_path):
    """zarr v2 stores may hold big-endian indices, which numba cannot take as they are."""
    A = with_gaps(m=200, n=30, seed=14)
    group = zarr.open_group(str(tmp_path / "B.zarr"), mode="w", zarr_format=2)
    group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                        "shape": list(A.shape)})
    group.create_array("indptr", data=A.indptr.astype(">i8"))
    group.create_array("indices", data=A.indices.astype(">i4"))
    group.create_array("data", data=A.data.astype(">f8"))
    assert_same_csr(read_back(convert(str(tmp_path / "B.zarr"), tmp_path / "out.zarr")), A)


def test_h5ad_refusals(tmp_path):
    path = write_h5_sparse(tmp_path / "A.h5ad", with_gaps(seed=13))
    with pytest.raises(InputError, match="dense dataset"):
        from_h5ad(path, tmp_path / "out.zarr", group="dense")
    with pytest.raises(InputError, match="has no 'layers'"):
        from_h5ad(path, tmp_path / "out.zarr", group="layers")
    with pytest.raises(StoreNotFoundError):
        from_h5ad(tmp_path / "absent.h5ad", tmp_path / "out.zarr")


# ---------------------------------------------------------------- zarr groups


def write_zarr_sparse(path, A, layout="csr", chunk=100_000, zarr_format=3):
    """A sparse matrix as a zarr group in AnnData's layout, in chunks of ``chunk`` values."""
    A = A.asformat(layout)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    group.attrs.update({"encoding-type": f"{layout}_matrix", "encoding-version": "0.1.0",
                        "shape": list(A.shape)})
    for name, array in (("data", A.data), ("indices", A.indices.astype(np.int32)),
                        ("indptr", A.indptr.astype(np.int64))):
        group.create_array(name, shape=array.shape, dtype=array.dtype, chunks=(chunk,))[:] = array
    return str(path)


def test_a_csr_store_is_rechunked_for_a_lower_memory_limit(tmp_path):
    """Each read may decode two storage chunks per array beyond its block; converted with
    a smaller chunk_nnz (the plan's advice when the limit cannot hold a block), a store
    needs less memory for the same run."""
    import ooc_svd

    A = with_gaps(m=3000, n=200, density=0.1, seed=15, dtype=np.float32)
    big = write_zarr_sparse(tmp_path / "big.zarr", A)
    group = convert(big, tmp_path / "small.zarr", chunk_nnz=2000)
    assert group["indices"].chunks == (2000,)
    assert_same_csr(read_back(group), A, np.float32)
    assert group.attrs["ooc_svd_source"]["format"] == "zarr v3 csr"
    before, after = (ooc_svd.svd_plan(store, 5, memory_limit="20MB")
                     for store in (big, str(tmp_path / "small.zarr")))
    assert after.predicted_peak_bytes < before.predicted_peak_bytes - 500_000


@pytest.mark.parametrize("write", [
    lambda path, A: write_h5_sparse(path.with_suffix(".h5"), A, layout="csc"),
    lambda path, A: write_zarr_sparse(path, A, layout="csc", chunk=700, zarr_format=2),
    # a directory without .zarr in its name
    lambda path, A: write_zarr_sparse(path, A, layout="csc", chunk=700, zarr_format=3),
], ids=["hdf5", "zarr v2", "zarr v3"])
def test_a_csc_group_goes_through_buckets(tmp_path, write):
    A = with_gaps(m=2000, n=300, seed=12)
    group = convert(write(tmp_path / "A", A), tmp_path / "B.zarr", **SMALL)
    assert group.attrs["ooc_svd_source"]["buckets"] > 1
    assert_same_csr(read_back(group), A, np.float64)


def test_zarr_refusals(tmp_path):
    path = write_zarr_sparse(tmp_path / "A.zarr", with_gaps(seed=17))
    relative = os.path.relpath(path)  # file://A.zarr is A.zarr in the current directory
    for out in (path, os.path.join(path, "B")):
        for given in (path, f"file://{path}", f"file://{relative}"):
            with pytest.raises(InputError, match="overlaps the input"):
                from_zarr(given, out, overwrite=True)
    zarr.open_group(path, mode="r+").attrs["shape"] = "600x90"
    with pytest.raises(InputError, match="the shape attribute must be two integers"):
        convert(path, tmp_path / "out.zarr")
    dense = zarr.create_array(str(tmp_path / "D.zarr"), shape=(4, 4), dtype="f4")
    with pytest.raises(InputError, match="not a sparse group"):
        from_zarr(str(tmp_path / "D.zarr"), tmp_path / "out.zarr")
    with pytest.raises(InputError, match="is a dense matrix, which svd reads as it is"):
        convert(str(tmp_path / "D.zarr"), tmp_path / "out.zarr")
    (tmp_path / "text.npy").write_text("hello\n")  # a .npy by name only
    with pytest.raises(StoreNotFoundError, match="is not a .npy file"):
        convert(str(tmp_path / "text.npy"), tmp_path / "out.zarr")
    group = zarr.open_group(str(tmp_path / "G.zarr"), mode="w")
    group.attrs["encoding-type"] = "other"
    group.create_array("X", shape=(4, 4), dtype="f4")  # as an AnnData store holds it
    wanted = {False: r"the sparse group in it, or \(with transpose=True, --transpose\) the "
                     r"dense array",
              True: "the sparse group or the dense array in it"}
    for transpose in (False, True):
        with pytest.raises(InputError, match=r"is not a sparse matrix group .* \(its arrays: "
                                             r"\['X'\]; its groups: \[\]\); pass the path of "
                                             rf"{wanted[transpose]}, e.g. .*G.zarr/X$"):
            convert(str(tmp_path / "G.zarr"), tmp_path / "out.zarr", transpose=transpose)
    assert dense.shape == (4, 4)


# ---------------------------------------------------------------- the sparse generator


def test_sparse_generator_is_exact_canonical_and_chunking_free(tmp_path):
    a = write_sparse_matrix(tmp_path / "a.zarr", (9000, 700), density=0.01, seed=5)
    b = write_sparse_matrix(tmp_path / "b.zarr", (9000, 700), density=0.01, seed=5,
                            chunk_rows=1000, threads=1, chunk_nnz=5000)
    A, B = read_back(a), read_back(b)
    assert A.nnz == 63000 and A.has_canonical_format
    assert_same_csr(A, B)
    assert np.all(A.data >= 1) and np.all(A.data == np.round(A.data))
    counts = np.bincount(A.indices, minlength=700)
    assert counts[:10].sum() > 5 * counts[-10:].sum()  # power-law columns
    assert a.attrs["ooc_svd_synthetic"]["nnz"] == 63000


def test_sparse_generator_dense_rows_under_a_steep_power_law(tmp_path):
    group = write_sparse_matrix(tmp_path / "a.zarr", (50, 400), density=0.8, seed=2,
                                column_exponent=2.5)
    A = read_back(group)
    assert A.nnz == 16000 and A.has_canonical_format and np.diff(A.indptr).max() <= 400
    with pytest.raises(InputError, match="exactly one"):
        write_sparse_matrix(tmp_path / "b.zarr", (5, 5), density=0.1, nnz=3)


# ---------------------------------------------------------------- the commands


def ooc_svd_command(*args):
    return subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_convert_command_writes_and_refuses_existing_output(tmp_path):
    A = with_gaps(m=500, n=60, seed=14)
    path = tmp_path / "A.mtx"
    scipy.io.mmwrite(path, A.tocoo())
    out = tmp_path / "A.zarr"
    done = ooc_svd_command("convert", path, out, "--dtype", "float32", "--chunk-nnz", 500)
    assert done.returncode == 0, done.stderr
    assert f"500 x 60 float32 CSR, {A.nnz} non-zeros" in done.stdout and "one pass" in done.stdout
    assert_same_csr(read_back(zarr.open_group(str(out), mode="r")), A, np.float32)
    again = ooc_svd_command("convert", path, out, "--quiet")
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    quiet = ooc_svd_command("convert", path, tmp_path / "B.zarr", "--quiet", "--progress")
    assert quiet.returncode == 0 and quiet.stdout == quiet.stderr == ""


@pytest.mark.parametrize("order", ["rows", "shuffled", "symmetric"])
def test_convert_shows_its_progress_when_asked(tmp_path, order):
    """A bar of the rows written; entries out of row order first go into buckets, with a
    bar of their own (for a symmetric file, of the entries with their mirrors, which the
    header's count bounds). Stderr is no terminal here: each bar's last state stays,
    complete."""
    A = with_gaps(m=3000, n=60, seed=15).tocoo()
    if order == "shuffled":
        shuffle = np.random.default_rng(0).permutation(A.nnz)
        A = sp.coo_matrix((A.data[shuffle], (A.row[shuffle], A.col[shuffle])), shape=A.shape)
    if order == "symmetric":  # a full diagonal: half the file's entries are not mirrored
        square = sp.random(3000, 3000, density=3e-4, random_state=15, format="csr")
        A = (square + square.T + sp.identity(3000)).tocoo()
    path = tmp_path / "A.mtx"
    scipy.io.mmwrite(path, A, symmetry="symmetric" if order == "symmetric" else None)
    done = ooc_svd_command("convert", path, tmp_path / "A.zarr", "--progress")
    assert done.returncode == 0, done.stderr
    states = [state for state in done.stderr.replace("\r", "\n").splitlines() if state]
    bars = {state.split(":")[0]: state for state in states}
    from tqdm import tqdm

    def counts(total):  # as the bar writes "done/total"
        return f"{tqdm.format_sizeof(total, divisor=1000)}/" \
            f"{tqdm.format_sizeof(total, divisor=1000)}"

    expected = {"rows": counts(A.shape[0])}
    if order != "rows":
        expected["entries into buckets"] = counts(A.nnz)
    assert set(bars) == set(expected), states
    for name, counts in expected.items():
        assert "100%" in bars[name] and counts in bars[name], bars[name]
    silent = ooc_svd_command("convert", path, tmp_path / "B.zarr")
    assert silent.returncode == 0 and silent.stderr == ""


def test_generate_density_writes_a_csr_store(tmp_path):
    out = tmp_path / "S.zarr"
    done = ooc_svd_command("generate", out, "--shape", 5000, 300, "--density", 0.02,
                           "--seed", 3, "--chunk", 2000)
    assert done.returncode == 0, done.stderr
    assert "5000 x 300 float32 CSR, 30000 non-zeros" in done.stdout
    group = zarr.open_group(str(out), mode="r")
    reference = write_sparse_matrix(tmp_path / "R.zarr", (5000, 300), density=0.02, seed=3)
    assert_same_csr(read_back(group), read_back(reference))
    refused = ooc_svd_command("generate", tmp_path / "T.zarr", "--shape", 50, 30, "--density",
                              0.1, "--rank", 3)
    assert refused.returncode == 2 and "--rank" in refused.stderr


def test_a_scratch_dir_that_is_not_a_directory_is_refused_before_any_work(tmp_path):
    matrix = sp.random(300, 40, density=0.1, format="coo", random_state=3)
    sp.save_npz(tmp_path / "A.npz", matrix)
    (tmp_path / "file").write_text("")
    for scratch in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(InputError, match="is not a directory"):
            from_npz(tmp_path / "A.npz", tmp_path / "A.zarr", scratch_dir=scratch)
    assert sorted(os.listdir(tmp_path)) == ["A.npz", "file"]
    group = from_npz(tmp_path / "A.npz", tmp_path / "A.zarr", scratch_dir=tmp_path, **SMALL)
    np.testing.assert_array_equal(read_back(group).toarray(), matrix.toarray())


@pytest.mark.parametrize(("shape", "shown"), [
    (3, "3"), ([3, 3, 3], "[3, 3, 3]"), ("3,3", "'3,3'"), ([3.7, 3.2], "[3.7, 3.2]"),
    ([-2, 4], "[-2, 4]")])
def test_an_hdf5_shape_attribute_that_is_not_two_integers_is_refused(tmp_path, shape, shown):
    """Not truncated (3.7 read as 3) nor a traceback."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "A.h5ad"
    write_h5_sparse(path, with_gaps(m=5, n=4, seed=2))
    with h5py.File(path, "r+") as file:
        file["X"].attrs["shape"] = shape
    with pytest.raises(InputError, match=r"the shape attribute must be two integers \[m, n\], "
                                         f"not .*{re.escape(shown)}"):
        convert(path, tmp_path / "B.zarr")


def test_sparse_group_members_that_are_not_1d_arrays_of_numbers_are_refused(tmp_path):
    A = with_gaps(m=5, n=4, seed=2)
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "A.h5ad"
    write_h5_sparse(path, A)
    with h5py.File(path, "r+") as file:
        del file["X/data"]
        file["X/data"] = A.data.reshape(-1, 1)
    with pytest.raises(InputError, match=r"X/data is not a 1-D array of numbers \(shape "):
        convert(path, tmp_path / "B.zarr")
    store = write_zarr_sparse(tmp_path / "A.zarr", A)
    group = zarr.open_group(store, mode="r+")
    del group["data"]
    group.create_group("data")
    with pytest.raises(InputError, match="A.zarr/data is not a 1-D array of numbers"):
        convert(store, tmp_path / "C.zarr")
    assert sorted(os.listdir(tmp_path)) == ["A.h5ad", "A.zarr"]


@pytest.mark.parametrize("stored", [np.array(["csr", "csc"]), np.array(5), np.array("lil")])
def test_an_npz_format_member_scipy_does_not_write_is_refused(tmp_path, stored):
    A = with_gaps(m=5, n=4, seed=2)
    path = tmp_path / "A.npz"
    np.savez(path, format=stored, shape=np.array(A.shape), data=A.data, indices=A.indices,
             indptr=A.indptr)
    with pytest.raises(InputError, match="is not a scipy.sparse .npz: its format member"):
        convert(path, tmp_path / "B.zarr")


def test_a_nan_or_inf_in_the_input_is_stored_with_a_warning(tmp_path):
    """As scipy reads it, but said once, with its row: a run on the store refuses it."""
    path = write_mtx(tmp_path / "A.mtx", ["1 1 1", "2 2 inf", "3 1 nan"], "real general",
                     (3, 3))
    with pytest.warns(RuntimeWarning, match=r"holds NaN or Inf, stored as it is \(the first, "
                                            r"inf in row 1\): a run on the store refuses it"):
        group = from_mtx(path, tmp_path / "A.zarr")
    stored = read_back(group).toarray()
    assert stored[1, 1] == np.inf and np.isnan(stored[2, 0])
    with pytest.raises(ooc_svd.errors.NonFiniteError, match="row 1"):
        ooc_svd.svd(str(tmp_path / "A.zarr"), 1)


@pytest.mark.parametrize("dtype", [None, "float32", "float64"])
def test_complex_values_are_refused_whatever_dtype_is_asked(tmp_path, dtype):
    """A cast to the dtype asked for would drop the imaginary parts."""
    A = with_gaps(m=5, n=4, seed=2).astype(np.complex128)
    sp.save_npz(tmp_path / "A.npz", A)
    for source in (A, tmp_path / "A.npz"):
        with pytest.raises(InputError, match=r"complex values \(complex128\) are not supported"):
            convert(source, tmp_path / "B.zarr", dtype=dtype)
    assert sorted(os.listdir(tmp_path)) == ["A.npz"]


TRANSPOSABLE = {
    "scipy csr": lambda path, A: A,
    "scipy coo": lambda path, A: A.tocoo(),
    "npz csr": lambda path, A: sp.save_npz(path.with_suffix(".npz"), A) or
    path.with_suffix(".npz"),
    "npz csc": lambda path, A: sp.save_npz(path.with_suffix(".npz"), A.tocsc()) or
    path.with_suffix(".npz"),
    "npz coo": lambda path, A: sp.save_npz(path.with_suffix(".npz"), A.tocoo()) or
    path.with_suffix(".npz"),
    "npz bsr": lambda path, A: sp.save_npz(path.with_suffix(".npz"), A.tobsr()) or
    path.with_suffix(".npz"),
    "mtx in row order": lambda path, A: scipy.io.mmwrite(path.with_suffix(".mtx"), A) or
    path.with_suffix(".mtx"),
    "mtx in column order": lambda path, A: scipy.io.mmwrite(path.with_suffix(".mtx"),
                                                            A.tocsc().tocoo()) or
    path.with_suffix(".mtx"),
    "h5ad csr": lambda path, A: write_h5_sparse(path.with_suffix(".h5ad"), A),
    "h5ad csc": lambda path, A: write_h5_sparse(path.with_suffix(".h5ad"), A, layout="csc"),
    "zarr csr": lambda path, A: write_zarr_sparse(path.with_suffix(".zarr"), A, chunk=500),
    "zarr csc": lambda path, A: write_zarr_sparse(path.with_suffix(".zarr"), A, layout="csc",
                                                  chunk=500),
}


@pytest.mark.parametrize("kind", TRANSPOSABLE)
def test_transpose_writes_a_transposed(tmp_path, kind):
    """A^T exactly, from every input, in one pass where its entries come in A^T's row
    order (a CSC, a file in column order) or scipy converts it in memory (the scipy
    objects, BSR), else through buckets."""
    A = with_gaps(m=300, n=1200, density=0.01, seed=3)  # wide: A^T is 1200 x 300
    source = TRANSPOSABLE[kind](tmp_path / "A", A)
    group = convert(source, tmp_path / "At.zarr", transpose=True, **SMALL)
    assert_same_csr(read_back(group), A.T, np.float64)
    provenance = group.attrs["ooc_svd_source"]
    assert provenance["transposed"] is True
    in_order = kind in ("npz csc", "mtx in column order", "h5ad csc", "zarr csc", "scipy csr",
                        "scipy coo", "npz bsr")
    assert provenance["row_sorted"] is in_order
    assert convert(source, tmp_path / "plain.zarr").attrs["ooc_svd_source"].get(
        "transposed") is None


def test_a_transposed_value_is_named_by_its_column_of_the_input(tmp_path):
    """A^T's row r is the input's column r: messages say so."""
    path = write_mtx(tmp_path / "A.mtx", ["1 5 1e300", "2 2 1"], shape=(3, 5))
    with pytest.raises(InputError, match=r"the value 1e\+300 of column 4 of the input lies"):
        convert(path, tmp_path / "At.zarr", transpose=True, dtype="float32")
    with pytest.raises(InputError, match=r"the value 1e\+300 of row 0 lies"):
        convert(path, tmp_path / "A.zarr", dtype="float32")


def test_transpose_of_symmetric_and_skew_symmetric_files(tmp_path):
    """A symmetric file's A^T is A; a skew-symmetric one's is -A."""
    lines = ["2 1 3.5", "3 1 -2", "3 2 7"]
    for symmetry, sign in (("symmetric", 1), ("skew-symmetric", -1)):
        path = write_mtx(tmp_path / f"{symmetry}.mtx", lines, f"real {symmetry}", (3, 3))
        out = tmp_path / f"{symmetry}.zarr"
        stored = read_back(convert(path, out, transpose=True)).toarray()
        np.testing.assert_array_equal(stored, sign * scipy.io.mmread(path).toarray())


def test_convert_command_transposes(tmp_path):
    A = with_gaps(m=50, n=400, density=0.05, seed=4)
    sp.save_npz(tmp_path / "A.npz", A)
    done = subprocess.run([sys.executable, "-m", "ooc_svd", "convert", str(tmp_path / "A.npz"),
                           str(tmp_path / "At.zarr"), "--transpose"],
                          capture_output=True, text=True, check=True)
    assert "400 x 50" in done.stdout and "transposed" in done.stdout
    assert_same_csr(read_back(zarr.open_group(tmp_path / "At.zarr", mode="r")), A.T)
