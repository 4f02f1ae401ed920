"""Where the PyTorch + PEFT interpreter for the cross-check tests lives.

The torch side of those tests runs in a separate Python (3.11, see
``scripts/peft_env.sh``) named by ``DORA_JAX_PEFT_PYTHON`` or found at
``.venv-peft/bin/python``; without one the tests are skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "DORA_JAX_PEFT_PYTHON"


def peft_python() -> str | None:
  """The interpreter with torch and peft, or ``None``."""
  explicit = os.environ.get(ENV_VAR)
  if explicit:
    return explicit
  default = ROOT / ".venv-peft" / "bin" / "python"
  return str(default) if default.exists() else None


PEFT_PYTHON = peft_python()
