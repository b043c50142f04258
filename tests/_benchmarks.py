"""Load a script of ``benchmarks/`` (not a package) as a module, for the tests of its functions."""

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chebyshev_windows(label: np.ndarray, r: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y, x, window)`` for every pixel of `label` ``[H,W]``: the pixels within `r` (Chebyshev, clipped at
    the border) — the slow direct form the tests check the benchmarks' pooled versions against."""
    h, w = label.shape
    for y in range(h):
        for x in range(w):
            yield y, x, label[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1]
