"""The ``uprewrite`` console script and ``python -m onnx_uprewrite``: a light module that takes
SIGINT and SIGTERM as its very first statement, before the heavy imports (onnx, onnxruntime: about
a second), so that an interruption during them ends with one line and exit 130 / 143 like any other,
not a traceback.  ``cli.main`` then hands the signals to the supervised child (isolate.supervise).

The C module ``_signal`` is already loaded when the interpreter starts; ``import signal`` would first
build its enums (1-2 ms during which Python's default handler would print a traceback).  A signal
that arrives before this module runs at all, while the interpreter itself starts (a few ms, more
with .pth files in site-packages), gets Python's own behaviour: no code of ours can run yet.
"""

try:
    import _signal as _sig
except ImportError:  # not CPython
    import signal as _sig
import sys

from ._argv import wants_json

_MESSAGES = {_sig.SIGINT: ("interrupted", 130), _sig.SIGTERM: ("terminated (SIGTERM)", 143)}


def _stop_while_starting(signum, frame):
    what, code = _MESSAGES[signum]
    message = f"{what}; no partial output left"
    try:
        if wants_json(sys.argv[1:]):
            import json

            sys.stdout.write(json.dumps({"error": message, "exit_code": code, "file": None, "report": None}) + "\n")
            sys.stdout.flush()
        sys.stderr.write(f"uprewrite: {message}\n")
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    import os

    os._exit(code)  # nothing is written yet: no temp files, no output, no child, nothing to clean up


def main() -> None:
    _sig.signal(_sig.SIGINT, _stop_while_starting)  # first: every moment after this is ours
    _sig.signal(_sig.SIGTERM, _stop_while_starting)
    from .cli import main as cli_main  # the heavy imports

    cli_main()  # it replaces the handlers (isolate.supervise, cli._main)
