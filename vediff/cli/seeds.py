"""Seed and class lists on the command line, in EDM's syntax: "0-63", "1,5,9", "0-3,10"."""

from __future__ import annotations

import re

from vediff.utils import ConfigError

MAX_SEED = 2**32 - 1  # EDM's seeds are NumPy's: 32-bit
MAX_SEEDS = 1_000_000  # images per run; FID's protocol takes 50 000


def number_spans(text: str, error: str) -> list[tuple[int, int]]:
    """EDM-style lists of numbers and ranges ("0-63", "1,5,9", "0-3,10") as (first, last) spans; `error` if not one."""
    spans = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(error)
        spans.append((int(match[1]), int(match[2] or match[1])))
    return spans


def parse_seeds(text: str) -> list[int]:
    """EDM-style seed lists: "0-63", "1,5,9", "0-3,10"; each seed in 0 … 2³² − 1, at most a million of them."""
    spans = number_spans(text, f"--seeds: '{text}' is not a seed list like 0-63 or 1,5,9")
    if max(last for _, last in spans) > MAX_SEED:
        raise ConfigError(f"--seeds: {max(last for _, last in spans)} is above the largest seed, {MAX_SEED}")
    count = sum(last - first + 1 for first, last in spans)  # counted before any list is built
    if count > MAX_SEEDS:
        raise ConfigError(f"--seeds: '{text}' names {count} images, more than {MAX_SEEDS} per run; split it into "
                          f"several runs (e.g. --seeds 0-{MAX_SEEDS - 1}, then --seeds {MAX_SEEDS}-…)")
    seeds = [seed for first, last in spans for seed in range(first, last + 1)]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: '{text}' names a seed twice")
    return seeds


def parse_class_labels(text: str, num_classes: int) -> list[int]:
    """Class lists in the seeds' syntax ("3", "0-9", "1,5"), each within [0, num_classes)."""
    if num_classes == 0:
        raise ConfigError("--class-labels: this model is unconditional (trained without labels); leave it out")
    spans = number_spans(text, f"--class-labels: '{text}' is not a class list like 3, 0-9 or 1,5")
    if max(last for _, last in spans) >= num_classes:
        raise ConfigError(f"--class-labels: '{text}' names a class outside 0-{num_classes - 1}")
    return [label for first, last in spans for label in range(first, last + 1)]
