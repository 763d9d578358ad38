"""scripts/bench_fp8_forward_gap.py's accounting on the CPU: forwards cut out of a profile's kernel
intervals at the host gaps between them, and each one's kernel sum, busy time, span and idle time."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gap():
    spec = importlib.util.spec_from_file_location("bench_fp8_forward_gap_under_test",
                                                  ROOT / "scripts" / "bench_fp8_forward_gap.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch.dict(os.environ), mock.patch.object(sys, "path", list(sys.path)):
        spec.loader.exec_module(module)
    return module


def test_forwards_are_cut_at_the_host_gaps_and_overlaps_count_once(gap):
    # two forwards (µs): the first with two overlapping kernels and a 10 µs idle stretch, 3 ms apart
    intervals = [(0, 100), (50, 150), (160, 260), (3260, 3300), (3300, 3400)]
    forwards = gap.split_forwards(intervals, 1500.0)
    assert [len(f) for f in forwards] == [3, 2]
    first, second = (gap.forward_stats(f) for f in forwards)
    assert first == pytest.approx({"kernel_sum_ms": 0.3, "busy_ms": 0.25, "span_ms": 0.26,
                                   "idle_inside_ms": 0.01, "kernels": 3})
    assert second == pytest.approx({"kernel_sum_ms": 0.14, "busy_ms": 0.14, "span_ms": 0.14,
                                    "idle_inside_ms": 0.0, "kernels": 2})


def test_a_kernel_inside_another_does_not_end_the_busy_stretch(gap):
    stats = gap.forward_stats([(0, 1000), (100, 200), (900, 1200)])
    assert stats["busy_ms"] == pytest.approx(1.2) and stats["idle_inside_ms"] == pytest.approx(0.0)
    assert stats["kernel_sum_ms"] == pytest.approx(1.4)
