"""What the command line asks for, read before any heavy import (shared by _entry and cli)."""

from __future__ import annotations


def wants_json(args: list[str]) -> bool:
    """Whether the command line asks for JSON on stdout (``--json``, or ``--report -`` of convert):
    then every failure also prints ``{"error", "exit_code", "file", "report"}`` there."""
    return "--json" in args or "--report=-" in args or any(
        a == "--report" and b == "-" for a, b in zip(args, args[1:]))
