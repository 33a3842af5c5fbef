"""check_token_ids names the first bad id and where it is."""

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import data


def test_good_ids_pass():
  data.check_token_ids(np.arange(256).reshape(2, 128), 256)
  data.check_token_ids(jnp.zeros((0, 3), jnp.int32), 8)


@pytest.mark.parametrize("value, position", [(256, (1, 2)), (-1, (0, 0))])
def test_bad_id_is_named_with_its_position(value, position):
  ids = np.zeros((2, 4), np.int32)
  ids[position] = value
  ids[1, 3] = 999
  with pytest.raises(ValueError) as info:
    data.check_token_ids(ids, 256, what="prompt")
  message = str(info.value)
  assert f"prompt holds token id {value} at position {position}" in message
  assert "and 1 more" in message and "[0, vocab_size=256)" in message


def test_float_ids_are_refused():
  with pytest.raises(ValueError, match="integer token ids"):
    data.check_token_ids(np.ones((2,), np.float32), 8)
