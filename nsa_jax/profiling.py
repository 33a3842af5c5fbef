"""Device kernel times of a jitted call, from a ``jax.profiler`` trace.

Wall-clock timing says how long a call takes; this says which kernels the
time went to: each kernel's summed duration per call, read from the trace
events of the device tracks (on a GPU, the CUPTI activity jax records).
A backend whose trace has no device track (the CPU) gives an empty result.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

import jax


def device_kernel_times(events, calls: int) -> dict[str, float]:
  """Microseconds per call of each kernel in a Chrome trace's events.

  Args:
    events: the trace's ``traceEvents``: process-name metadata events
      (``ph`` "M") name the tracks; complete events (``ph`` "X") with a
      duration ``dur`` in us are kernels when their process is a device
      (its name holds "/device:").
    calls: how many calls the trace holds.

  Returns:
    kernel name -> us per call, largest first.

  Raises:
    ValueError: calls < 1.
  """
  if calls < 1:
    raise ValueError(f"{calls=} must be >= 1")
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  devices = {pid for pid, name in names.items() if "/device:" in name}
  total = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in devices and e.get("dur", 0) > 0:
      total[e["name"]] += e["dur"]
  return dict(sorted(((k, v / calls) for k, v in total.items()),
                     key=lambda kv: -kv[1]))


def profile_kernels(fn, *args, calls: int = 3) -> dict[str, float]:
  """``device_kernel_times`` of ``calls`` runs of ``fn(*args)`` (compiled
  and run once before the trace), traced into a temporary directory."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"),
                      recursive=True)
    if not files:
      return {}
    with gzip.open(files[0]) as f:
      events = json.load(f).get("traceEvents", [])
  return device_kernel_times(events, calls)
