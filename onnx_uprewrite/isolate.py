"""Native crashes: onnx's C++ shape inference and onnxruntime kill the process (SIGABRT, SIGFPE) on
some malformed models instead of raising.  Where the platform can fork, such code runs in a forked
child, so a crash becomes an :class:`NativeCrash` (exit 2, one line) instead of the caller's death.

* :func:`infer_shapes` runs onnx shape inference in a server process (``_infer_server.py``, started
  fresh, never forked from this possibly multi-threaded process), which a crash ends instead of
  this one; the models it sees have no weights, so sending them is cheap.
* :func:`supervise` runs the whole CLI in a child (cli.main): a crash inside onnxruntime, anywhere,
  then still ends with ``uprewrite: error: ...`` and exit 2, and the child's temporary output
  folders (announced through :func:`announce`) are removed.

Signals (SIGINT, SIGTERM): ``_entry`` takes them first (exit at once: nothing is written yet); the
supervising parent forwards them to the child while it runs and ignores them once it is reaped; the
child raises :class:`KeyboardInterrupt` / :class:`Terminated` once (:func:`raise_on_signals`), so
that temp files are cleaned up, and :func:`hold_signals` defers them while the output is saved.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Callable

import onnx

from .errors import InvalidModelError, one_line

#: set to 1 to run everything in-process (debuggers; platforms where fork is unsafe)
NO_FORK_ENV = "UPREWRITE_NO_FORK"
_TEMP_FD_ENV = "_UPREWRITE_TEMP_FD"
_NATIVE_TAIL = 4096  # bytes of the child's native stderr kept for the message


class NativeCrash(InvalidModelError):
    """onnx or onnxruntime crashed (a signal) on the model: malformed in a way they do not check."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (like KeyboardInterrupt for SIGINT) so that every
    ``finally`` (temp files) runs."""


#: the first SIGINT/SIGTERM raised by raise_on_signals (later ones are ignored: cleanup must finish)
_raised: list[int] = []
#: signals that came while hold_signals was on
_held: list[int] = []
_holding = False
#: set (by a plain store: no call, so no signal handler can run before it) once the command has
#: ended; a signal handled after that changes nothing
finished = False
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_once(signum, frame):
    # Python runs this in the main thread whichever thread the kernel gave the signal to (an
    # onnxruntime worker, say): a flag defers it for the whole process, a signal mask would not
    if finished:
        return
    if _holding:
        _held.append(signum)
        return
    if _raised:
        return
    _raised.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()


_owned: list[bool] = []  # raise_on_signals ran: this process is the CLI's and its signals are ours


def raise_on_signals() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`, once: a second signal (Ctrl-C
    reaches the supervised child from the terminal and again through its parent) must not cut the
    cleanup of the first short."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_once)
    _owned.append(True)


def hold_signals() -> None:
    """From now on SIGINT and SIGTERM are only noted (:func:`held_signals`): the run completes, so the
    output appears whole and the exit status says what was written.  Only in the CLI's own process
    (raise_on_signals ran): a caller's process (click's test runner) keeps its handlers."""
    global _holding
    if _owned:
        _holding = True


def held_signals() -> set[int]:
    """The signals that came while :func:`hold_signals` was on."""
    return set(_held)


def ignore_signals() -> None:
    """SIGINT and SIGTERM ignored for the rest of the process, in the CLI's own process: the command
    has ended and its status stands (Python's finalization would restore the default action of
    signals that have a Python handler, and a late one would then kill the process)."""
    if _owned and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def can_fork() -> bool:
    """Whether the CLI runs in a forked child (supervise); UPREWRITE_NO_FORK=1 also keeps onnx
    shape inference in this process."""
    return sys.platform.startswith("linux") and os.environ.get(NO_FORK_ENV) != "1"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def last_line(text: bytes) -> str:
    lines = [ln.strip() for ln in text.decode("utf-8", "replace").splitlines() if ln.strip()]
    return one_line(lines[-1])[:300] if lines else ""


def crash_message(what: str, signum: int, native: bytes) -> str:
    said = last_line(native)
    if signum == signal.SIGKILL:  # not a crash of its own: the kernel (out of memory?) or someone killed it
        return f"{what} was killed (SIGKILL: out of memory, or killed by another process)"
    return (f"{what} crashed ({signal_name(signum)}{': ' + said if said else ''}); the model is malformed "
            "in a way onnx/onnxruntime do not check")


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping everything (``keep=None``) or the last ``keep`` bytes."""

    def __init__(self, fd: int, keep: int | None = None):
        super().__init__(daemon=True)
        self.fd, self.keep, self.data = fd, keep, b""

    def run(self):
        with os.fdopen(self.fd, "rb", buffering=0) as fh:
            while chunk := fh.read(65536):
                self.data += chunk
                if self.keep is not None:
                    self.data = self.data[-self.keep:]


