"""The README's quick example runs end to end and its numbers make sense."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_loss_falls():
  out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  match = re.search(r"loss ([0-9.]+) -> ([0-9.]+); frozen kernels unchanged; "
                    r"merged model max \|diff\| = ([0-9.e+-]+)", out.stdout)
  assert match, out.stdout
  before, after, gap = map(float, match.groups())
  assert after < 0.7 * before
  assert gap < 1e-4
