"""The ooc-svd command, run in subprocesses on generated stores."""

import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import zarr

import ooc_svd

SCRIPT = os.path.join(os.path.dirname(sys.executable), "ooc-svd")


def ooc_svd_command(*args, check=True):
    done = subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {done.stderr}")
    return done


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "A.zarr"
    ooc_svd_command("generate", path, "--shape", 30000, 40, "--rank", 25, "--decay", 0.2,
                    "--chunk", 3000, "--seed", 4)
    return str(path)


def test_console_script_is_installed():
    assert os.access(SCRIPT, os.X_OK)
    assert "generate" in ooc_svd_command("--help").stdout


@pytest.mark.parametrize("command", ["run", "info", "generate", "check"])
def test_every_subcommand_has_help(command):
    assert "Usage: ooc-svd " + command in ooc_svd_command(command, "--help").stdout


def test_generate_info_run_check_match_the_api(store, tmp_path):
    attributes = zarr.open_array(store, mode="r").attrs["ooc_svd_synthetic"]
    assert attributes["rank"] == 25 and len(attributes["singular_values"]) == 25

    info = json.loads(ooc_svd_command("info", store, "--k", 5, "--method", "randomized",
                                      "--json").stdout)
    assert info["format"] == "zarr v3" and info["shape"] == [30000, 40]
    assert info["chunks"] == [3000, 40] and info["passes"] == 3 and info["bytes_raw"] == 4800000
    assert info["cached_blocks"] >= 1 and 0 < info["cached_bytes"] <= info["bytes_raw"]

    out = tmp_path / "result.zarr"
    done = ooc_svd_command("run", store, "--k", 5, "--out", out, "--center", "--method",
                           "randomized", "--seed", 3, "--json")
    summary = json.loads(done.stdout)
    assert summary["passes"] == 3 and summary["method"] == "randomized"
    assert done.stderr == ""  # no bar: stderr is not a terminal
    expected = ooc_svd.svd(store, 5, center=True, method="randomized", seed=3)
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(group["S"][:], expected.S, rtol=1e-6)
    np.testing.assert_allclose(group["U"][:], expected.U, atol=1e-6)
    np.testing.assert_allclose(group["V"][:], expected.V, atol=1e-6)
    assert group.attrs["ooc_svd"]["residual"] == pytest.approx(summary["residual"])

    report = json.loads(ooc_svd_command("check", out, store, "--samples", 10, "--json").stdout)
    assert report["ok"] and report["sampled_rows"] == 30000 and report["residual_agrees"]
    assert report["sampled_residual"] == pytest.approx(summary["residual"], rel=1e-4)
    # Another matrix of the same shape: orthonormal factors, but not its SVD
    other = tmp_path / "other.zarr"
    ooc_svd_command("generate", other, "--shape", 30000, 40, "--chunk", 3000, "--seed", 5)
    done = ooc_svd_command("check", out, other, "--samples", 10, "--json", check=False)
    report = json.loads(done.stdout)
    assert done.returncode == 1 and not report["ok"] and not report["residual_agrees"]
    assert report["u_orthonormality_error"] <= report["tolerance"]
    # Sampled: a_i V - U_i S over the rows sampled exceeds what the stored residual allows
    done = ooc_svd_command("check", out, other, "--json", check=False)
    sampled = json.loads(done.stdout)
    assert done.returncode == 1 and not sampled["ok"] and not sampled["rows_agree"]
    assert sampled["sampled_rows"] == 24000 and "residual_agrees" not in sampled
    assert "residual_plausible" not in sampled  # randomized: rows are not bounded by 1
    assert sampled["rows_error"] > summary["residual"]
    sampled = json.loads(ooc_svd_command("check", out, store, "--json").stdout)
    assert sampled["ok"] and sampled["rows_agree"]
    assert sampled["rows_error"] <= summary["residual"]
    # A gram result leaves no set of rows a residual above 1: past 1.1, sampled, it fails
    gram = tmp_path / "gram.zarr"
    ooc_svd_command("run", store, "--k", 5, "--out", gram, "--method", "gram")
    sampled = json.loads(ooc_svd_command("check", gram, store, "--json").stdout)
    assert sampled["ok"] and sampled["residual_plausible"]
    done = ooc_svd_command("check", gram, other, "--json", check=False)
    sampled = json.loads(done.stdout)
    assert done.returncode == 1 and not sampled["ok"] and not sampled["residual_plausible"]
    assert sampled["sampled_rows"] == 24000 and sampled["sampled_residual"] > 1.1


@pytest.mark.parametrize(("kind", "method", "center"), [
    ("float32", "randomized", True), ("float64", "krylov", False),
    ("rank-deficient", "gram", False), ("rank-deficient", "exact", True),
    ("ill-conditioned", "exact", True), ("ill-conditioned", "gram", False),
    ("sparse", "randomized", True), ("sparse", "gram", False),
    ("sparse, mean 1e5 x the spread", "randomized", True),
    ("float32, mean 1e6", "exact", True),  # stored in float32, the mean was off by 0.03
])
def test_check_finds_the_residual_of_every_kind_of_result_exact(tmp_path, kind, method, center):
    """The stored residual and the exact one agree for each method, dtype and centering,
    so a result whose samples cover its input passes the check."""
    import naive
    import scipy.sparse

    from ooc_svd.convert import from_scipy
    from ooc_svd.verify import verify_result

    rng = np.random.default_rng(11)
    if kind.startswith("sparse"):
        A = scipy.sparse.random(3000, 60, density=0.1, format="csr", random_state=11) * 5
        if "mean" in kind:  # centered algebraically: the run's note says that the residual
            low_rank = rng.standard_normal((3000, 3)) @ rng.standard_normal((3, 60))  # lost
            noise = 1e-3 * rng.standard_normal((3000, 60))                 # digits: allowed
            A = scipy.sparse.csr_matrix(1e5 + low_rank + noise)
        path = str(tmp_path / "A.zarr")
        from_scipy(A, path, dtype="float64")
    else:
        # Ill-conditioned: U = A V S^-1 would lose orthogonality as eps * sigma_1 / sigma_j.
        s = np.logspace(0, -12 if kind == "ill-conditioned" else -3, 60)
        if kind == "rank-deficient":
            s[20:] = 0
        offset = 1e6 if "mean 1e6" in kind else 3.0 if center else 0.0
        A = naive.matrix_with_spectrum(3000, 60, s, seed=11) + offset
        path = str(tmp_path / "A.npy")
        np.save(path, A.astype(np.float32 if kind.startswith("float32") else np.float64))
    out = str(tmp_path / "result.zarr")
    k = 3 if "mean" in kind else 30
    ooc_svd.svd(path, k, method=method, center=center, out=out, seed=int(rng.integers(9)))
    report = verify_result(out, path, samples=10**6)
    assert report["sampled_rows"] == 3000 and report["residual_agrees"] and report["ok"], report


def test_check_holds_a_float64_result_to_float64_precision(tmp_path):
    """A float64 result's stored residual is exact to float64 rounding: the input changed by
    1e-3 of its values no longer agrees with it (float32's slack let 3e-3 through)."""
    import naive

    from ooc_svd.verify import verify_result

    A = naive.matrix_with_spectrum(2000, 40, np.logspace(0, -3, 40), seed=12)
    path, out = str(tmp_path / "A.npy"), str(tmp_path / "result.zarr")
    np.save(path, A)
    ooc_svd.svd(path, 20, method="exact", out=out)
    assert verify_result(out, path, samples=10**6)["residual_agrees"]
    changed = A * (1 + 1e-3 * np.random.default_rng(12).standard_normal(A.shape))
    np.save(path, changed)
    report = verify_result(out, path, samples=10**6)
    assert not report["residual_agrees"] and not report["ok"]


