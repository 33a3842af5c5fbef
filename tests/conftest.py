"""Fixtures of the nsa_jax tests: ``case`` runs a test on each CASES shape."""

import pytest

from nsa_cases import CASES


@pytest.fixture(params=CASES, ids=str)
def case(request):
  return request.param