class _InferenceServer:
    """The ``_infer_server.py`` process: started on first use (onnx import, about 0.2 s), restarted
    after a crash, reset in forked children (which must not share the parent's pipes)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.stderr = None

    def reset(self) -> None:
        self.proc, self.stderr = None, None
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        self.stderr = tempfile.TemporaryFile()
        script = Path(__file__).with_name("_infer_server.py")
        # its own session: a Ctrl-C at the terminal is the client's to handle (the server ends when
        # its stdin closes), not a crash of the server
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True)
        return self.proc

    def warm_up(self) -> None:
        """Start the server now (it imports onnx while the caller loads its model)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()

    def request(self, data: bytes) -> bytes:
        with self.lock:
            proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
            try:
                proc.stdin.write(struct.pack("<Q", len(data)) + data)
                proc.stdin.flush()
                head = proc.stdout.read(8)
                if len(head) == 8:
                    body = proc.stdout.read(struct.unpack("<Q", head)[0])
            except (BrokenPipeError, OSError):
                head = b""
            except BaseException:  # interrupted mid-request: its answer must never reach the next one
                proc.kill()
                self.reset()
                raise
            if len(head) < 8:
                raise self._died(proc)
        if body[:1] == b"\x01":
            raise ValueError(body[1:].decode("utf-8", "replace"))
        return body[1:]

    def _died(self, proc: subprocess.Popen) -> NativeCrash:
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        self.stderr.seek(0)
        native = self.stderr.read()[-_NATIVE_TAIL:]
        self.reset()
        if code < 0:
            return NativeCrash(crash_message("onnx shape inference", -code, native))
        return NativeCrash(f"onnx shape inference ended its process (exit status {code}: {last_line(native)})")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_SERVER = _InferenceServer()
os.register_at_fork(after_in_child=_SERVER.reset)
atexit.register(_SERVER.close)


#: set in the supervised child (supervise): a crash there is already caught by the parent, so onnx
#: shape inference runs in that process, without the server's start-up (about 0.5 s of CPU)
_SUPERVISED = False


def warm_up() -> None:
    if os.environ.get(NO_FORK_ENV) != "1" and not _SUPERVISED:
        _SERVER.warm_up()


def infer_shapes(data: bytes) -> bytes:
    """onnx shape inference (not strict) of serialized model ``data``, in the server process; a
    crash there raises :class:`NativeCrash`.  In a supervised child, or with UPREWRITE_NO_FORK=1:
    in this process."""
    if os.environ.get(NO_FORK_ENV) == "1" or _SUPERVISED:
        model = onnx.ModelProto()
        model.ParseFromString(data)
        return onnx.shape_inference.infer_shapes(model, strict_mode=False).SerializeToString()
    return _SERVER.request(data)


def announce(kind: str, value: os.PathLike | str) -> None:
    """Tell a supervising parent (if any) something for its crash message and cleanup: ``temp`` (a
    temporary folder to remove if this process dies), ``model`` (the file being processed) or
    ``stage`` (what is running now).  One JSON line each (ASCII: no path can split it)."""
    fd = os.environ.get(_TEMP_FD_ENV)
    if fd is None:
        return
    try:
        os.write(int(fd), (json.dumps([kind, os.fspath(value)]) + "\n").encode("ascii"))
    except (OSError, ValueError):
        pass


def announce_temp(path: os.PathLike | str) -> None:
    announce("temp", path)


