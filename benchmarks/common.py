"""Shared by the benchmarks: timing by medians, the machine's description, and the RESULTS.md table writer."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """One line naming the hardware and software the numbers were measured on."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU only, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{device}; {platform.processor() or platform.machine()}; Python {platform.python_version()}, torch " \
           f"{torch.__version__}"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeat` runs after `warmup` untimed ones (device work included)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_medians(first: Callable[[], object], second: Callable[[], object], repeat: int = 5,
                        warmup: int = 1) -> tuple[float, float]:
    """Median wall times of `first()` and `second()`, run in turns so that a drift of the machine (another process,
    clock changes) hits both alike: the ratio of the two is what a shared machine can measure."""
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in zip((first, second), times, strict=True):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str) -> None:
    """Print a section and replace (or append) it in RESULTS.md, between markers named `name`."""
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute()
                                     else sys.argv[0], *sys.argv[1:]])
    section = (f"<!-- {name}:start -->\n## {title}\n\nMeasured on {machine()}, {time.strftime('%Y-%m-%d')}, with "
               f"`{command}`.\n\n{body.strip()}\n<!-- {name}:end -->")
    print(section)
    header = "# Benchmark results\n\nWritten by the scripts in benchmarks/; rerun one to refresh its section.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