FULL_COVERAGE_DAMAGES = {
    "S[0] and S[1] swapped": ("S", lambda S: S[[1, 0, 2, 3, 4]]),
    "V's columns 0 and 1 turned by 0.1 rad": ("V", lambda V: np.column_stack(
        [np.cos(0.1) * V[:, 0] - np.sin(0.1) * V[:, 1],
         np.sin(0.1) * V[:, 0] + np.cos(0.1) * V[:, 1], V[:, 2:]])),
    "the mean zeroed": ("mean", np.zeros_like),
}


@pytest.mark.parametrize("damage", list(FULL_COVERAGE_DAMAGES))
def test_a_float32_result_checked_on_all_rows_is_held_to_its_rounding(tmp_path, damage):
    """Every method leaves U^T A_c V = diag(S), and a CPU run's float32 residual is exact
    to the rounding of U: a 2% slack (meant for a GPU's float32 sums) let these through."""
    import shutil

    import naive
    import zarr

    from ooc_svd.verify import verify_result

    A = naive.matrix_with_spectrum(4000, 40, np.logspace(0, -1, 40), seed=5) + 2.0
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=A.shape, chunks=(500, 40), dtype="f4")[:] = A
    out, bad = str(tmp_path / "good.zarr"), str(tmp_path / "bad.zarr")
    ooc_svd.svd(path, 5, center=True, method="randomized", out=out)
    shutil.copytree(out, bad)
    corrupt(zarr.open_group(bad), FULL_COVERAGE_DAMAGES[damage])
    good = verify_result(out, path, samples=10**6)
    assert good["ok"] and good["projection_agrees"] and good["projection_error"] < 1e-6
    assert not verify_result(bad, path, samples=10**6)["ok"]


def test_check_wants_s_descending_and_arrays_that_fit_together(tmp_path):
    import zarr

    from ooc_svd.errors import InputError
    from ooc_svd.verify import verify_result

    A = np.random.default_rng(6).standard_normal((300, 20))
    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(A, 4, out=out, center=True)
    group = zarr.open_group(out, mode="r+")
    group["S"][:] = group["S"][:][::-1]  # the same energy: only the order tells
    report = verify_result(out)
    assert not report["singular_values_ordered"] and not report["ok"]
    del group["mean"]
    group.create_array("mean", data=np.zeros(19))
    with pytest.raises(InputError, match=r"its arrays do not fit together \(U \(300, 4\), S "
                                         r"\(4,\), V \(20, 4\), mean \(19,\);"):
        verify_result(out)


def test_check_holds_the_factors_to_u_s_and_v(tmp_path):
    """B = U diag(S) and A = V^T, written with write_factors, to their stored rounding."""
    import shutil

    import zarr

    from ooc_svd.verify import verify_result

    A = np.random.default_rng(1).standard_normal((3000, 30)).astype(np.float32)
    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(A, 5, out=out, write_factors=True)
    assert verify_result(out)["factors_agree"] and verify_result(out)["ok"]
    for name, change in (("B", lambda B: np.concatenate([0 * B[:500], B[500:]])),
                         ("A", lambda factor: 2 * factor)):
        bad = str(tmp_path / f"bad-{name}.zarr")
        shutil.copytree(out, bad)
        corrupt(zarr.open_group(bad), (name, change))
        report = verify_result(bad)
        assert not report["factors_agree"] and not report["ok"]


def test_check_takes_a_centered_float32_sparse_result_of_a_large_mean(tmp_path):
    """Sums of a float32 CSR block in float64 (numpy's are float32's), and the run's norm
    allowed its algebraic centering's rounding: a correct result is not failed."""
    import scipy.sparse

    from ooc_svd.convert import from_scipy
    from ooc_svd.verify import verify_result

    values = 1000 + 0.03 * np.random.default_rng(0).standard_normal((20000, 50))
    path, out = str(tmp_path / "A.zarr"), str(tmp_path / "result.zarr")
    from_scipy(scipy.sparse.csr_matrix(values.astype(np.float32)), path)
    ooc_svd.svd(path, 5, center=True, method="exact", out=out)
    report = verify_result(out, path, samples=10**6)
    assert report["ok"] and report["singular_values_agree"] and report["residual_agrees"]


def corrupt(group, damage):
    """Apply ``damage`` to a copy of one of a result's arrays, and store it back."""
    name, change = damage
    values = group[name][:]
    group[name][:] = change(values)


DAMAGES = {
    "V's columns 1 and 2 swapped": ("V", lambda V: V[:, [0, 2, 1, 3, 4]]),
    "the mean off by 0.1": ("mean", lambda mean: mean + 0.1),
    "U's column 3 negated in rows 100-199": ("U", lambda U: np.concatenate(
        [U[:100], U[100:200] * [1, 1, 1, -1, 1], U[200:]])),
    "U's rows 100-199 zeroed in column 3": ("U", lambda U: np.concatenate(
        [U[:100], U[100:200] * [1, 1, 1, 0, 1], U[200:]])),
}


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_sampled_check_finds_damaged_factors(tmp_path, method, damage):
    """Sampled chunks of rows (a quarter of them): a_i V - U_i S on those rows, and the
    orthonormality of U held to the rounding of its values, catch what the sampled
    residual alone let through."""
    import shutil

    import naive
    import zarr

    from ooc_svd.verify import verify_result

    A = naive.matrix_with_spectrum(8000, 60, 1.0 / np.arange(1, 61), seed=4) + 3.0
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=A.shape, chunks=(500, 60), dtype="f4")[:] = A
    out, bad = str(tmp_path / "good.zarr"), str(tmp_path / "bad.zarr")
    ooc_svd.svd(path, 5, center=True, method=method, out=out)
    shutil.copytree(out, bad)
    corrupt(zarr.open_group(bad), DAMAGES[damage])
    good = verify_result(out, path, samples=4, seed=1)
    report = verify_result(bad, path, samples=4, seed=1)
    assert good["ok"] and good["rows_agree"] and good["sampled_rows"] == 2000
    assert not report["ok"], report


@pytest.mark.parametrize(("method", "decays"), [("randomized", (0.93, 0.97)),
                                               ("krylov", (0.95, 0.97))])
def test_a_check_of_a_large_residual_samples_enough_rows_to_tell_another_input(tmp_path,
                                                                              method, decays):
    """a_i V - U_i S may reach the energy the final basis missed (``basis_residual``,
    less than the residual where the basis is wider than k) over the rows sampled: where a
    few chunks hold less of the result's energy than that, another input of the same
    spectrum passed. The check samples chunks until they hold twice that energy; where
    that is more than the result captured none can, and the report says the rows sampled
    are not conclusive, until they are all of them (then the residual is exact)."""
    import naive
    import zarr

    from ooc_svd.verify import verify_result

    for decay, residual in zip(decays, ((0.6, 0.8), (0.8, 0.95)), strict=True):
        paths = []
        for seed in (4, 5):
            A = naive.matrix_with_spectrum(8000, 60, decay ** np.arange(60), seed=seed)
            paths.append(str(tmp_path / f"A{seed}-{decay}.zarr"))
            zarr.create_array(paths[-1], shape=A.shape, chunks=(500, 60), dtype="f8")[:] = A
        out = str(tmp_path / f"result-{decay}.zarr")
        result = ooc_svd.svd(paths[0], 5, method=method, niter=1, out=out)
        assert residual[0] < result.residual < residual[1]
        assert result.basis_residual < 0.85 * result.residual  # a basis of 15 columns, or 30
        own = verify_result(out, paths[0], samples=2, seed=1)
        other = verify_result(out, paths[1], samples=2, seed=1)
        assert own["ok"], own
        assert own["basis_residual"] == pytest.approx(result.basis_residual)
        if decay == decays[0]:  # more than the 2 chunks asked for, fewer than all 16
            assert 1000 < own["sampled_rows"] < 8000 and own["rows_conclusive"], own
            assert not other["ok"], other
        else:
            assert own["sampled_rows"] == 1000 and not own["rows_conclusive"], own
            assert other["ok"] and not other["rows_conclusive"], other
            done = ooc_svd_command("check", out, paths[1], "--samples", 2)
            assert f"could not tell another input from {paths[1]} (rows_conclusive: False); " \
                   "--samples 16 checks every chunk" in done.stderr
            every = verify_result(out, paths[1], samples=other["input_chunks"])
            assert not every["ok"] and every["rows_conclusive"], every


