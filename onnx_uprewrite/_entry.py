"""The ``uprewrite`` console script and ``python -m onnx_uprewrite``: a light module that handles
SIGINT and SIGTERM before the heavy imports (onnx, onnxruntime: about a second), so that an
interruption during them ends with one line and exit 130 / 143 like any other, not a traceback."""

import signal
import sys

_MESSAGES = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}


def _stop_while_importing(signum, frame):
    what, code = _MESSAGES[signum]
    try:
        sys.stderr.write(f"uprewrite: {what}; no partial output left\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    import os

    os._exit(code)  # nothing is written yet: no temp files, no output, nothing to clean up


def main() -> None:
    previous = {s: signal.signal(s, _stop_while_importing) for s in _MESSAGES}
    from .cli import main as cli_main  # the heavy imports

    for s, handler in previous.items():
        signal.signal(s, handler)
    cli_main()
