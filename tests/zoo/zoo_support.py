"""Imports of third-party model zoos for the tests under tests/zoo/.

The zoo packages (MaxText, gemma, qwix, ...) live in their own environment, built
by .ci/run's zoo stage from ci/zoo-requirements.txt, never in the main one. In the
main environment these tests are skipped; with ``DORA_JAX_ZOO_REQUIRED=1`` (the zoo
stage sets it) a missing package is an error, so the stage cannot pass by skipping.
"""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRED = os.environ.get("DORA_JAX_ZOO_REQUIRED", "0") == "1"


def require(name: str):
  """``import name``; skipped when absent, unless the zoo stage requires it."""
  if REQUIRED:
    return importlib.import_module(name)
  return pytest.importorskip(name, reason=f"{name} is a zoo package (see tests/zoo/zoo_support.py)")