def _told(data: bytes) -> dict[str, list[str]]:
    told: dict[str, list[str]] = {}
    for line in data.split(b"\n"):
        try:
            kind, value = json.loads(line)
        except (ValueError, TypeError):
            continue
        told.setdefault(kind, []).append(value)
    return told


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def supervise(run: Callable[[], int], what: str = "onnx/onnxruntime",
              on_error: Callable[[str, int, str | None], None] | None = None) -> int:
    """Run ``run()`` (returning an exit status) in a forked child and return the child's status.

    The parent forwards SIGTERM and SIGINT to the child (which then cleans up and exits 143/130),
    collects the child's native stderr (passed through when it exits normally) and, when the
    child is killed by any other signal, prints one ``uprewrite: error:`` line, removes the
    temporary folders it announced and returns 2.  The child dies with the parent (PDEATHSIG).
    It returns with SIGINT and SIGTERM ignored: the child's status stands, and the caller is
    expected to exit with it (a late signal must not turn a finished run into 130 or a traceback).
    ``on_error(message, status, file)`` is also called for the failures said here (``--json``).
    Off the main thread, or with stderr closed, ``run`` runs in this process."""
    if threading.current_thread() is not threading.main_thread() or not _fd_open(2) or sys.stderr is None:
        try:
            result = run()
            return result if isinstance(result, int) else 0
        except SystemExit as exc:
            return _exit_status(exc)
    watched = STOP_SIGNALS
    saved_sigchld = signal.getsignal(signal.SIGCHLD)
    child: list[int] = []
    forwarded: set[int] = set()

    def forward(signum, frame):  # never raises: the parent has nothing to clean up
        if child:
            forwarded.add(signum)
            _forward(child[0], signum)

    err_r, err_w = os.pipe()
    temp_r, temp_w = os.pipe()
    parent_pid = os.getpid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited SIG_IGN would make waitpid fail
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        for signum in watched:
            signal.signal(signum, forward)
        pid = os.fork()
        if pid == 0:
            _child(run, parent_pid, err_r, err_w, temp_r, temp_w, on_error)  # never returns
        child.append(pid)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    try:
        os.close(err_w)
        os.close(temp_w)
        drain_err, drain_temp = _Drain(err_r, 1 << 20), _Drain(temp_r)
        drain_err.start()
        drain_temp.start()
        _, status = os.waitpid(pid, 0)
        drain_err.join()
        drain_temp.join()
    finally:
        for signum in watched:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, saved_sigchld)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        told = _told(drain_temp.data)
        for folder in told.get("temp", []):
            shutil.rmtree(folder, ignore_errors=True)
        file = told["model"][-1] if "model" in told else None
        if signum in forwarded:  # killed by the signal we passed on, before it could clean up
            message, code = stop_message(signum), 128 + signum
            _say(f"uprewrite: {message}\n")
        else:
            if "stage" in told:
                what += f" ({one_line(told['stage'][-1])})"
            message = (f"{one_line(file) + ': ' if file else ''}{crash_message(what, signum, drain_err.data)}; "
                       "nothing was written")
            code = 2
            _say(f"uprewrite: error: {message}\n")
        if on_error is not None:
            on_error(message, code, file)
        return code
    if drain_err.data:
        _say(drain_err.data.decode("utf-8", "replace"))
    return os.waitstatus_to_exitcode(status)


def _say(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def stop_message(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal_name(signum)})"
    return f"{what}; no partial output left"


def _child(run, parent_pid: int, err_r: int, err_w: int, temp_r: int, temp_w: int, on_error=None) -> None:
    """The supervised child: set up (SIGINT and SIGTERM still blocked, as supervise forked it), run,
    and leave through os._exit whatever happens (a normal interpreter exit would run onnxruntime's
    exit handlers, copied from a multi-threaded parent)."""
    global _SUPERVISED, finished
    _SUPERVISED = True
    status = 1
    try:
        try:
            raise_on_signals()
            _die_with_parent(parent_pid)
            os.close(err_r)
            os.close(temp_r)
            os.environ[_TEMP_FD_ENV] = str(temp_w)
            python_err = os.dup(2)
            os.dup2(err_w, 2)
            os.close(err_w)
            encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
            sys.stderr = os.fdopen(python_err, "w", buffering=1, encoding=encoding, errors="backslashreplace")
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending one raises here
            result = run()
            status = result if isinstance(result, int) else 0
        except SystemExit as exc:
            status = _exit_status(exc)
    except (KeyboardInterrupt, Terminated):  # before run() could catch it, or escaping it
        status = 128 + (_raised[0] if _raised else signal.SIGINT)
        _say(f"uprewrite: {stop_message(status - 128)}\n")
        if on_error is not None:
            on_error(stop_message(status - 128), status, None)
    except BaseException:  # noqa: BLE001 - --debug re-raises: show it as the parent would
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001 - nowhere to print
            pass
    finally:
        finished = True  # first: a signal handled from here on changes nothing
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - a closed pipe
                pass
        os._exit(status)


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _exit_status(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1
