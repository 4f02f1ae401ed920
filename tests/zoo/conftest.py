"""Tests on third-party model zoos (gemma, MaxText, qwix), run in their own environment.

Each test module guards its imports with a module-level ``pytest.importorskip``,
so the main environment (without the zoo packages) skips them. With
``DORA_JAX_ZOO_REQUIRED=1`` (the zoo CI stage) a skip at collection becomes a
failure: a missing or broken zoo package must not pass silently.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "DORA_JAX_ZOO_REQUIRED"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  report = outcome.get_result()
  if os.environ.get(REQUIRE_ENV) == "1" and report.skipped:
    report.outcome = "failed"
    report.longrepr = (f"{REQUIRE_ENV}=1 but {collector.nodeid} was skipped at collection: "
                       f"{report.longrepr}")
