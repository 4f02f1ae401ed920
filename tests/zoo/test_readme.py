"""The README's "Adapting third-party models" snippets run as written (zoo environment)."""

from __future__ import annotations

import pathlib
import re

import pytest

from zoo_support import require

require("maxtext")
require("qwix")

pytestmark = pytest.mark.xdist_group("readme")

README = pathlib.Path(__file__).parents[2] / "README.md"


def _snippets() -> list[str]:
  text = README.read_text("utf-8")
  section = text.split("## Adapting third-party models", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  return [b for b in blocks if "maxtext" in b or "dora_jax.qwix" in b]


def test_maxtext_and_qwix_snippets_run():
  blocks = _snippets()
  assert len(blocks) == 2, "expected the MaxText and the qwix snippet"
  namespace: dict = {"__name__": "readme"}
  for block in blocks:  # the second continues the first
    exec(compile(block, str(README), "exec"), namespace)
  assert len(namespace["provider"].adapted) == 14
  import dora_jax
  assert len(dora_jax.surgery.adapted_paths(namespace["model"])) == 0  # qwix's model
  assert type(namespace["served"]).__name__ == "Transformer"