def test_a_check_holds_the_rows_to_what_the_basis_missed(tmp_path):
    """A Krylov basis misses far less of A than the residual says (its width is (q + 1) l):
    held to the residual, the rows of A scaled by 1.02 passed a sample; held to the basis
    residual, they fail it, as A's own pass. A result written before runs recorded the
    basis residual is held to the residual."""
    import zarr

    from ooc_svd.synthetic import write_dense_matrix
    from ooc_svd.verify import verify_result

    A = write_dense_matrix(str(tmp_path / "A.zarr"), (20_000, 50), decay=0.1,
                           chunk_rows=1000)
    scaled = zarr.create_array(str(tmp_path / "scaled.zarr"), shape=A.shape, chunks=A.chunks,
                               dtype=A.dtype)
    scaled[:] = 1.02 * A[:]
    out = str(tmp_path / "result.zarr")
    result = ooc_svd.svd(str(tmp_path / "A.zarr"), 10, method="krylov", out=out)
    assert result.basis_residual < 0.1 * result.residual
    assert verify_result(out, str(tmp_path / "A.zarr"))["ok"]
    report = verify_result(out, str(tmp_path / "scaled.zarr"))
    assert report["sampled_rows"] < 20_000 and not report["rows_agree"] and not report["ok"]
    attributes = zarr.open_group(out, mode="r+").attrs["ooc_svd"]
    del attributes["basis_residual"]
    zarr.open_group(out, mode="r+").attrs["ooc_svd"] = attributes
    assert verify_result(out, str(tmp_path / "scaled.zarr"))["ok"]


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_check_passes_results_of_repeated_values_whose_squares_drift(tmp_path, method):
    """The kernels sum the squares one value at a time per thread or sub-block: on 1e5
    values of 0.1 that sum drifts by thousands of eps, which a float64 slack of float64
    rounding alone failed (correct exact and gram results, a randomized one of a rank-2
    matrix whose residual is rounding)."""
    import scipy.sparse

    from ooc_svd.convert import from_scipy
    from ooc_svd.verify import verify_result

    B = scipy.sparse.random(100000, 50, density=0.05, random_state=1, format="csr")
    B.data[:] = 0.1
    sparse = str(tmp_path / "sparse.zarr")
    from_scipy(B, sparse)
    dense = str(tmp_path / "dense.npy")
    np.save(dense, np.repeat(np.array([[0.1, 0.3, 0.1, 0.3, 0.1, 0.3]]), 100000, 0))
    for path, k in ((sparse, 5), (dense, 2)):
        out = str(tmp_path / f"{method}-{k}.zarr")
        ooc_svd.svd(path, k, method=method, out=out)
        report = verify_result(out, path, samples=10**6)
        assert report["ok"] and report["singular_values_agree"], report


def test_check_fails_a_store_that_no_finished_run_left(tmp_path):
    """Without reading the input: an unfinished write's mark, a centered result without its
    mean, and singular values whose energy is not the run's (a chunk of S lost, read back
    as zeros) each fail the check."""
    import shutil

    import naive
    import zarr

    from ooc_svd.store import UNFINISHED
    from ooc_svd.verify import verify_result

    A = naive.matrix_with_spectrum(600, 20, np.logspace(0, -2, 20), seed=13) + 1.0
    reference = str(tmp_path / "reference.zarr")
    ooc_svd.svd(A, 5, center=True, out=reference)
    report = verify_result(reference)
    assert report["ok"] and report["complete"] and report["singular_values_agree"]
    damaged = {}
    for name in ("unfinished", "no mean", "no S chunk"):
        damaged[name] = str(tmp_path / f"{name}.zarr")
        shutil.copytree(reference, damaged[name])
    zarr.open_group(damaged["unfinished"], mode="r+").attrs[UNFINISHED] = "result"
    shutil.rmtree(os.path.join(damaged["no mean"], "mean"))
    S = zarr.open_group(damaged["no S chunk"], mode="r+")["S"]
    S[:] = np.r_[S[:2], np.zeros(3)]
    for name in ("unfinished", "no mean"):
        report = verify_result(damaged[name])
        assert not report["ok"] and not report["complete"], name
    report = verify_result(damaged["no S chunk"])
    assert not report["ok"] and report["complete"] and not report["singular_values_agree"]
    assert report["attributes_agree"]


@pytest.mark.parametrize("edit", [
    {"residual": None}, {"frobenius_norm": None}, {"method": None}, {"shape": None},
    {"residual": float("nan")}, {"frobenius_norm": -1.0}, {"method": "magic"},
    {"shape": [601, 20]}, {"rank": 4}, {"residual": "0.1"},
])
def test_check_fails_a_result_whose_attributes_were_removed_or_edited(tmp_path, edit):
    """The attributes the checks read (None: removed) must be there and describe the
    arrays: a removed residual or norm would skip the energy check, an edited one loosen
    it, and a store of another shape or rank is not the run that they describe."""
    import naive
    import zarr

    from ooc_svd.verify import verify_result

    A = naive.matrix_with_spectrum(600, 20, np.logspace(0, -2, 20), seed=13)
    out = str(tmp_path / "r.zarr")
    ooc_svd.svd(A, 5, out=out)
    report = verify_result(out)
    assert report["ok"] and report["complete"] and report["attributes_agree"]
    group = zarr.open_group(out, mode="r+")
    attributes = dict(group.attrs["ooc_svd"])
    for name, value in edit.items():
        if value is None:
            del attributes[name]
        else:
            attributes[name] = value
    group.attrs["ooc_svd"] = attributes
    report = verify_result(out)
    assert not report["ok"]
    removed = None in edit.values()
    assert report["complete"] is not removed and report["attributes_agree"] is removed


def test_progress_bar_only_when_asked(store, tmp_path):
    done = ooc_svd_command("run", store, "--k", 3, "--out", tmp_path / "r.zarr", "--progress")
    assert "pass" in done.stderr and "B/s" in done.stderr
    # Not a terminal (a log): each pass's last state stays, complete.
    states = {line.split(":")[0]: line for line in done.stderr.splitlines() if "pass:" in line}
    assert states and all("100%" in state for state in states.values()), states
    quiet = ooc_svd_command("run", store, "--k", 3, "--out", tmp_path / "q.zarr", "--quiet")
    assert quiet.stdout == "" and quiet.stderr == ""
    # A note still shows: here, that of a store whose chunks were never written
    zarr.create_array(tmp_path / "unwritten.zarr", shape=(100, 10), chunks=(50, 10),
                      dtype="f8")
    quiet = ooc_svd_command("run", tmp_path / "unwritten.zarr", "--k", 3, "--out",
                            tmp_path / "u.zarr", "--quiet")
    assert quiet.stdout == ""
    assert quiet.stderr.startswith("Note: every value of A read as zero")


