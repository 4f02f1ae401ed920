"""The PyTorch/PEFT side of the Embed/Conv adapter-file cross-check in test_peft_compat.py.

Usage: ``python peft_io_embed_conv_side.py ADAPTER_DIR INPUTS.npz OUT.npz RESAVE_DIR``.
``INPUTS.npz`` holds the base weights in PyTorch layout (``embed.weight
[12, 8]``, ``conv.weight [6, 8, 3, 3]``, ``conv.bias [6]``, ``head.weight
[5, 6]``, ``head.bias [5]``) and the ids ``[B, H, W]``. The torch model mirrors
``EmbedConvNet`` in test_io.py (NHWC in Flax, NCHW here). This loads the
adapter with ``PeftModel.from_pretrained``, writes the base and adapted outputs
``[B, H, W, 5]`` to ``OUT.npz``, re-saves the adapter with ``save_pretrained``
to ``RESAVE_DIR`` and prints a JSON line with the adapted modules and ranks.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from peft import PeftModel


class EmbedConvNet(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(12, 8)
    self.conv = torch.nn.Conv2d(8, 6, (3, 3), padding=1)
    self.head = torch.nn.Linear(6, 5)

  def forward(self, ids):
    h = self.embed(ids).permute(0, 3, 1, 2)  # [B, 8, H, W]
    h = torch.tanh(self.conv(h)).permute(0, 2, 3, 1)  # [B, H, W, 6]
    return self.head(h)


def main():
  adapter, inputs, out, resave = sys.argv[1:5]
  data = dict(np.load(inputs))
  model = EmbedConvNet()
  state = {k: torch.from_numpy(v) for k, v in data.items() if k != "ids"}
  model.load_state_dict(state)
  model.eval()
  ids = torch.from_numpy(data["ids"]).long()
  with torch.no_grad():
    base = model(ids).numpy()
    peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    adapted = peft_model(ids).numpy()
  np.savez(out, base=base, adapted=adapted)
  peft_model.save_pretrained(resave)
  layers = {name: module.r["default"] for name, module in peft_model.named_modules()
            if hasattr(module, "r") and isinstance(getattr(module, "r"), dict)}
  print(json.dumps({"ranks": layers}))


if __name__ == "__main__":
  main()
