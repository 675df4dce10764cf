"""Print the corpus table of models/exported: per model, its producer, opset, sites and what each
target form gives (rewritten/skipped/refused counts, worst error/tolerance over both verified sizes).

    python models/corpus_table.py          # markdown table on stdout
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

import onnx_uprewrite as up
from onnx_uprewrite.errors import UprewriteError

EXPORTED = Path(__file__).parent / "exported"
TARGETS = ("subpixel", "convtranspose", "resize")


def cell(report) -> str:
    parts = []
    for status in ("rewritten", "skipped", "refused"):
        n = sum(s.status == status for s in report.sites)
        if n:
            parts.append(f"{n} {status[:3]}")
    worst = report.worst_ratio
    return f"{', '.join(parts) or 'no site'}; {worst:.3f}" if worst is not None else ", ".join(parts)


def main() -> None:
    print("| model | producer | opset | sites | " + " | ".join(f"→ {t}" for t in TARGETS) + " |")
    print("|---|---|---|---|" + "---|" * len(TARGETS))
    refusals = {}
    for path in sorted(EXPORTED.glob("*.onnx")):
        model = onnx.load(path)
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        data = np.load(path.with_suffix(".npz"))
        inputs = {k: data[k] for k in data.files if not k.startswith("out:")}
        cells, n_sites = [], 0
        for to in TARGETS:
            try:
                report = up.convert(path, to=to, inputs=inputs).report
            except UprewriteError as exc:
                cells.append(f"error: {exc}")
                continue
            n_sites = len(report.sites)
            cells.append(cell(report))
            for s in report.refused:
                refusals[(path.stem, s.node)] = s.reason
        producer = "quantize_static" if "_qdq_" in path.stem else model.producer_name
        print(f"| {path.stem} | {producer} | {opset} | {n_sites} | " + " | ".join(cells) + " |")
    print()
    for (stem, node), reason in refusals.items():
        print(f"- {stem} / {node}: {reason}")


if __name__ == "__main__":
    main()