def test_a_run_says_its_plan_and_each_pass_on_stderr_as_it_goes(store, tmp_path):
    """No bars (stderr is a log, not a terminal), but the plan before the first pass and a
    line as each pass ends, so that a job's log follows the run; --json and --quiet keep
    stderr clear."""
    done = ooc_svd_command("run", store, "--k", 3, "--method", "randomized", "--niter", 1,
                           "--out", tmp_path / "r.zarr")
    lines = done.stderr.splitlines()
    assert lines[0].startswith("randomized SVD of a 30000 x 40 matrix") and len(lines) == 3
    assert re.fullmatch(r"power pass took [0-9.e-]+ s and read 4\.8 MB", lines[1])
    assert re.fullmatch(r"final pass took [0-9.e-]+ s and read [0-9.]+ k?B", lines[2])
    assert done.stdout.startswith(lines[0])  # and in the summary, as before


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGINT])
def test_a_kill_then_resume_gives_the_same_result(store, tmp_path, kill):
    args = ["run", store, "--k", 4, "--method", "randomized", "--niter", 8, "--center",
            "--memory-limit", "8MB", "--quiet"]
    reference = tmp_path / "reference.zarr"
    ooc_svd_command(*args, "--out", reference)

    out = tmp_path / "result.zarr"
    checkpoint = tmp_path / "result.zarr.checkpoint" / "power0.npz"
    process = subprocess.Popen([SCRIPT, *map(str, args), "--out", str(out)],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(kill)
    stderr = process.communicate()[1]
    if kill == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    else:  # Ctrl-C: a one-line message that says how to go on
        assert process.returncode == 130, stderr
        assert "interrupted; the completed passes are kept in" in stderr
        assert "--resume continues" in stderr and "Traceback" not in stderr
    assert not out.exists()

    done = ooc_svd_command(*args, "--out", out, "--resume", "--json")
    assert json.loads(done.stdout)["resumed_passes"] >= 1
    got, expected = zarr.open_group(str(out), mode="r"), zarr.open_group(str(reference), mode="r")
    for name in ("U", "S", "V", "mean"):
        np.testing.assert_allclose(got[name][:], expected[name][:], rtol=1e-6, atol=1e-7)
    assert sorted(os.listdir(tmp_path)) == ["reference.zarr", "result.zarr"]


def test_existing_out_is_refused_and_untouched(store, tmp_path):
    out = tmp_path / "result.zarr"
    ooc_svd_command("run", store, "--k", 2, "--out", out, "--quiet")
    before = zarr.open_group(str(out), mode="r")["S"][:]
    done = ooc_svd_command("run", store, "--k", 3, "--out", out, check=False)
    assert done.returncode == 2 and "exists" in done.stderr and "--overwrite" in done.stderr
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["S"][:], before)


def test_check_of_an_input_instead_of_a_result_is_a_one_line_error(store, tmp_path):
    done = ooc_svd_command("check", store, check=False)
    assert done.returncode == 2 and "is a zarr array, not an ooc_svd result store" in done.stderr
    assert "Traceback" not in done.stderr
    from click.testing import CliRunner

    from ooc_svd.cli import main

    zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("S", shape=(2,), dtype="f8")
    for args, message in (([str(tmp_path / "g.zarr")], "it has no U, V"),
                          ([str(tmp_path / "none.zarr")], "no ooc_svd result store at"),
                          ([str(tmp_path / "g.zarr"), "--samples", "0"], "0 is not in the range")):
        done = CliRunner().invoke(main, ["check", *args])
        assert done.exit_code == 2 and message in done.output, done.output


def test_check_of_a_damaged_result_names_what_it_cannot_read(store, tmp_path):
    """A truncated chunk of U, unreadable metadata, an attribute that is not the run's:
    one line each (or a store found incomplete), never a traceback."""
    import shutil

    from click.testing import CliRunner

    from ooc_svd.cli import main

    out = tmp_path / "r.zarr"
    ooc_svd_command("run", store, "--k", 3, "--out", out, "--quiet")

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(out, copy)
        damage(copy)
        return str(copy)

    def truncate_a_chunk(copy):
        chunk = next(path for path in (copy / "U").rglob("*") if path.is_file()
                     and path.name != "zarr.json")
        chunk.write_bytes(chunk.read_bytes()[:20])

    cases = [
        (damaged("chunk.zarr", truncate_a_chunk), "cannot read U[", ""),
        (damaged("group.zarr", lambda copy: (copy / "zarr.json").write_text("{")),
         "cannot open the result store", ""),
        (damaged("meta.zarr", lambda copy: (copy / "V" / "zarr.json").write_text("{")),
         "cannot open V of the result store", ""),
    ]
    for path, message, _ in cases:
        done = CliRunner().invoke(main, ["check", path, store, "--json"])
        assert done.exit_code == 2, done.output
        assert message in json.loads(done.output.splitlines()[0])["error"]
    foreign = damaged("foreign.zarr", lambda copy: None)
    zarr.open_group(foreign, mode="r+").attrs["ooc_svd"] = "not the run's"
    done = CliRunner().invoke(main, ["check", foreign, "--json"])
    assert done.exit_code == 1 and json.loads(done.output)["complete"] is False


def test_info_of_a_non_numeric_input_is_refused_as_run_refuses_it(tmp_path):
    from click.testing import CliRunner

    from ooc_svd.cli import main

    path = str(tmp_path / "words.zarr")
    zarr.create_array(path, shape=(4, 2), dtype=str)
    for command in (["info", path, "--json"], ["run", path, "--k", "1", "--out",
                                               str(tmp_path / "r.zarr"), "--json"]):
        done = CliRunner().invoke(main, command)
        assert done.exit_code == 2, done.output
        assert "non-numeric dtype" in json.loads(done.output.splitlines()[0])["error"]


def bad_inputs(tmp_path, store):
    """(name, INPUT, extra args, message) for inputs that must give exit code 2."""
    nan_store = tmp_path / "nan.zarr"
    array = zarr.create_array(str(nan_store), shape=(400, 6), chunks=(100, 6), dtype="f8")
    data = np.ones((400, 6))
    data[250, 3] = np.nan
    array[:] = data
    corrupt = tmp_path / "corrupt.zarr"
    array = zarr.create_array(str(corrupt), shape=(400, 6), chunks=(100, 6), dtype="f8")
    array[:] = np.random.default_rng(0).standard_normal((400, 6))
    with open(corrupt / "c" / "1" / "0", "r+b") as file:
        file.truncate(10)
    text = tmp_path / "notes.txt"
    text.write_text("not a matrix")
    from ooc_svd.kernels.cuda_backend import cuda_available

    no_gpu = [] if cuda_available(allow_simulator=False)[0] else [
        ("cuda backend", store, ["--backend", "cuda"], "the cuda backend needs a usable NVIDIA GPU")
    ]
    return no_gpu + [
        ("missing store", tmp_path / "absent.zarr", [], "no such file or store"),
        ("k too large", store, ["--k", 41], "k=41 must be at most min(m, n) = 40"),
        ("NaN", nan_store, ["--memory-limit", "6MB"], "NaN or Inf, first at row"),
        ("corrupt chunk", corrupt, ["--memory-limit", "6MB"], "chunk of rows [100, 200)"),
        ("wrong format", text, [], "is a file that is neither .npy nor .npz"),
        ("unknown cuda option", store, ["--cuda-option", "tiles=4"],
         "unknown cuda option 'tiles'"),
        ("cuda option without a value", store, ["--cuda-option", "accumulate"],
         "--cuda-option takes KEY=VALUE"),
        ("cuda streams not an int", store, ["--cuda-option", "streams=two"],
         "streams takes an int"),
        ("cuda option on the cpu", store,
         ["--backend", "cpu", "--cuda-option", "accumulate=float32"],
         "cuda_options apply to the cuda backend"),
    ]


