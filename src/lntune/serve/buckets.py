"""Split one batch of encoder inputs into length buckets, so that short inputs are not padded to long ones.

A padded forward costs about ``overhead + rows x longest`` token-units: every row pays for the longest
input of its forward. One forward over inputs of very different lengths wastes most of its work on
padding (a batch of 32 movie-review snippets of 8-66 tokens is about half padding), while one forward per
input pays the fixed overhead 32 times. `length_buckets` picks the partition of the length-sorted batch
with the least total cost (an exact dynamic program; batches are small). Each bucket is still one
mixed-adapter forward: bucketing is by length only, never by adapter.

The overhead is in tokens: what one more forward costs, expressed as the tokens it could have processed
instead. On a CPU the compute of a token dominates (about 60 tokens of all-MiniLM-L6-v2 at one thread);
on a GPU small forwards are bound by kernel launches, so the overhead is large and buckets rarely split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CPU_OVERHEAD_TOKENS = 64
GPU_OVERHEAD_TOKENS = 4096


def default_overhead_tokens(device: torch.device) -> int:
    """The per-forward overhead, in tokens, assumed on ``device`` (see the module docstring)."""
    return CPU_OVERHEAD_TOKENS if device.type == "cpu" else GPU_OVERHEAD_TOKENS


def length_buckets(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Partition a batch into forwards of similar lengths with the least padded cost.

    Args:
        lengths: Each input's token count.
        overhead_tokens: The cost of one more forward, in tokens (>= 0; 0 splits wherever padding is saved).

    Returns:
        Lists of indices into ``lengths``, one per forward, shortest inputs first; every index appears
        exactly once. One bucket when splitting would not pay.

    Example:
        >>> length_buckets([60, 8, 9, 61], overhead_tokens=64)
        [[1, 2], [0, 3]]
        >>> length_buckets([60, 8, 9, 61], overhead_tokens=1000)
        [[1, 2, 0, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    count = len(order)
    # best[j]: least cost of the first j sorted inputs; start[j]: where the last bucket of that best begins.
    best = [0.0] + [float("inf")] * count
    start = [0] * (count + 1)
    for j in range(1, count + 1):
        longest = sorted_lengths[j - 1]
        for i in range(j):
            cost = best[i] + overhead_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], start[j] = cost, i
    buckets = []
    j = count
    while j > 0:
        buckets.append(order[start[j] : j])
        j = start[j]
    return buckets[::-1]
