"""Device kernel times from trace events (nsa_jax.profiling)."""

import jax
import jax.numpy as jnp
import pytest

from nsa_jax import profiling


def _events():
  meta = lambda pid, name: dict(ph="M", name="process_name", pid=pid,
                                args=dict(name=name))
  kernel = lambda pid, name, dur: dict(ph="X", pid=pid, tid=1, name=name,
                                       ts=0, dur=dur)
  return [
      meta(1, "/device:GPU:0"), meta(2, "/host:CPU"),
      kernel(1, "decode_top_n", 5.0), kernel(1, "decode_top_n", 7.0),
      kernel(1, "fusion_3", 1.0), kernel(1, "fusion_3", 1.0),
      kernel(1, "empty", 0.0),  # no duration: not a kernel
      kernel(2, "host_op", 100.0),  # a host track
      dict(ph="i", pid=1, name="instant"),  # not a complete event
  ]


def test_device_kernel_times_sums_device_tracks_per_call():
  times = profiling.device_kernel_times(_events(), calls=2)
  assert times == {"decode_top_n": 6.0, "fusion_3": 1.0}
  assert list(times) == ["decode_top_n", "fusion_3"]  # largest first


def test_no_device_track_gives_nothing_and_bad_calls_are_an_error():
  events = [e for e in _events() if e.get("pid") != 1]
  assert not profiling.device_kernel_times(events, calls=1)
  with pytest.raises(ValueError, match="calls"):
    profiling.device_kernel_times(_events(), calls=0)


def test_profile_kernels_runs_a_jitted_call():
  # On a CPU the trace holds no device track: an empty dict, no error.
  times = profiling.profile_kernels(jax.jit(lambda x: x * 2), jnp.ones(4),
                                    calls=1)
  assert isinstance(times, dict)
  if jax.default_backend() == "cpu":
    assert not times
