"""Every size threshold of moeflow's CPU paths, in one frozen record, each entry with the benchmark that set it.

The numbers were measured on a 2-core x86 VM (torch 2.13 CPU, fp32); re-measure them with the named benchmark on
other hardware and override them for a block of code:

    with cpu_tuning(chunk_elems=1 << 21):
        layer(x)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CpuTuning:
    """Thresholds of the CPU expert kernel, the gather-sums and generation (see each field)."""

    # Pre-activation elements per chunk of one expert's rows (16 MiB fp32). benchmarks/layer.py A and D at one
    # thread: 64K-256K elements starve the GEMMs (each chunk re-streams the expert's weights; D 3.3x / 1.4x
    # slower), 2M-4M is best, 16M slower again; chunks under 32 MiB are recycled by glibc's heap, not page-faulted.
    chunk_elems: int = 1 << 22
    # Multiply-adds of one layer call below which the experts run inline rather than on the worker pool: the
    # hand-off costs more than it saves. benchmarks/train.py generation rows (tiny preset, batch-1 decode).
    pool_min_macs: int = 1 << 22
    # Elements of a gather-sum below which index_add (serial, ~2 us fixed) beats embedding_bag (parallel over
    # tokens, ~45 us fixed): decode steps sum a few rows. Measured with benchmarks/layer.py B (8192 x 512 rows:
    # 0.8 vs 2.3 ms) and the generation rows of benchmarks/train.py. Both give the same bits (ops/rows.py).
    bag_min_elems: int = 1 << 16
    # Batch x active parameters of a KV-cached decode step up to which `moeflow generate` runs on one thread:
    # about 100 tiny ops per step, each a fork/join (+ a wake-up under OMP_WAIT_POLICY=PASSIVE) on more threads.
    # benchmarks/train.py generation rows: 319 ms single-threaded vs 682 ms on 2 threads under PASSIVE.
    serial_decode_macs: int = 1 << 26


_current = CpuTuning()


def tuning() -> CpuTuning:
    """The thresholds in force."""
    return _current


@contextmanager
def cpu_tuning(**fields: int) -> Iterator[CpuTuning]:
    """Override some thresholds for the block (e.g. in a benchmark sweep or a test), restoring them afterwards."""
    global _current
    before = _current
    _current = replace(before, **fields)
    try:
        yield _current
    finally:
        _current = before


__all__ = ["CpuTuning", "tuning", "cpu_tuning"]
