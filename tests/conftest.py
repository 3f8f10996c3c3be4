"""Shared test set-up: 64-bit off (the library's default), fixed keys."""

import jax
import pytest


@pytest.fixture
def key():
  return jax.random.PRNGKey(0)
