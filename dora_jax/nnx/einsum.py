"""DoRA wrapper of :class:`flax.nnx.Einsum`, in any kernel layout.

The kernel's indices that appear in the input but not the output are contracted
(``d_in``), those in the output but not the input are output features
(``d_out``), and those in the input, the kernel and the output are batch axes of
the op (a batched kernel such as ``'...hi,hij->...hj'``: one DoRA norm per batch
entry). The equation runs as written through
:func:`dora_jax.general.dora_einsum`, in the kernel's own axis order (no
transpose of the frozen kernel): ``'btd,dhk->bthk'``, ``'BTD,NDH->BTNH'``,
``'BSD,CKDH->CBSKH'``, ``'...F,NHF->...NH'`` alike.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from dora_jax import general
from dora_jax.nnx.base import DoRALayer, check_dtype_promotion
from dora_jax.nnx.dense import add_dropout_rest


def parse_einsum(einsum_str: str) -> tuple[str, str, str]:
  """``(input, kernel, output)`` index strings of an explicit two-operand equation."""
  eq = einsum_str.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"einsum_str must be explicit with two operands, got {einsum_str!r}")
  ins, out = eq.split("->")
  lhs, rhs = ins.split(",")
  if "." in rhs:
    raise NotImplementedError(f"an ellipsis in the kernel operand is not supported: {einsum_str!r}")
  for name, part in (("input", lhs), ("kernel", rhs), ("output", out)):
    letters = part.replace("...", "")
    if len(set(letters)) != len(letters):
      raise NotImplementedError(f"repeated index in the {name} of {einsum_str!r}")
  return lhs, rhs, out


def example_input_shape(einsum_str: str, kernel_shape: tuple[int, ...]) -> tuple[int, ...]:
  """An input shape for ``einsum_str`` (sizes from the kernel; 2 elsewhere, no ellipsis dims)."""
  lhs, rhs, _ = parse_einsum(einsum_str)
  sizes = dict(zip(rhs, kernel_shape))
  return tuple(sizes.get(c, 2) for c in lhs.replace("...", ""))


def einsum_kernel_layout(einsum_str: str, kernel_shape: tuple[int, ...]) -> general.WeightLayout:
  """The kernel's :class:`~dora_jax.general.WeightLayout` under ``einsum_str``.

  Raises ``NotImplementedError`` naming the problem for equations DoRA cannot adapt
  (kernel indices summed away, input indices summed without the kernel, no
  contracted or no output index).
  """
  lhs, rhs, out = parse_einsum(einsum_str)
  lhs_l, out_l = set(lhs.replace("...", "")), set(out.replace("...", ""))
  problems = []
  summed = [c for c in rhs if c not in lhs_l and c not in out_l]
  if summed:
    problems.append(f"kernel indices {summed} are summed away")
  dropped = sorted(c for c in lhs_l if c not in rhs and c not in out_l)
  if dropped:
    problems.append(f"input indices {dropped} are summed away without the kernel")
  if not any(c in lhs_l and c not in out_l for c in rhs):
    problems.append("no kernel index is contracted with the input")
  if not any(c in out_l and c not in lhs_l for c in rhs):
    problems.append("no kernel index reaches only the output")
  if problems:
    raise NotImplementedError(f"Einsum {einsum_str!r} is not adaptable: " + "; ".join(problems))
  return general.einsum_layout(einsum_str.replace(" ", ""),
                               example_input_shape(einsum_str, kernel_shape),
                               tuple(kernel_shape))


def _bias_shape(einsum_str: str, x_ndim: int, kernel_shape: tuple[int, ...]) -> list[int]:
  """The broadcast shape of an ``nnx.Einsum`` bias in the output (``1`` off the kernel's axes)."""
  lhs, rhs, out = parse_einsum(einsum_str)
  if "..." in out:
    n = x_ndim - len(lhs.replace("...", ""))
    out = out.replace("...", "." * n)
  sizes = dict(zip(rhs, kernel_shape))
  return [sizes.get(c, 1) if c in string.ascii_letters else 1 for c in out]


class DoRAEinsum(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.Einsum` (any equation with one kernel).

  ``magnitude``'s shape is ``[*batch, *out_shape]`` (kernel order); the bias
  (not scaled by DoRA) is added as ``nnx.Einsum`` adds it. Refused with a clear
  error: indices summed away, ``einsum_str`` given at call time, a custom
  ``einsum_op``. Arguments as :class:`dora_jax.nnx.DoRADense`.
  """

  def __init__(self, base: nnx.Einsum, *, rank: int, alpha: float, rslora: bool = False,
               dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs,
               path: str = "", detach_norm: bool = True):
    self.check_base(base, nnx.Einsum)
    if base.einsum_op is not jnp.einsum:
      raise NotImplementedError("DoRAEinsum does not support a custom einsum_op")
    if base.einsum_str is None:
      raise NotImplementedError("DoRAEinsum needs the equation at construction (einsum_str=)")
    check_dtype_promotion(base)
    self.einsum_str = base.einsum_str.replace(" ", "")
    self.kernel_shape = tuple(base.kernel.shape)
    layout = einsum_kernel_layout(self.einsum_str, self.kernel_shape)
    self._init_adapters(base, layout=layout, rank=rank, alpha=alpha, rslora=rslora,
                        dropout=dropout, param_dtype=param_dtype, rngs=rngs, path=path,
                        detach_norm=detach_norm)

  def __call__(self, x: jax.Array, einsum_str: str | None = None, *,
               deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``x -> einsum(einsum_str, x, kernel)`` with the DoRA adapter, same shapes as ``nnx.Einsum``."""
    if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
      raise NotImplementedError("DoRAEinsum runs the equation it was built with only")
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    norm, base_sq = self._op_norms()
    x_dropped = self._dropped(x, deterministic, rngs)
    op_kwargs = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
    y = general.dora_einsum(
        self.einsum_str, x if x_dropped is None else x_dropped, kernel, self.lora_a[...],
        self.lora_b[...], self.magnitude[...], self.scale, norm=norm, base_sq_norm=base_sq,
        detach_norm=self.detach_norm, **op_kwargs)
    if x_dropped is not None:
      y = add_dropout_rest(y, jnp.einsum(self.einsum_str, x - x_dropped, kernel, **op_kwargs))
    if bias is not None:
      y += jnp.reshape(bias, _bias_shape(self.einsum_str, x.ndim, self.kernel_shape))
    return y