def test_bad_inputs_exit_2_with_a_message_and_no_output(store, tmp_path):
    for name, input_path, extra, message in bad_inputs(tmp_path, store):
        out = tmp_path / "out.zarr"
        done = ooc_svd_command("run", input_path, "--k", 2, *extra, "--out", out, check=False)
        assert done.returncode == 2, (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
        # One line, the last: before it, the run's plan and passes, as a log shows them
        lines = done.stderr.strip().splitlines()
        assert "Traceback" not in done.stderr and lines[-1].startswith("Error: "), lines
        assert not any(line.startswith("Error") for line in lines[:-1]), lines
        assert not any(p.name.startswith("out.zarr") for p in tmp_path.iterdir()), name


def test_run_with_tolerance_writes_factors(store, tmp_path):
    out = tmp_path / "factors.zarr"
    done = ooc_svd_command("run", store, "--tol", 0.05, "--out", out, "--factors",
                           "--spectral-iters", 2, "--json")
    summary = json.loads(done.stdout)
    expected = ooc_svd.svd(store, tol=0.05)
    assert summary["rank"] == expected.rank and summary["residual"] <= 0.05
    assert summary["numerical_rank"] == expected.numerical_rank
    assert summary["passes"] == expected.passes + 2 and summary["spectral_error"] > 0
    # info plans the same run: here the method's passes are exact (gram), not a bound
    info = json.loads(ooc_svd_command("info", store, "--tol", 0.05, "--spectral-iters", 2,
                                      "--json").stdout)
    assert info["method"] == summary["method"] == "gram"
    assert info["passes"] == summary["passes"] and info["spectral_iters"] == 2
    assert info["most_passes"] == info["passes"] + 1  # should gram switch to exact
    group = zarr.open_group(str(out), mode="r")
    attrs = group.attrs["ooc_svd"]
    # gram takes no basis and no power iterations: none is recorded as used
    assert attrs["tol"] == 0.05 and attrs["niter"] is None and attrs["basis_size"] is None
    assert attrs["k"] is None and attrs["max_rank"] == 40 and attrs["spectral_iters"] == 2
    B, A = group["B"][:].astype(float), group["A"][:].astype(float)
    assert B.shape == (30000, expected.rank) and A.shape == (expected.rank, 40)
    np.testing.assert_allclose(B, group["U"][:] * group["S"][:], rtol=1e-6)
    data = zarr.open_array(store, mode="r")[:].astype(float)
    error = np.linalg.norm(data - B @ A) / np.linalg.norm(data)
    assert error == pytest.approx(summary["residual"], rel=1e-3)
    text = ooc_svd_command("run", store, "--k", 3, "--spectral-iters", 1, "--out",
                           tmp_path / "text.zarr").stdout
    assert "(relative, Frobenius), spectral error estimate" in text.splitlines()[-1]


def test_info_says_where_the_kernels_would_run(store):
    from ooc_svd.kernels.cuda_backend import cuda_available

    cpu = json.loads(ooc_svd_command("info", store, "--k", 5, "--backend", "cpu",
                                     "--json").stdout)
    assert (cpu["backend"], cpu["backend_reason"]) == ("cpu", "backend='cpu' was requested")
    auto = ooc_svd_command("info", store, "--k", 5, "--method", "randomized")
    gpu, why_not = cuda_available(allow_simulator=False)
    expected = "Kernels: cuda (" if gpu else f"Kernels: cpu ({why_not})."
    assert expected in auto.stdout
    refused = ooc_svd_command("info", store, "--k", 5, "--backend", "cpu", "--cuda-option",
                              "streams=3", check=False)
    assert refused.returncode == 2 and "not backend='cpu'" in refused.stderr


def test_info_opens_its_input_once(tmp_path, monkeypatch):
    """A sparse .npz is loaded whole when opened: info must not load it twice."""
    import scipy.sparse
    from click.testing import CliRunner

    from ooc_svd.cli import main

    A = scipy.sparse.random(200, 30, density=0.1, format="csr", random_state=1)
    path = str(tmp_path / "A.npz")
    scipy.sparse.save_npz(path, A)
    loads, load_npz = [], scipy.sparse.load_npz
    monkeypatch.setattr(scipy.sparse, "load_npz", lambda p: loads.append(p) or load_npz(p))
    result = CliRunner().invoke(main, ["info", path, "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["nnz"] == A.nnz
    assert loads == [path]


def test_info_describes_a_file_a_run_loads_from_its_headers(tmp_path, monkeypatch):
    """A sparse .npz, or a compressed dense one, is loaded whole by a run: info without a
    rank describes it from its arrays' headers, as the opened input would, loading nothing."""
    import scipy.sparse
    from click.testing import CliRunner

    from ooc_svd.cli import main
    from ooc_svd.sources import dense
    from ooc_svd.sources.open import open_source

    A = scipy.sparse.random(200, 30, density=0.1, format="csr", dtype=np.float32,
                            random_state=1)
    paths = []
    for layout in ("csr", "coo", "csc"):
        paths.append(str(tmp_path / f"{layout}.npz"))
        scipy.sparse.save_npz(paths[-1], A.asformat(layout), compressed=layout != "csc")
    paths.append(str(tmp_path / "int64.npz"))  # indices that scipy loads as int32
    np.savez(paths[-1], format=b"csr", shape=np.array(A.shape), data=A.data,
             indices=A.indices.astype(np.int64), indptr=A.indptr.astype(np.int64))
    paths.append(str(tmp_path / "dense.npz"))
    np.savez_compressed(paths[-1], np.ones((40, 6), np.float16))  # read as float32
    expected = {}
    for path in paths:
        source = open_source(path)
        expected[path] = {"format": source.kind, "shape": list(source.shape),
                          "dtype": str(source.dtype), "nnz": getattr(source, "nnz", None),
                          "bytes_raw": source.nbytes, "bytes_stored": os.path.getsize(path)}

    def no_loading(*args):
        raise AssertionError("loaded")

    monkeypatch.setattr(scipy.sparse, "load_npz", no_loading)
    monkeypatch.setattr(dense, "_loaded_member", no_loading)
    for path in paths:
        done = CliRunner().invoke(main, ["info", path, "--json"])
        assert done.exit_code == 0, done.output
        report = json.loads(done.output)
        assert {key: report[key] for key in expected[path]} == expected[path], path
    assert "40 x 6 float16, no storage chunks, 960 B raw" in \
        CliRunner().invoke(main, ["info", paths[-1]]).output
    monkeypatch.undo()
    # What a run refuses, info refuses as before: it opens what its headers do not
    # describe as a usable matrix
    np.savez_compressed(tmp_path / "complex.npz", np.ones((4, 3), np.complex64))
    np.savez_compressed(tmp_path / "empty.npz", np.ones((0, 3)))
    np.savez(tmp_path / "short.npz", format=b"csr", shape=np.array(A.shape), data=A.data,
             indices=A.indices, indptr=A.indptr[:-5])
    for name, said in (("complex", "complex dtype complex64 is not supported"),
                       ("empty", "A is empty: shape (0, 3)"),
                       ("short", "index pointer size 196 should be 201")):
        done = CliRunner().invoke(main, ["info", str(tmp_path / f"{name}.npz")])
        assert done.exit_code == 2 and said in done.output, done.output


def test_info_plans_a_cluster_run_without_contacting_it(store):
    """Workers keep no block cache and choose their kernels; --backend cuda is for them."""
    local = json.loads(ooc_svd_command("info", store, "--k", 5, "--method", "randomized",
                                       "--json").stdout)
    assert local["cached_blocks"] == local["blocks"]  # A fits: read once for three passes
    assert local["bytes_to_read"] == local["bytes_raw"]
    cluster = json.loads(ooc_svd_command(
        "info", store, "--k", 5, "--method", "randomized", "--backend", "cuda", "--json",
        "--scheduler", "tcp://no-such-host.invalid:8786").stdout)
    assert cluster["cached_blocks"] == 0
    assert cluster["bytes_to_read"] == 3 * cluster["bytes_raw"]
    assert cluster["backend"] == "cuda on the workers"


def test_info_without_a_rank_describes_the_input_alone(store, tmp_path):
    report = json.loads(ooc_svd_command("info", store, "--json").stdout)
    assert report["shape"] == [30000, 40] and "method" not in report
    np.save(tmp_path / "A.npy", np.ones((10, 3)))
    report = json.loads(ooc_svd_command("info", tmp_path / "A.npy", "--json").stdout)
    assert report["bytes_stored"] == os.path.getsize(tmp_path / "A.npy")  # the file's
    assert "Give --k or --tol" in ooc_svd_command("info", store).stdout
    done = ooc_svd_command("info", store, "--memory-limit", "5MB", "--niter", "3", check=False)
    assert done.returncode == 2
    assert "niter, memory_limit shape the plan of a run: give --k or --tol" in done.stderr


def test_info_of_a_result_describes_it(store, tmp_path):
    out = tmp_path / "r.zarr"
    done = json.loads(ooc_svd_command("run", store, "--k", 4, "--center", "--out", out,
                                      "--json").stdout)
    report = json.loads(ooc_svd_command("info", out, "--json").stdout)
    assert report["result"] == str(out) and report["shape"] == [30000, 40]
    assert report["rank"] == 4 and report["centered"] and report["S"] == done["S"]
    assert report["residual"] == done["residual"] and report["method"] == done["method"]
    text = ooc_svd_command("info", out).stdout
    assert text.startswith(f"{out}: an ooc_svd result, rank 4 of the 30000 x 40 matrix ")
    assert f"ooc-svd check {out} INPUT verifies it" in text
    # a plan is of an input: a result is none
    done = ooc_svd_command("info", out, "--k", 2, check=False)
    assert done.returncode == 2 and "is an ooc_svd result, not a matrix to factor" in done.stderr


def test_json_failures_are_json_on_stdout(store, tmp_path):
    done = ooc_svd_command("run", store, "--k", 3, "--out", tmp_path / "r.zarr",
                           "--memory-limit", "1kB", "--json", check=False)
    failure = json.loads(done.stdout)
    assert done.returncode == failure["exit_code"] == 2
    assert failure["error"].startswith("memory_limit 1 kB is too small")
    assert failure["error"] in done.stderr


def test_sigterm_ends_a_run_as_ctrl_c_does_and_it_resumes(store, tmp_path, monkeypatch):
    """A batch scheduler's time limit sends SIGTERM: exit code 143, the checkpoint kept and
    said so, no partial output or lock left; the run resumes from there."""
    from click.testing import CliRunner

    import ooc_svd.engine
    from ooc_svd.cli import main

    out = str(tmp_path / "r.zarr")
    args = ["run", store, "--k", "3", "--method", "randomized", "--out", out, "--json"]

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises before this ends

    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "tsqr_final_pass", terminated)
        done = CliRunner().invoke(main, args)
    assert done.exit_code == 143, done.output
    failure = json.loads(done.output.splitlines()[0])
    assert failure["exit_code"] == 143
    assert failure["error"].startswith(f"terminated (SIGTERM); the completed passes are kept "
                                       f"in {out}.checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["r.zarr.checkpoint"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back
    done = CliRunner().invoke(main, [*args, "--resume"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["resumed_passes"] == 2


class SignalledInFinalizer:
    """Sends a signal to this process from its finalizer, whose handler then runs inside
    the finalizer: Python prints the handler's exception as ignored and drops it."""

    def __init__(self, signal_number):
        self.signal_number = signal_number

    def __del__(self):
        os.kill(os.getpid(), self.signal_number)
        for _ in range(100_000):  # the handler runs at one of these bytecodes
            pass


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_whose_exception_a_finalizer_dropped_still_stops_the_run(
        store, tmp_path, monkeypatch, signal_number):
    """The signal is raised again after the block it came in: the run stops there, in its
    first pass (exit 143 or 130), and does not go on to its end."""
    from click.testing import CliRunner

    handler = signal.getsignal(signal_number)
    if handler is signal.SIG_IGN:
        pytest.skip("the signal is ignored in this process, and so by the command")

    from ooc_svd.cli import main
    from ooc_svd.interrupts import Terminated
    from ooc_svd.passes import PassContext

    reading = PassContext.read

    def signalled_after_the_first_block(context, name, **options):
        blocks = reading(context, name, **options)
        yield next(blocks)
        SignalledInFinalizer(signal_number)  # dropped at once: its finalizer runs
        yield from blocks

    dropped = []
    out = str(tmp_path / "r.zarr")
    with monkeypatch.context() as patch:
        patch.setattr(PassContext, "read", signalled_after_the_first_block)
        patch.setattr(sys, "unraisablehook", lambda raised: dropped.append(raised.exc_type))
        done = CliRunner().invoke(main, ["run", store, "--k", "3", "--out", out])
    assert dropped == [Terminated if signal_number == signal.SIGTERM else KeyboardInterrupt]
    assert done.exit_code == 128 + signal_number, done.output
    assert "before a pass was complete; nothing was kept to resume from" in done.output
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal_number) is handler  # given back


def test_a_signal_ignored_when_a_command_begins_stays_ignored():
    """A shell starts a background job with SIGINT ignored: a Ctrl-C meant for the
    foreground must not stop it."""
    from ooc_svd import interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.signals_as_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # (a handler would raise here)
            interrupts.raise_if_lost()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_lost_signal_is_raised_again_only_while_a_command_runs():
    from ooc_svd import interrupts

    interrupts.raise_if_lost()  # nothing received
    with pytest.raises(interrupts.Terminated), interrupts.signals_as_interrupts():
        with contextlib.suppress(interrupts.Terminated):  # as a finalizer would
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        interrupts.raise_if_lost()
    interrupts.raise_if_lost()  # forgotten once the command ended


def test_sigterm_after_the_result_was_renamed_into_place_says_it_is_complete(
        store, tmp_path, monkeypatch):
    """SIGTERM while the checkpoint is removed, after the output was renamed into place:
    the result is there and said to be, and the rest of the checkpoint is removed."""
    from click.testing import CliRunner

    import ooc_svd.checkpoint
    from ooc_svd.cli import Terminated, main

    out = str(tmp_path / "r.zarr")
    removing = ooc_svd.checkpoint.Checkpoint.remove

    def cut_short(checkpoint):
        os.remove(os.path.join(checkpoint.directory, "state.json"))  # a part of it
        raise Terminated

    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.checkpoint.Checkpoint, "remove", cut_short)
        done = CliRunner().invoke(main, ["run", store, "--k", "3", "--method", "randomized",
                                         "--out", out])
    assert done.exit_code == 143, done.output
    assert f"terminated (SIGTERM) after {out} was complete: it is written" in done.output
    assert sorted(os.listdir(tmp_path)) == ["r.zarr"]
    assert ooc_svd.checkpoint.Checkpoint.remove is removing
    assert ooc_svd_command("check", out, store).returncode == 0


def test_an_interrupted_convert_or_generate_says_whether_its_output_was_written(
        tmp_path, monkeypatch):
    """Ctrl-C after the output was renamed into place (while its lock is released) leaves
    a complete output, which the message names; before that, nothing."""
    from click.testing import CliRunner

    import ooc_svd.store
    from ooc_svd.cli import main

    out = str(tmp_path / "g.zarr")
    renaming = ooc_svd.store.move_into_place

    def interrupted_after(*args, **kwargs):
        renaming(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ooc_svd.store, "move_into_place", interrupted_after)
    args = ["generate", out, "--shape", "100", "10", "--chunk", "20"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 130, done.output
    assert f"interrupted after {out} was complete: it is written" in done.output
    assert sorted(os.listdir(tmp_path)) == ["g.zarr"]
    # the same output again, replaced: the old one was there before, this one is new
    done = CliRunner().invoke(main, [*args, "--overwrite"])
    assert done.exit_code == 130 and "was complete: it is written" in done.output


def test_a_failure_of_the_system_is_one_line_that_keeps_the_passes(store, tmp_path,
                                                                 monkeypatch):
    """A full disk, or a cluster that lost its workers, is no bug: exit code 1 with one
    line (JSON with --json), and the checkpoint kept for --resume."""
    from click.testing import CliRunner

    import ooc_svd.engine
    from ooc_svd.cli import main
    from ooc_svd.errors import ClusterError

    out = str(tmp_path / "r.zarr")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def cluster_lost(*args, **kwargs):  # not the input's fault: a batch job may retry
        raise ClusterError("the cluster has had no worker for 10 s")

    for failing, said in ((disk_full, "OSError: [Errno 28] No space left on device"),
                          (cluster_lost, "the cluster has had no worker for 10 s")):
        with monkeypatch.context() as patch:
            patch.setattr(ooc_svd.engine, "tsqr_final_pass", failing)
            done = CliRunner().invoke(main, ["run", store, "--k", "3", "--method",
                                             "randomized", "--out", out, "--json"])
        assert done.exit_code == 1, done.output
        failure = json.loads(done.output.splitlines()[0])
        assert failure == {"error": f"{said}; the completed passes are kept in "
                                    f"{out}.checkpoint: the same command with --resume "
                                    "continues from there", "exit_code": 1}


def test_a_failed_spill_names_the_scratch_directory(tmp_path, monkeypatch):
    import ooc_svd.store

    def short_write(*args, **kwargs):
        raise OSError("200000 requested and 104432 written")  # numpy's, on a full disk

    with ooc_svd.store.QSpill(str(tmp_path)) as spill:
        monkeypatch.setattr(ooc_svd.store.np, "save", short_write)
        with pytest.raises(OSError, match=f"cannot write the final pass's factors into "
                                          f"{spill.directory} .*: 200000 requested"):
            spill.write("Q", 0, np.ones((3, 2)))


@pytest.mark.parametrize("command", ["generate", "convert", "run"])
def test_a_full_disk_names_the_output_it_could_not_write(command, store, tmp_path,
                                                          monkeypatch):
    """zarr's writes on a full disk fail with an OSError that names no file: the one line
    names the output, and keeps the errno."""
    import scipy.sparse
    import zarr
    from click.testing import CliRunner

    from ooc_svd.cli import main

    out = str(tmp_path / "out.zarr")
    if command == "convert":
        scipy.sparse.save_npz(tmp_path / "A.npz", scipy.sparse.random(50, 20, density=0.2,
                                                                      format="csr", rng=1))
    args = {"generate": ["generate", out, "--shape", "100", "10"],
            "convert": ["convert", str(tmp_path / "A.npz"), out],
            "run": ["run", store, "--k", "3", "--method", "randomized", "--out", out]}[command]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zarr.Array, "__setitem__", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        done = CliRunner().invoke(main, args)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # files closed
    assert done.exit_code == 1, done.output
    error = done.output.strip().splitlines()[-1]  # after the run's plan and passes
    assert error.startswith(f"Error: OSError: cannot write {out} (written first as "
                            f"{out}.partial): [Errno 28] No space left on device"), done.output
    assert not os.path.exists(out + ".partial")


def test_write_failure_keeps_the_errno_and_what_names_its_file():
    from ooc_svd.errors import OutputExistsError
    from ooc_svd.store import write_failure

    named = write_failure("the checkpoint c", OSError(28, "No space left on device"))
    assert (str(named), named.errno) == (
        "cannot write the checkpoint c: [Errno 28] No space left on device", 28)
    for kept in (OSError(13, "Permission denied", "/a/file"), OutputExistsError("exists")):
        assert write_failure("x", kept) is kept


def test_an_interrupt_says_what_it_kept():
    from ooc_svd.cli import interrupted_message

    assert "nothing was kept" in interrupted_message("interrupted",
                                                   "/no/such/result.zarr.checkpoint")


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--rank", 0], "rank=0 must be between 1 and min"),
     (["--chunk", 0], "--chunk 0 must be >= 1"),
     (["--rank", 11], "rank=11 must be between 1 and min"),
     (["--decay", -1], "must be a finite number >= 0"),
     (["--decay", "inf"], "decay=inf must be a finite number >= 0"),
     (["--seed", -1], "seed=-1 must be >= 0"),
     (["--seed", 2**64], f"seed={2**64} must be <= {2**64 - 1}"),
     (["--density", "0.1", "--seed", -1], "seed=-1 must be >= 0"),
     (["--density", "0.1", "--column-exponent", "inf"], "column_exponent=inf must be a finite")],
)
def test_generate_refuses_a_matrix_it_cannot_make(tmp_path, options, message):
    from click.testing import CliRunner

    from ooc_svd.cli import main

    out = str(tmp_path / "g.zarr")
    done = CliRunner().invoke(main, ["generate", out, "--shape", "100", "10",
                                     *map(str, options)])
    assert done.exit_code == 2 and message in done.output
    assert not os.path.exists(out)


@pytest.mark.parametrize("shape", [(60, 500), (500, 60)])
def test_generated_spectrum_is_exact_when_the_left_factor_fits(tmp_path, monkeypatch, shape):
    """Rank min(m, n) by default; exactly the designed singular values when G is drawn
    whole, within about sqrt(rank / m) of them when each chunk is Gaussian."""
    import ooc_svd.synthetic
    from ooc_svd.synthetic import write_dense_matrix

    array = write_dense_matrix(tmp_path / "exact.zarr", shape, decay=0.05, dtype="float64",
                               chunk_rows=25)
    designed = array.attrs["ooc_svd_synthetic"]
    assert designed["rank"] == min(shape) == len(designed["singular_values"])
    assert designed["exact"]
    s = np.linalg.svd(array[:], compute_uv=False)
    np.testing.assert_allclose(s, designed["singular_values"], rtol=1e-12)
    monkeypatch.setattr(ooc_svd.synthetic, "EXACT_LEFT_BYTES", 0)
    array = write_dense_matrix(tmp_path / "gaussian.zarr", shape, rank=5, dtype="float64",
                               chunk_rows=25)
    designed = array.attrs["ooc_svd_synthetic"]
    assert not designed["exact"]
    s = np.linalg.svd(array[:], compute_uv=False)[:5]
    relative = np.abs(s / designed["singular_values"] - 1).max()
    assert 1e-6 < relative < 3 * np.sqrt(5 / shape[0])


@pytest.mark.parametrize("exact_left_bytes", [0, 1 << 27])
def test_a_generated_dense_matrix_does_not_depend_on_its_chunks(tmp_path, monkeypatch,
                                                                exact_left_bytes):
    """Rows are drawn by fixed groups (7 rows here), not by chunks: the same seed gives the
    same matrix whether the left factor is drawn whole or a chunk at a time."""
    import ooc_svd.synthetic
    from ooc_svd.synthetic import write_dense_matrix

    monkeypatch.setattr(ooc_svd.synthetic, "DENSE_GROUP_ROWS", 7)
    monkeypatch.setattr(ooc_svd.synthetic, "EXACT_LEFT_BYTES", exact_left_bytes)
    arrays = [write_dense_matrix(tmp_path / f"{chunk}.zarr", (100, 12), dtype="float64",
                                 chunk_rows=chunk, seed=3)[:] for chunk in (5, 7, 30, 100)]
    for other in arrays[1:]:
        np.testing.assert_array_equal(other, arrays[0])
    assert not np.array_equal(arrays[0][:7], arrays[0][7:14])  # each group its own stream


def test_generators_take_numpy_scalars_and_refuse_what_is_not_a_number(tmp_path):
    from ooc_svd.errors import InputError
    from ooc_svd.synthetic import write_dense_matrix, write_sparse_matrix

    dense = write_dense_matrix(tmp_path / "d.zarr", (50, 10), seed=np.uint64(7),
                               decay=np.float32(0.5))
    assert dense.attrs["ooc_svd_synthetic"]["seed"] == 7
    sparse = write_sparse_matrix(tmp_path / "s.zarr", (50, 10), nnz=100, seed=np.int32(7),
                                 column_exponent=np.float64(1))
    assert sparse.attrs["ooc_svd_synthetic"]["seed"] == 7
    for write, options, message in (
            (write_dense_matrix, {"decay": "x"}, "decay must be a number, not 'x'"),
            (write_dense_matrix, {"decay": True}, "decay must be a number"),
            (write_sparse_matrix, {"nnz": 100, "column_exponent": 1j}, "must be a number")):
        with pytest.raises(InputError, match=message):
            write(tmp_path / "x.zarr", (50, 10), **options)
    assert sorted(os.listdir(tmp_path)) == ["d.zarr", "s.zarr"]


def test_generate_refuses_options_of_the_other_kind(tmp_path):
    from click.testing import CliRunner

    from ooc_svd.cli import main

    out = str(tmp_path / "g.zarr")
    for options, message in ((["--column-exponent", "2"], "give --density too"),
                             (["--density", "0.1", "--rank", "3"], "not with --density"),
                             (["--density", "0.1", "--column-exponent", "-2"],
                              "column_exponent=-2.0 must be a finite number >= 0")):
        done = CliRunner().invoke(main, ["generate", out, "--shape", "100", "10", *options])
        assert done.exit_code == 2 and message in done.output
    assert not os.path.exists(out)


def test_generate_overwrites_only_a_generated_matrix(tmp_path):
    from click.testing import CliRunner

    from ooc_svd.cli import main

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    args = ["generate", str(folder), "--shape", "100", "10", "--overwrite"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 2 and "is not a matrix ooc_svd generated" in done.output
    assert (folder / "notes.txt").read_text() == "kept"
    generated = str(tmp_path / "g.zarr")
    for _ in range(2):  # then replaced
        done = CliRunner().invoke(main, ["generate", generated, "--shape", "100", "10",
                                         "--overwrite"])
        assert done.exit_code == 0 and "chunks of 100 rows" in done.output
    done = CliRunner().invoke(main, ["generate", generated, "--shape", "100", "10"])
    assert done.exit_code == 2 and "pass overwrite=True (--overwrite)" in done.output


def test_generate_interrupted_leaves_nothing_and_a_killed_one_is_replaced(tmp_path,
                                                                          monkeypatch):
    import zarr

    import ooc_svd.synthetic
    from ooc_svd.store import STAGED_FOR, UNFINISHED
    from ooc_svd.synthetic import write_dense_matrix

    out = tmp_path / "g.zarr"
    draw = ooc_svd.synthetic.philox_generator

    def interrupted_at_the_third_group(seed, index):
        if index == 2:
            raise KeyboardInterrupt
        return draw(seed, index)

    # Rows drawn a chunk at a time (not the whole left factor first), so that the interrupt
    # comes with the output half written.
    monkeypatch.setattr(ooc_svd.synthetic, "EXACT_LEFT_BYTES", 0)
    monkeypatch.setattr(ooc_svd.synthetic, "DENSE_GROUP_ROWS", 20)
    monkeypatch.setattr(ooc_svd.synthetic, "philox_generator", interrupted_at_the_third_group)
    with pytest.raises(KeyboardInterrupt):
        write_dense_matrix(out, (100, 10), chunk_rows=20)
    assert os.listdir(tmp_path) == []
    from click.testing import CliRunner

    from ooc_svd.cli import main

    done = CliRunner().invoke(main, ["generate", str(out), "--shape", "100", "10", "--chunk",
                                     "20"])  # Ctrl-C: exit code 130, not click's 'Aborted!'
    assert done.exit_code == 130 and "interrupted; nothing was written as" in done.output
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(ooc_svd.synthetic, "philox_generator", draw)
    zarr.create_array(str(out) + ".partial", shape=(100, 10), dtype="f4",
                      attributes={UNFINISHED: "synthetic"})  # what SIGKILL leaves
    array = write_dense_matrix(out, (100, 10), chunk_rows=20)
    assert os.listdir(tmp_path) == ["g.zarr"]
    assert set(array.attrs) == {"ooc_svd_synthetic", STAGED_FOR}  # no UNFINISHED mark
    assert np.abs(array[:]).min() > 0


def test_an_empty_or_malformed_npz_input_is_a_one_line_error(tmp_path):
    """numpy reports an empty file by EOFError, which click would turn into a bare
    'Aborted!'."""
    import json

    from click.testing import CliRunner

    from ooc_svd.cli import main

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.array(b"xyz"), shape=np.array([3, 4]), data=np.ones(2))
    numbered = tmp_path / "numbered.npz"  # scipy itself failed on it with AttributeError
    np.savez(numbered, format=np.array(5), shape=np.array([3, 4]), data=np.ones(2))
    for path, message in ((empty, "cannot open"), (bad, "is not a scipy.sparse .npz"),
                          (numbered, "its format member 5 is not one of csr")):
        out = str(tmp_path / "out.zarr")
        done = CliRunner().invoke(main, ["run", str(path), "--k", "1", "--out", out, "--json"])
        assert done.exit_code == 2, done.output
        assert message in json.loads(done.output.splitlines()[0])["error"]
        done = CliRunner().invoke(main, ["info", str(path)])
        assert done.exit_code == 2 and message in done.output, done.output
        assert not os.path.exists(out)


def test_resume_without_a_checkpoint_says_it_starts_over(store, tmp_path):
    """A mistyped --out with --resume would otherwise recompute every pass without a word;
    the warning is one line, as the command's other messages."""
    out = tmp_path / "result.zarr"
    done = ooc_svd_command("run", store, "--k", 3, "--out", out, "--resume", "--quiet")
    assert done.stderr == (f"Warning: no checkpoint at '{out}.checkpoint' to resume: the run "
                           "starts from its first pass\n")
