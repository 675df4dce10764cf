"""What the runner scripts share (each runs with its compiler's Python, beside this file): the inputs
as ``compilers.save_feeds`` writes them, arrays in order and their names in ``<file>.json``."""

import json

import numpy as np


def load_feeds(path: str) -> dict:
    with open(f"{path}.json") as fh:
        names = json.load(fh)
    data = np.load(path)
    return {name: data[f"arr_{i}"] for i, name in enumerate(names)}
