"""Comparing block tables whose scores may tie at float tolerance."""

import numpy as np


def assert_same_sets_up_to_ties(got, want, scores, rtol=1e-5):
  """Block sets equal, except where candidates' scores tie within ``rtol``.

  Two implementations that sum the same probabilities in another order can
  rank near-equal blocks differently; any block in one set and not the
  other must then score like the reference's lowest pick.

  Args:
    got, want: int [B, T, Hkv, n] block tables (-1 empty); order is free.
    scores: float32 [B, T, Hkv, Ts] the reference's block scores.
  """
  got, want, scores = map(np.asarray, (got, want, scores))
  assert got.shape == want.shape, (got.shape, want.shape)
  same = np.all(np.sort(got, -1) == np.sort(want, -1), axis=-1)
  for pos in zip(*np.nonzero(~same)):
    g, w, s = set(got[pos]) - {-1}, set(want[pos]) - {-1}, scores[pos]
    assert len(g) == len(w), (pos, sorted(g), sorted(w))
    swapped = np.array(sorted(g ^ w))
    floor = min(s[j] for j in w)
    np.testing.assert_allclose(s[swapped], floor, rtol=rtol, atol=1e-7,
                               err_msg=f"{pos}: {sorted(g)} vs {sorted(w)}")
