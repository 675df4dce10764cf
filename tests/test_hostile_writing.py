"""Hostile input, safe writing: outputs appear whole or not at all.

An output with external data is a pair published by renames: the data file, named for this write
(``<out>.<8 hex>.data``), first, the model last; a reader sees the old pair or the new pair, never a
mix, whatever stops the writer when (an exception, SIGINT/SIGTERM, SIGKILL at each file operation),
and the next save cleans up what a killed one left.  Concurrent writers take turns.  An output that
would overwrite the input, a missing output folder or a folder given as output: exit 2, nothing
written.  Write failures (permissions, read-only or full file system, ``ulimit -f``, names too
long) are exit 2 with one line naming the output and the cause; the input bytes never change.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import make_convtranspose_model
from hostile import assert_refused, error_line, invoke, run_module, save_external, tree
from onnx_uprewrite import model_io
from onnx_uprewrite.errors import UsageError, WriteError
from onnx_uprewrite.model_io import save_model


def test_output_equal_to_input_exits_2(tmp_path, model_file, monkeypatch):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "-o", src], 2, str(src), "overwrite")
    # the same file spelled differently
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert_refused(tmp_path, ["convert", src, "-o", "../model.onnx"], 2, "../model.onnx", "overwrite")


def test_output_folder_missing_exits_2(tmp_path, model_file):
    src = model_file()
    out = tmp_path / "nope" / "out.onnx"
    assert_refused(tmp_path, ["convert", src, "-o", out], 2, str(out), "does not exist")


def test_output_is_an_existing_directory_exits_2(tmp_path, model_file):
    src = model_file()
    (tmp_path / "outdir").mkdir()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "outdir"], 2, "outdir")


def test_report_path_equal_to_input_never_overwrites_it(tmp_path, model_file):
    src = model_file()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "out.onnx", "--report", src], 2, str(src))


def test_report_path_equal_to_output_is_refused(tmp_path, model_file):
    src = model_file()
    out = tmp_path / "out.onnx"
    assert_refused(tmp_path, ["convert", src, "-o", out, "--report", out], 2, str(out))


def source(model, tmp_path):
    """``model`` as ``tmp_path/m/model.onnx`` with its weights in ``model.onnx.data``."""
    (tmp_path / "m").mkdir(exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model turns the tensors it saves into references
    return save_external(copy, tmp_path / "m" / "model.onnx")


def test_unrelated_data_files_beside_the_output_are_left_alone(tmp_path, ct_model):
    """Data files get a name new to each write: ``<out>.data`` (someone else's, or an older
    version's), another output's and an unreferenced file of the output's own pattern that no note
    names (it may belong to a renamed model) are never overwritten or removed."""
    src = source(ct_model(cin=8, cout=8), tmp_path)
    bystanders = {"out.onnx.data": b"someone else's data", "out.onnx.0badf00d.data": b"a renamed model's data",
                  "other.onnx.12345678.data": b"x", ".uprewrite-file": b"not a temp folder", "notes.txt": b"n"}
    for name, data in bystanders.items():
        (src.parent / name).write_bytes(data)
    out = src.parent / "out.onnx"
    for _ in range(2):
        result = invoke("convert", src, "-o", out)
        assert result.exit_code == 0, (result.output, result.exception)
    assert {n: (src.parent / n).read_bytes() for n in bystanders} == bystanders
    assert leftovers(out) == set(bystanders) | {"model.onnx", "model.onnx.data"}


@pytest.mark.parametrize("name", [".uprewrite.lock", ".uprewrite-out.onnx"])
def test_output_named_like_our_temporary_files_is_refused(tmp_path, name):
    with pytest.raises(UsageError, match="temporary files"):
        save_model(OLD, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_previous_output_pair_is_replaced(tmp_path, ct_model):
    """The data file of the model the output held before is removed once the new model is in place."""
    out = tmp_path / "out.onnx"
    first = save_model(ct_model(cin=8, cout=8), out, external=True)
    second = save_model(ct_model(cin=8, cout=8, seed=5), out, external=True)
    assert pair_state(out, [ct_model(cin=8, cout=8, seed=5)]) == 0
    assert first[1] != second[1] and not first[1].exists()
    assert sorted(tmp_path.iterdir()) == sorted(second)
    save_model(ct_model(), out)  # inline now: the last data file goes too
    assert list(tmp_path.iterdir()) == [out]


def test_a_data_file_the_input_reads_is_never_removed(tmp_path, ct_model):
    """``cp out.onnx in.onnx`` and convert in.onnx -o out.onnx: the old output's data file is the
    input's data, which stays."""
    out = tmp_path / "out.onnx"
    _, data = save_model(ct_model(cin=8, cout=8), out, external=True)
    shutil.copy(out, tmp_path / "in.onnx")
    result = invoke("convert", tmp_path / "in.onnx", "-o", out)
    assert result.exit_code == 0, (result.output, result.exception)
    assert data.exists()
    ort.InferenceSession(str(tmp_path / "in.onnx"), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("failing_call", [1, 2])
def test_failure_between_renames_leaves_no_data_without_its_model(tmp_path, ct_model, monkeypatch, failing_call):
    """Data is renamed into place first, the model last: an interrupt at either step leaves neither."""
    real_replace, calls = model_io.os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise KeyboardInterrupt  # what SIGINT raises; SIGTERM raises a BaseException the same way
        return real_replace(src, dst)

    monkeypatch.setattr(model_io.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(ct_model(cin=8, cout=8), tmp_path / "out.onnx", external=True)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- every step of a save

#: the calls a save makes that change files: an interrupt or a SIGKILL is tried before each of them
STEPS = ("open", "replace", "fsync", "unlink", "ftruncate", "pwrite", "rmdir", "scandir")
OLD, NEW, NEXT = (make_convtranspose_model(cin=8, cout=8, seed=s) for s in (1, 2, 3))


def pair_state(out, models) -> int:
    """Which of ``models`` the pair at ``out`` holds, all its weights read through its data file;
    a mix (or a model without its data) fails."""
    loaded = onnx.load(str(out))
    got = {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer}
    for i, m in enumerate(models):
        if got == {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}:
            return i
    raise AssertionError(f"{out} holds none of the models whole")


def leftovers(out) -> set[str]:
    """Names in the output's folder other than the output and the data files it refers to."""
    refs = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in refs.graph.initializer for e in t.external_data if e.key == "location"}
    return {p.name for p in out.parent.iterdir()} - {out.name} - locations


def _stop_at(step: int, stop) -> None:
    """Make the ``step``-th call (counting from 1) of any of STEPS run ``stop()`` first."""
    count = [0]
    for name in STEPS:
        real = getattr(os, name)

        def counted(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == step:
                stop()
            return _real(*args, **kwargs)

        setattr(os, name, counted)


def _save_killed_at(step: int, out) -> bool:
    """save_model(NEW) in a forked child that SIGKILLs itself at ``step``; whether it was killed."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            _stop_at(step, lambda: os.kill(os.getpid(), signal.SIGKILL))
            save_model(NEW, out, external=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 0, status
    return os.WIFSIGNALED(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_every_step_leaves_the_old_or_the_new_pair(tmp_path):
    """A writer SIGKILLed before each file operation of its save: the output is the old pair or
    the new one, complete; the next save to that path removes what the killed one left (its temp
    folder, its unique data file or the old pair's) and nothing else."""
    seen = set()
    for step in range(1, 80):
        out = tmp_path / f"s{step}" / "out.onnx"
        out.parent.mkdir()
        save_model(OLD, out, external=True)
        killed = _save_killed_at(step, out)
        seen.add(pair_state(out, [OLD, NEW]))
        save_model(NEXT, out, external=True)
        assert pair_state(out, [NEXT]) == 0
        assert leftovers(out) == set(), step
        if not killed:
            break
    else:
        pytest.fail("the save never completed")
    assert seen == {0, 1} and step > 8, (seen, step)


@pytest.mark.parametrize("signal_like", [KeyboardInterrupt, SystemExit])
def test_interrupt_at_every_step_leaves_the_old_or_the_new_pair(tmp_path, monkeypatch, signal_like):
    """SIGINT / SIGTERM raise in the saving thread (cli._on_sigterm); raised before each file
    operation: the old or the new pair, complete, and nothing else once the cleanup ran."""
    saved = {name: getattr(os, name) for name in STEPS}
    seen = set()
    for step in range(1, 80):
        out = tmp_path / f"s{step}" / "out.onnx"
        out.parent.mkdir()
        save_model(OLD, out, external=True)

        def stop():
            raise signal_like()

        _stop_at(step, stop)
        try:
            save_model(NEW, out, external=True)
            done = True
        except signal_like:
            done = False
        finally:
            for name, real in saved.items():
                setattr(os, name, real)
        seen.add(pair_state(out, [OLD, NEW]))
        save_model(NEXT, out, external=True)
        assert leftovers(out) == set(), step
        if done:
            break
    assert seen == {0, 1}


# ----------------------------------------------------------------------------- write failures


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EFBIG, errno.ENOSPC, errno.EDQUOT,
                                  errno.ENAMETOOLONG, errno.EXDEV])
@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_write_failures_are_one_line_naming_path_and_cause(tmp_path, monkeypatch, code, where):
    out = tmp_path / "out.onnx"
    save_model(OLD, out, external=True)
    before = tree(tmp_path)
    real = getattr(os, where)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(code, os.strerror(code), str(args[0]) if where == "replace" else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, where, failing)
    with pytest.raises(WriteError) as info:
        save_model(NEW, out, external=True)
    cause = os.strerror(code)
    assert str(info.value).startswith(f"cannot write {out}: {cause[0].lower()}{cause[1:]}"), str(info.value)
    assert "\n" not in str(info.value)
    assert tree(tmp_path) == before


def test_data_file_name_too_long(tmp_path):
    """The output's name fits, its data file's (14 characters longer) does not."""
    out = tmp_path / ("n" * 245 + ".onnx")
    with pytest.raises(WriteError, match="file name too long"):
        save_model(OLD, out, external=True)
    assert list(tmp_path.iterdir()) == []
    result = invoke("convert", source(OLD, tmp_path), "-o", tmp_path / out.name)
    assert result.exit_code == 2 and "file name too long" in result.stderr, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _mount(args, where):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root")
    proc = subprocess.run(["mount", *args, str(where)], capture_output=True, text=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")


@pytest.fixture
def mounts():
    """``mount(args, folder)`` (args end with the source); every mount is lazily unmounted at the end."""
    done = []

    def mount(args, where):
        _mount(args, where)
        done.append(where)

    yield mount
    for where in reversed(done):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk(tmp_path, mounts, ct_model):
    """A 64 KiB tmpfs: the earlier pair stays, the new one cannot fit: exit 2, one line."""
    small = tmp_path / "small"
    small.mkdir()
    mounts(["-t", "tmpfs", "-o", "size=64k", "tmpfs"], small)
    out = small / "out.onnx"
    save_model(OLD, out, external=True)
    before = tree(small)
    with pytest.raises(WriteError, match=f"^cannot write {out}: no space left on device$"):
        save_model(ct_model(cin=32, cout=32), out, external=True)
    assert tree(small) == before
    src = source(ct_model(cin=32, cout=32), tmp_path)
    assert_refused(small, ["convert", src, "-o", out], 2, f"cannot write {out}: no space left on device")
    assert pair_state(out, [OLD]) == 0


def test_read_only_folder(tmp_path, mounts, model_file):
    """A read-only bind mount over a folder with an earlier output (root ignores permissions)."""
    folder, view = tmp_path / "rw", tmp_path / "ro"
    folder.mkdir()
    view.mkdir()
    save_model(OLD, folder / "out.onnx", external=True)
    mounts(["--bind", "-o", "ro", str(folder)], view)
    if os.access(view, os.W_OK) and not os.statvfs(view).f_flag & os.ST_RDONLY:
        pytest.skip("the bind mount is not read-only here")
    ext = source(OLD, tmp_path)
    for src in (model_file(), ext):  # inline (fails at the save) and external (refused before verifying)
        assert_refused(view, ["convert", src, "-o", view / "out.onnx"], 2,
                       f"cannot write {view / 'out.onnx'}: read-only file system")
    with pytest.raises(WriteError, match="read-only file system"):
        save_model(NEW, view / "new.onnx")
    assert pair_state(view / "out.onnx", [OLD]) == 0


def test_file_size_limit(tmp_path, ct_model):
    """``ulimit -f 32`` (32 KiB): writing the 64 KiB data file fails with EFBIG: exit 2, one line."""
    src = source(ct_model(cin=32, cout=32), tmp_path)
    out = tmp_path / "o" / "out.onnx"
    out.parent.mkdir()
    limit = 32 << 10
    proc = run_module("convert", src, "-o", out, cwd=tmp_path,
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr
    error_line(proc.stderr, f"cannot write {out}: file too large")
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- concurrent writers


def test_file_system_without_locks_still_saves_atomically(tmp_path, monkeypatch):
    """flock failing with ENOLCK (some network mounts): the save goes on unserialized, no lock file."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(model_io.fcntl, "flock", no_locks)
    out = tmp_path / "out.onnx"
    for model in (OLD, NEW):
        save_model(model, out, external=True)
    assert pair_state(out, [NEW]) == 0 and leftovers(out) == set()



@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_concurrent_writers_end_with_one_complete_pair(tmp_path):
    """Two processes save to one path over and over while this one reads it: every read is a whole
    pair (or finds the old data file just removed: an error, never a mix), and the end is one
    writer's whole pair with nothing else beside it."""
    out = tmp_path / "out.onnx"
    save_model(OLD, out, external=True)
    pids = []
    for model in (NEW, NEXT):
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                for _ in range(12):
                    save_model(model, out, external=True)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    reads, statuses = 0, {}
    while len(statuses) < len(pids):
        for pid in pids:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = status
        try:
            loaded = onnx.load(str(out))
        except (OSError, onnx.checker.ValidationError):
            continue  # the data file of the pair just read was removed by the next save
        got = {t.name: numpy_helper.to_array(t).tobytes() for t in loaded.graph.initializer}
        matches = [i for i, m in enumerate((OLD, NEW, NEXT))
                   if got == {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}]
        assert len(matches) == 1, "a mixed pair was read"
        reads += 1
    assert [os.waitstatus_to_exitcode(s) for s in statuses.values()] == [0, 0]
    assert pair_state(out, [NEW, NEXT]) in (0, 1)
    assert leftovers(out) == set()


def _slow_model(tmp_path, ct_model):
    """A model whose verification takes a few seconds, so that signals land in the middle of it."""
    path = tmp_path / "model.onnx"
    path.write_bytes(ct_model(cin=64, cout=64, kernel=(4, 4), spatial=(320, 320)).SerializeToString())
    return path


def _wait_for_handlers(pid: int, timeout: float = 10.0) -> None:
    """Until the process catches SIGTERM (``_entry``'s first statement; Python installs no handler of
    its own for it): a signal before that, while the interpreter starts, gets Python's defaults,
    which no code of ours can change (tens of ms on a loaded machine)."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            caught = next(int(ln.split()[1], 16) for ln in status.read_text().splitlines() if ln.startswith("SigCgt:"))
        except (OSError, StopIteration):
            time.sleep(0.2)  # no /proc: give the interpreter time to start
            return
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.002)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_partial_output(tmp_path, ct_model, sig, code):
    import subprocess

    src = _slow_model(tmp_path, ct_model)
    before = tree(tmp_path)
    outcomes = set()
    for delay in (0.05, 0.3, 1.0, 3.0):  # the first ones land in the imports of onnx/onnxruntime
        proc = subprocess.Popen([sys.executable, "-m", "onnx_uprewrite", "convert", src, "-o", tmp_path / "out.onnx"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_handlers(proc.pid)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err
        out = tmp_path / "out.onnx"
        if proc.returncode == 0:  # finished before the signal: then the output is whole
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            out.unlink()
        else:
            assert proc.returncode == code, (proc.returncode, err)
            assert err.strip().splitlines()[-1].startswith("uprewrite: "), err
            assert "no partial output" in err
        outcomes.add(proc.returncode)
        assert tree(tmp_path) == before, "a partial file, a temp folder or a changed input was left"
    assert code in outcomes, "no run was interrupted; make the model slower"
