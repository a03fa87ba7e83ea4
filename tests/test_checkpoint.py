"""Checkpoints after each pass, and resuming a run that died."""

import os

import naive
import numpy as np
import pytest

import ooc_svd
import ooc_svd.engine
from ooc_svd import InputError


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing handles it."""


def die(*args, **kwargs):
    raise Killed


@pytest.mark.parametrize(
    ("method", "rank", "dies_in", "resumed"),
    [
        ("randomized", {"k": 4}, "tsqr_final_pass", 2),  # both power passes are kept
        ("krylov", {"k": 4}, "tsqr_final_pass", 2),
        ("gram", {"k": 4}, "tsqr_final_pass", 1),  # G is kept
        ("exact", {"k": 4}, "tsqr_final_pass", 1),  # R is kept
        # Fixed accuracy: two blocks of basis, niter + 1 = 3 passes each, are kept.
        ("randomized", {"tol": 0.02}, "_final_pass", 6),
    ],
)
def test_resume_skips_completed_passes_and_gives_the_same_result(
    tmp_path, monkeypatch, method, rank, dies_in, resumed
):
    A = naive.matrix_with_spectrum(500, 60, 1.0 / np.arange(1, 61), seed=2) + 3.0
    out = str(tmp_path / "result.zarr")
    reference = ooc_svd.svd(A, method=method, center=True, **rank)

    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, dies_in, die)
        with pytest.raises(Killed):
            ooc_svd.svd(A, method=method, center=True, out=out, **rank)
    assert not (tmp_path / "result.zarr").exists()
    assert (tmp_path / "result.zarr.checkpoint").is_dir()

    result = ooc_svd.svd(A, method=method, center=True, out=out, resume=True, **rank)
    assert [r.name.endswith("(resumed)") for r in result.records].count(True) == resumed
    assert result.passes == reference.passes
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)
    np.testing.assert_allclose(result.V, reference.V, atol=1e-12)
    np.testing.assert_allclose(result.U[:], reference.U, atol=1e-12)
    np.testing.assert_allclose(result.mean, reference.mean, rtol=1e-14)
    assert not (tmp_path / "result.zarr.checkpoint").exists()


def test_resume_with_other_parameters_is_refused(tmp_path, monkeypatch):
    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")
    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "tsqr_final_pass", die)
        with pytest.raises(Killed):
            ooc_svd.svd(A, 3, method="randomized", out=out)
    with pytest.raises(InputError, match=r"different basis size \(k \+ oversample\) \(13 "
                                         r"then, 14 now\); k \(3 then, 4 now\); seed "):
        ooc_svd.svd(A, 4, method="randomized", out=out, resume=True, seed=5)
    # Without resume the stale checkpoint is replaced.
    result = ooc_svd.svd(A, 4, method="randomized", out=out)
    assert not any(r.name.endswith("(resumed)") for r in result.records)


@pytest.mark.parametrize("resume", [True, False])
def test_the_spill_of_a_killed_run_is_removed_by_the_next(tmp_path, monkeypatch, resume):
    """A kill skips every cleanup: the next run with the checkpoint removes the spill."""
    from ooc_svd.store import QSpill

    A = naive.matrix_with_spectrum(100_000, 30, 1.0 / np.arange(1, 31), seed=3)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    options = dict(method="randomized", out=str(tmp_path / "result.zarr"),
                   scratch_dir=str(scratch), memory_limit="8MB")
    with monkeypatch.context() as patch:
        patch.setattr(QSpill, "close", lambda self: None)  # the process dies: no cleanup
        patch.setattr(ooc_svd.engine, "left_vectors_sweep", die)
        with pytest.raises(Killed):
            ooc_svd.svd(A, 4, **options)
    left = list(scratch.iterdir())
    assert len(left) == 1 and left[0].name.startswith("ooc-svd-spill-")
    assert any(left[0].iterdir())  # Q factors were spilled
    (scratch / "unrelated").mkdir()
    result = ooc_svd.svd(A, 4, resume=resume, **options)
    assert [p.name for p in scratch.iterdir()] == ["unrelated"]
    reference = ooc_svd.svd(A, 4, method="randomized", memory_limit="8MB")
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)


def test_a_ctrl_c_while_reader_threads_start_leaves_none_behind(monkeypatch):
    """Thread.start waits for the thread to run, so a Ctrl-C can land after the thread runs
    but before the executor records it; the interpreter's exit hook then does not know the
    thread and would wait for it forever (seen as a hang after Ctrl-C, about once in 20)."""
    import threading

    from ooc_svd.sources import open_source, prefetch_blocks

    start, started = threading.Thread.start, []

    def start_then_interrupt(thread):
        start(thread)
        if thread.name.startswith("ooc-svd-read"):
            started.append(thread)
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    source = open_source(np.ones((100, 4)))
    # Held, as the CLI's error holds it: its frames keep the half-made reader alive.
    with pytest.raises(KeyboardInterrupt) as interrupted:
        prefetch_blocks(source, [(0, 50), (50, 100)], depth=2)
    monkeypatch.setattr(threading.Thread, "start", start)
    for thread in started:
        thread.join(timeout=5)
    assert len(started) == 1 and not started[0].is_alive(), interrupted


def kill_in_final_pass(A, out, monkeypatch, **options):
    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "tsqr_final_pass", die)
        with pytest.raises(Killed):
            ooc_svd.svd(A, 3, method="randomized", out=out, **options)


def test_resume_after_the_input_store_changed_is_refused(tmp_path, monkeypatch):
    """A chunk rewritten with values of the same shape and dtype: the saved passes belong to
    the old matrix. The same store named by another path resumes."""
    import zarr

    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=A.shape, chunks=(100, 20), dtype=A.dtype)[:] = A
    out = str(tmp_path / "result.zarr")
    kill_in_final_pass(path, out, monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = ooc_svd.svd("./A.zarr/", 3, method="randomized", out=out, resume=True)
    assert any(r.name.endswith("(resumed)") for r in result.records)

    kill_in_final_pass(path, out, monkeypatch, overwrite=True)
    zarr.open_array(path, mode="r+")[100:200] = A[100:200][::-1]
    with pytest.raises(InputError, match=f"made with different input files "
                                         f"\\({os.path.realpath(path)} changed since\\)"):
        ooc_svd.svd(path, 3, method="randomized", out=out, resume=True, overwrite=True)


@pytest.mark.parametrize(("name", "content"), [("power1.npz", b""), ("power1.npz", b"PK\3\4"),
                                               ("power1.npz", b"junk\n"),
                                               ("state.json", b'{"k": 3'),
                                               ("state.json", b"[1]")])
def test_a_corrupt_checkpoint_is_named_not_a_traceback(tmp_path, monkeypatch, name, content):
    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")
    kill_in_final_pass(A, out, monkeypatch)
    corrupt = tmp_path / "result.zarr.checkpoint" / name
    assert corrupt.exists()
    corrupt.write_bytes(content)
    saved = sorted(path.name for path in corrupt.parent.iterdir())
    with pytest.raises(ooc_svd.CheckpointError, match=f"checkpoint file .*{name}' is "
                                                      "unreadable .*run without resume") as refused:
        ooc_svd.svd(A, 3, method="randomized", out=out, resume=True)
    from ooc_svd.cli import failure_message

    assert failure_message(refused.value) == str(refused.value)  # no advice to resume
    assert "pickle" not in str(refused.value)  # numpy's word for a file that is not a zip
    assert sorted(path.name for path in corrupt.parent.iterdir()) == saved  # nothing lost
    result = ooc_svd.svd(A, 3, method="randomized", out=out)  # without resume: a new start
    assert not any(r.name.endswith("(resumed)") for r in result.records)


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda saved: saved | {"X": saved["X"][:, :2]}, "are not those it lists"),
    (lambda saved: {key: value for key, value in saved.items() if key != "X"},
     "are not those it lists"),
    (lambda saved: saved | {"X": np.where(saved["X"] > 0, np.nan, saved["X"])},
     "X holds NaN or Inf"),
    (lambda saved: {key: value for key, value in saved.items() if key != "__manifest__"},
     "no manifest of its arrays"),
])
def test_a_checkpoint_whose_arrays_were_changed_is_refused(tmp_path, monkeypatch, edit,
                                                          problem):
    """A readable step file whose arrays are not those the run saved (another file, or
    one edited): a basis of 2 columns became a rank-2 result of a k=3 run, a missing or
    NaN basis a traceback."""
    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")
    kill_in_final_pass(A, out, monkeypatch)
    path = tmp_path / "result.zarr.checkpoint" / "power1.npz"
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    np.savez(path, **edit(arrays))
    with pytest.raises(ooc_svd.CheckpointError, match=f"power1.npz' is unreadable \\(.*"
                                                      f"{problem}.*run without resume"):
        ooc_svd.svd(A, 3, method="randomized", out=out, resume=True)


@pytest.mark.parametrize("method", ["gram", "exact"])
def test_a_checkpoint_saved_before_shifted_after_was_recorded_resumes(tmp_path, monkeypatch,
                                                                       method):
    """The factoring pass's state of an earlier version lacks ``shifted_after``: resumed as
    it counted then (all of a sparse shift), not a KeyError."""
    import json

    import scipy.sparse

    A = scipy.sparse.random(3000, 40, density=0.05, format="csr", rng=3)
    mean = np.asarray(A.mean(axis=0)).ravel()
    out = str(tmp_path / "result.zarr")
    reference = ooc_svd.svd(A, 3, method=method, mean=mean)
    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "_final_pass_over_v", die)
        with pytest.raises(Killed):
            ooc_svd.svd(A, 3, method=method, mean=mean, out=out)
    name = "gram" if method == "gram" else "tsqr"
    path = tmp_path / "result.zarr.checkpoint" / f"{name}.npz"
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files if key != "shifted_after"}
    manifest = json.loads(str(arrays["__manifest__"]))
    del manifest["shifted_after"]
    arrays["__manifest__"] = np.array(json.dumps(manifest))
    np.savez(path, **arrays)
    result = ooc_svd.svd(A, 3, method=method, mean=mean, out=out, resume=True)
    assert any(r.name.endswith("(resumed)") for r in result.records)
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)


def test_a_run_that_fails_to_read_a_chunk_keeps_its_checkpoint(tmp_path, monkeypatch):
    """A read error in a late pass (a file server's hiccup) loses none of the passes before
    it: the run resumed reads again from there."""
    from ooc_svd.errors import ReadError

    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")
    reference = ooc_svd.svd(A, 3, method="randomized")

    def unreadable(*args, **kwargs):
        raise ReadError("cannot read the chunk of rows [0, 300)")

    from ooc_svd.cli import failure_message

    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "tsqr_final_pass", unreadable)
        with pytest.raises(ReadError) as failed:
            ooc_svd.svd(A, 3, method="randomized", out=out)
    checkpoint = out + ".checkpoint"
    assert failure_message(failed.value).endswith(
        f"the completed passes are kept in {checkpoint}: the same command with --resume "
        "continues from there")
    # An error before any pass speaks of no checkpoint, though one is kept from before.
    with pytest.raises(InputError) as refused:
        ooc_svd.svd(A, 50, method="randomized", out=out)
    assert failure_message(refused.value) == str(refused.value)
    result = ooc_svd.svd(A, 3, method="randomized", out=out, resume=True)
    assert [r.name.endswith("(resumed)") for r in result.records].count(True) == 2
    np.testing.assert_allclose(result.S, reference.S, rtol=1e-12)


@pytest.mark.parametrize("refusal", [
    InputError("a worker cannot read the input 'A.zarr' as this process does"),
    ooc_svd.PlanError("the GPU of worker tcp://10.0.0.2 has 1 GB free; the run needs 3 GB")])
def test_a_mid_run_refusal_of_the_setting_not_the_values_keeps_the_checkpoint(
        tmp_path, monkeypatch, refusal):
    """A cluster's worker that cannot see the input, or a GPU busy for the moment, is
    fixed outside the run, whose passes are then resumed: only values that cannot be used
    (a NonFiniteError) drop them."""
    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")

    def refused(*args, **kwargs):
        raise refusal

    with monkeypatch.context() as patch:
        patch.setattr(ooc_svd.engine, "tsqr_final_pass", refused)
        with pytest.raises(type(refusal)) as failed:
            ooc_svd.svd(A, 3, method="randomized", out=out)
    assert failed.value.kept_checkpoint == out + ".checkpoint"
    result = ooc_svd.svd(A, 3, method="randomized", out=out, resume=True)
    assert [r.name.endswith("(resumed)") for r in result.records].count(True) == 2


def test_resuming_a_finished_run_says_it_finished(tmp_path):
    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")
    ooc_svd.svd(A, 3, out=out)
    with pytest.raises(ooc_svd.OutputExistsError, match="exists; pass overwrite=True .*resume "
                                                        "continues a run that did not finish"):
        ooc_svd.svd(A, 3, out=out, resume=True)


def test_a_checkpoint_killed_while_writing_its_state_is_replaced(tmp_path):
    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    checkpoint = tmp_path / "result.zarr.checkpoint"
    checkpoint.mkdir()
    (checkpoint / "state.json.partial").write_text('{"k": ')
    result = ooc_svd.svd(A, 3, method="randomized", out=str(tmp_path / "result.zarr"))
    assert result.S.shape == (3,) and not checkpoint.exists()


def test_a_dangling_link_inside_the_input_does_not_stop_a_checkpointed_run(tmp_path):
    import os

    import zarr

    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    path = str(tmp_path / "A.zarr")
    zarr.create_array(path, shape=A.shape, chunks=(100, 20), dtype=A.dtype)[:] = A
    os.symlink(str(tmp_path / "nowhere"), os.path.join(path, "notes"))
    result = ooc_svd.svd(path, 3, method="exact", out=str(tmp_path / "result.zarr"))
    np.testing.assert_allclose(result.S, np.logspace(0, -3, 20)[:3], rtol=1e-12)


def test_a_checkpoint_killed_while_it_is_removed_is_still_one(tmp_path, monkeypatch):
    """A finished run removes its checkpoint, state.json last: killed during the removal,
    the checkpoint left is still known as one, and the next run replaces it."""
    import os

    A = naive.matrix_with_spectrum(300, 20, np.logspace(0, -3, 20), seed=1)
    out = str(tmp_path / "result.zarr")
    checkpoint = tmp_path / "result.zarr.checkpoint"
    kill_in_final_pass(A, out, monkeypatch)
    unlink = os.unlink

    def unlink_then_die(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if os.fspath(path).startswith(str(checkpoint)):
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", unlink_then_die)
        with pytest.raises(Killed):
            ooc_svd.svd(A, 3, method="randomized", out=out, resume=True)
    assert (checkpoint / "state.json").exists()
    result = ooc_svd.svd(A, 3, method="randomized", out=out, overwrite=True)
    assert result.S.shape == (3,) and not checkpoint.exists()
