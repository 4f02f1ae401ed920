"""Timing and memory helpers shared by the benchmark scripts.

Timing: warm-up excluded, then ``repeats`` batches of ``calls`` queued calls
(dispatch amortised: JAX dispatches asynchronously, the batch blocks once),
rotating among several input sets so inputs larger than L2 are not re-read
from cache; the median batch time / calls is reported.
Memory: XLA's compiled memory analysis (temp bytes) of the jitted function.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax


def time_jitted(fn: Callable, arg_sets: Sequence[tuple], *, calls: int = 20, repeats: int = 7,
                warmup: int = 3) -> float:
  """Median milliseconds per call of ``fn`` over ``arg_sets`` (rotated)."""
  out = None
  for i in range(warmup):
    out = fn(*arg_sets[i % len(arg_sets)])
  jax.block_until_ready(out)
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    for i in range(calls):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) * 1e3 / calls)
  return statistics.median(samples)


def temp_bytes(fn: Callable, *args) -> int:
  """XLA's temp allocation (bytes) for ``jax.jit(fn)`` compiled on ``args``."""
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.memory_analysis()
  return int(analysis.temp_size_in_bytes)


def device_description() -> str:
  device = jax.devices()[0]
  return f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
