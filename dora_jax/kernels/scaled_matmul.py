"""The column-scaled matmul for Hopper GPUs (Pallas Mosaic GPU: TMA + wgmma).

DoRA's products that XLA cannot fuse into cuBLAS as one GEMM with the scale
folded in (so no extra ``[T, d_out]`` pass): :func:`scaled_matmul` computes
``out = (x·w + l·r + addend) ⊙ col_scale``: the forward, with ``g`` applied in
the epilogue and the LoRA term either added in-kernel (``l·r = h·(s·b)``,
rank 16 or 32) or handed over as the ``addend`` (any rank), and, with ``w``
read transposed and a unit scale, the backward's ``dx``. Shapes ``x [M, K]``,
``w [K, N]``, ``l [M, r]``, ``r [r, N]``, ``col_scale [N]`` (float32) →
``[M, N]`` in ``x.dtype``.

It accumulates in float32 and applies the scale in float32;
:func:`scaled_matmul_reference` is its ``jax.numpy`` twin. Operands are bf16
or fp16. The kernel is persistent (one CTA per SM), warp specialised (one TMA
producer warpgroup, two wgmma consumer warpgroups), and needs every dimension
divisible by its tile (:func:`supported` says whether a shape qualifies; the
dispatcher sends anything else to XLA). ``interpret=True`` runs it through
Mosaic GPU's interpreter on any backend (slow; for tests), except the fused
low-rank term.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tiling of one kernel launch.

  ``tile_m × tile_n`` is one consumer warpgroup's accumulator; the CTA covers
  two of them, side by side along N (``cta_m × cta_n``). ``stages``
  TMA buffers are in flight. Output tiles are visited in a planar snake of
  width ``snake`` along ``snake_dim`` (0: M, 1: N) for L2 reuse, and stored
  in ``[epi_m, epi_n]`` pieces through two shared-memory buffers per
  warpgroup. Shared memory: ``stages·(cta_m + cta_n)·tile_k`` input elements
  plus ``4·epi_m·epi_n`` output elements must fit in 227 KiB.
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 64
  stages: int = 4
  snake_dim: int = 1
  snake: int = 8
  epi_m: int = 64
  epi_n: int = 64

  @property
  def cta_m(self) -> int:
    return self.tile_m

  @property
  def cta_n(self) -> int:
    return 2 * self.tile_n


#: The fastest tiling measured (benchmarks/scaled_matmul.py; KERNELS.md): 128×256
#: CTA tiles, K step 64, 4 stages, 64×64 output pieces (≈ 227 KiB of shared memory).
FORWARD_TILES = Tiles()


def num_sms() -> int:
  """Streaming multiprocessors of the default device (CPU: 4, for interpret mode)."""
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 4)


def supported(m: int, n: int, k: int, tiles: Tiles) -> bool:
  """Whether ``[M, K]·[K, N]`` divides into ``tiles`` (no masking in the kernel)."""
  return m % tiles.cta_m == 0 and n % tiles.cta_n == 0 and k % tiles.tile_k == 0


def _check_operand(arg: str, value, dtype=None):
  name = "scaled_matmul"
  if value.ndim != 2:
    raise ValueError(f"{name}: {arg} must be 2-D, got shape {value.shape}")
  want = jnp.dtype(dtype) if dtype is not None else None
  if want is None and jnp.dtype(value.dtype) not in (jnp.dtype(jnp.bfloat16),
                                                     jnp.dtype(jnp.float16)):
    raise ValueError(f"{name}: {arg} must be bfloat16 or float16 (the wgmma operand "
                     f"types used here), got {value.dtype}")
  if want is not None and jnp.dtype(value.dtype) != want:
    raise ValueError(f"{name}: {arg} must have dtype {want} like the first operand, "
                     f"got {value.dtype}")


def _setup(m, n, k, tiles, dtype):
  """Validate ``tiles`` for an ``[M, N]`` output with K-depth ``k``; return
  ``(in_transforms, out_transforms, m_iters, n_iters, k_iters)``."""
  name = "scaled_matmul"
  if tiles.tile_m % 64 or tiles.epi_m % 64 or tiles.tile_m % tiles.epi_m \
      or tiles.tile_n % tiles.epi_n:
    raise ValueError(f"{name}: {tiles} — tile_m and epi_m must be multiples of 64 "
                     "(the wgmma register layout's row block) and divide each other, "
                     "and epi_n must divide tile_n")
  if not supported(m, n, k, tiles):
    raise ValueError(
        f"{name}: M={m}, N={n}, K={k} must be multiples of {tiles.cta_m}, "
        f"{tiles.cta_n} and {tiles.tile_k} (use the XLA path for other shapes)")
  return (_smem_transforms(tiles.tile_k, dtype), _smem_transforms(tiles.epi_n, dtype),
          m // tiles.cta_m, n // tiles.cta_n, k // tiles.tile_k)


def _smem_transforms(minor: int, dtype):
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def _launch(body, out_shape, dtype, interpret, outputs: int = 1):
  """One persistent CTA per SM, ``outputs`` results of ``out_shape``."""
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  out_type = jax.ShapeDtypeStruct(out_shape, dtype)
  return plgpu.kernel(
      body,
      out_type=out_type if outputs == 1 else (out_type,) * outputs,
      grid=(num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      compiler_params=params,
      interpret=plgpu.InterpretGPUParams() if interpret else False,
  )


def _pipeline(in_specs, k_iters: int, tiles: Tiles):
  """``make(body, context)``: the warp-specialised K loop over ``in_specs``."""
  def make(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=2, max_concurrent_steps=tiles.stages, compute_context=context)
  return make


def _ignore(*_, **__):
  """A body/context placeholder: allocations do not depend on them."""


def _store_tile(out_smem, outputs, wg, tiles):
  """Write one warpgroup's ``[tile_m, tile_n]`` results (``outputs``: pairs of
  a tile value and its destination in GMEM) through SMEM in ``[epi_m, epi_n]``
  pieces, double-buffered TMA stores alternating between the two slots, once
  the previous tile's stores have read their buffers."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  piece = 0
  for i in range(tiles.tile_m // tiles.epi_m):
    for j in range(tiles.tile_n // tiles.epi_n):
      rows = slice(i * tiles.epi_m, (i + 1) * tiles.epi_m)
      cols = slice(j * tiles.epi_n, (j + 1) * tiles.epi_n)
      for tile, out_gmem in outputs:
        slot = piece % 2
        piece += 1
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        out_smem[wg, slot] = tile[rows, cols]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem.at[rows, cols])


def _vmappable(kernel_fn, *args, rows: int = 1):
  """``kernel_fn(*args)`` under ``vmap``. The first ``rows`` arguments have the
  output's rows (M) as their leading axis: a batch over exactly those is folded
  into M (one launch); any other batching runs one launch per element
  (``lax.map``). ``None`` arguments pass through."""
  present = [i for i, a in enumerate(args) if a is not None]

  def full(values):
    out = list(args)
    for i, v in zip(present, values):
      out[i] = v
    return out

  @jax.custom_batching.custom_vmap
  def call(*values):
    return kernel_fn(*full(values))

  @call.def_vmap
  def _(axis_size, in_batched, *values):
    row_args = {j for j, i in enumerate(present) if i < rows}
    batched = {j for j, b in enumerate(in_batched) if b}
    if batched == row_args:
      m = values[0].shape[1]
      flat = [v.reshape(-1, *v.shape[2:]) if j in batched else v for j, v in enumerate(values)]
      out = jax.tree.map(lambda o: o.reshape(axis_size, m, o.shape[-1]), call(*flat))
      return out, jax.tree.map(lambda _: True, out)
    spread = [v if b else jnp.broadcast_to(v, (axis_size, *v.shape))
              for v, b in zip(values, in_batched)]
    out = lax.map(lambda vs: call(*vs), spread)
    return out, jax.tree.map(lambda _: True, out)

  return call(*[args[i] for i in present])


def _tile_loop(m_iters, n_iters, tiles, fn):
  """Run ``fn(m_idx, n_idx)`` over this CTA's share of the output tiles."""
  @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
  def _(info):
    (lin,) = info.index
    m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), tiles.snake_dim,
                                      tiles.snake)
    fn(m_idx, n_idx)


# ---------------------------------------------------------------------------
# out = (x·w) ⊙ col_scale


def scaled_matmul_reference(x: jax.Array, w: jax.Array, col_scale: jax.Array,
                            low_rank: tuple[jax.Array, jax.Array] | None = None, *,
                            addend: jax.Array | None = None,
                            with_unscaled: bool = False, trans_w: bool = False):
  """``(x·w + l·r + addend) ⊙ col_scale``: float32 accumulation and scaling,
  result in ``x.dtype``; with ``with_unscaled`` the pair ``(scaled, unscaled)``;
  with ``trans_w`` ``w`` is ``[N, K]`` and ``wᵀ`` is used."""
  dims = (((1,), (1,)), ((), ())) if trans_w else (((1,), (0,)), ((), ()))
  acc = lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
  if low_rank is not None:
    acc = acc + jnp.dot(low_rank[0], low_rank[1], preferred_element_type=jnp.float32)
  if addend is not None:
    acc = acc + addend.astype(jnp.float32)
  out = (acc * col_scale.astype(jnp.float32)).astype(x.dtype)
  return (out, acc.astype(x.dtype)) if with_unscaled else out


#: Largest rank the forward kernel adds in-kernel (its two factors' tiles are
#: loaded once per output tile into shared memory beside 3 pipeline stages).
MAX_FUSED_RANK = 32
#: Tiling when a low-rank term is fused: as :data:`FORWARD_TILES` with 3 stages.
FUSED_TILES = Tiles(stages=3)


def fusable_rank(rank: int) -> bool:
  """Whether :func:`scaled_matmul` can add a rank-``rank`` term in-kernel
  (a multiple of 16, the bf16 wgmma K step, up to :data:`MAX_FUSED_RANK`)."""
  return 0 < rank <= MAX_FUSED_RANK and rank % 16 == 0


def scaled_matmul(x: jax.Array, w: jax.Array, col_scale: jax.Array,
                  low_rank: tuple[jax.Array, jax.Array] | None = None, *,
                  addend: jax.Array | None = None,
                  with_unscaled: bool = False, trans_w: bool = False,
                  tiles: Tiles | None = None, interpret: bool = False):
  """``(x [M, K] · w [K, N] + l [M, r] · r [r, N]) ⊙ col_scale [N]`` → ``[M, N]``, one GEMM.

  ``low_rank = (l, r)`` is optional (rank per :func:`fusable_rank`); its
  tiles are fetched once per output tile while the main K loop runs and added
  with one more wgmma before the scale. ``addend [M, N]`` (``x.dtype``; not
  with ``low_rank`` or ``with_unscaled``) is added to the accumulator before
  the scale instead: its tile is fetched while the main loop runs into a
  shared-memory buffer that then stages the result's store (so the sum costs
  no pass of its own; for a low-rank term of any rank computed apart, e.g.
  DoRA's ``h·(s·b)`` at r = 384). The result is in ``x.dtype``. With
  ``with_unscaled`` the epilogue also stores the accumulator before the scale
  and the call returns ``(scaled, unscaled)`` (DoRA's output and its ``pre``
  residual from one GEMM). With ``trans_w`` the right operand is ``w [N, K]``,
  read transposed in place (DoRA's ``dx = dpre·Wᵀ + (s·t)·aᵀ`` from the Flax
  kernel ``W [d_in, d_out]`` as is). ``tiles`` defaults to
  :data:`FORWARD_TILES` (:data:`FUSED_TILES` with ``low_rank`` or ``addend``).

  Interpret mode does not run ``low_rank`` (``NotImplementedError``): Mosaic
  GPU's interpreter (jax 0.11.2) deadlocks on it, nondeterministically, in
  barrier waits. The GPU runs it: the ``gpu`` tests and
  ``benchmarks/scaled_matmul.py`` check it against :func:`scaled_matmul_reference`.
  """
  if low_rank is not None and interpret:
    raise NotImplementedError("scaled_matmul: the low-rank term does not run in interpret "
                              "mode (Mosaic GPU's interpreter deadlocks on it)")
  if addend is not None and (low_rank is not None or with_unscaled):
    raise ValueError("scaled_matmul: addend cannot be combined with low_rank or with_unscaled")
  if tiles is None:
    tiles = FORWARD_TILES if low_rank is None and addend is None else FUSED_TILES
  lhs2, rhs2 = (None, None) if low_rank is None else low_rank
  return _vmappable(functools.partial(_scaled_matmul, tiles=tiles, interpret=interpret,
                                      with_unscaled=with_unscaled, trans_w=trans_w),
                    x, lhs2, addend, w, col_scale.astype(jnp.float32), rhs2, rows=3)


def _scaled_matmul(x, lhs2, addend, w, col_scale, rhs2, *, tiles, interpret, with_unscaled,
                   trans_w):
  name = "scaled_matmul"
  _check_operand("x", x)
  _check_operand("w", w, x.dtype)
  (m, k), (k2, n) = x.shape, (w.shape[::-1] if trans_w else w.shape)
  if k != k2 or col_scale.shape != (n,):
    w_dims = "[N, K] (trans_w)" if trans_w else "[K, N]"
    raise ValueError(f"{name}: x {x.shape}, w {w.shape} and col_scale {col_scale.shape} "
                     f"must be [M, K], {w_dims} and [N]")
  has_add = addend is not None
  if has_add:
    _check_operand("addend", addend, x.dtype)
    if addend.shape != (m, n):
      raise ValueError(f"{name}: addend {addend.shape} must be [M, N] = [{m}, {n}]")
  rank = 0 if lhs2 is None else lhs2.shape[-1]
  if lhs2 is not None:
    _check_operand("low_rank[0]", lhs2, x.dtype)
    _check_operand("low_rank[1]", rhs2, x.dtype)
    if lhs2.shape != (m, rank) or rhs2.shape != (rank, n):
      raise ValueError(f"{name}: low_rank factors {lhs2.shape} and {rhs2.shape} must be "
                       f"[M, r] and [r, N] with M={m}, N={n}")
    if not fusable_rank(rank):
      raise ValueError(f"{name}: low-rank rank {rank} must be a multiple of 16 "
                       f"up to {MAX_FUSED_RANK}")
  dtype = x.dtype
  in_tf, out_tf, m_iters, n_iters, k_iters = _setup(m, n, k, tiles, dtype)

  pipeline = _pipeline([
      plgpu.BlockSpec((tiles.cta_m, tiles.tile_k), lambda kk: (0, kk),
                      transforms=in_tf, memory_space=plgpu.SMEM),
      plgpu.BlockSpec((tiles.cta_n, tiles.tile_k), lambda kk: (0, kk),
                      transforms=in_tf, memory_space=plgpu.SMEM) if trans_w else
      plgpu.BlockSpec((tiles.tile_k, tiles.cta_n), lambda kk: (kk, 0),
                      transforms=in_tf, memory_space=plgpu.SMEM),
  ], k_iters, tiles)
  lr_tf = _smem_transforms(rank, dtype) if rank else None  # one swizzle for both operands
  low_rank_scratch = {} if not rank else dict(
      l_smem=plgpu.SMEM((2, tiles.tile_m, rank), dtype, transforms=lr_tf),
      r_smem=plgpu.SMEM((2, rank, tiles.tile_n), dtype, transforms=lr_tf),
      lr_bar=plgpu.Barrier(num_barriers=4))
  # with an addend, its buffer also stages the result's store (no out_smem)
  store_scratch = dict(
      add_smem=plgpu.SMEM((2, tiles.tile_m, tiles.tile_n), dtype,
                          transforms=_smem_transforms(tiles.tile_n, dtype)),
      add_bar=plgpu.Barrier(num_barriers=2)) if has_add else dict(
      out_smem=plgpu.SMEM((2, 2, tiles.epi_m, tiles.epi_n), dtype, transforms=out_tf))

  def kernel(x_gmem, *refs):
    a_gmem = l_gmem = r_gmem = None
    if rank:
      l_gmem, w_gmem, s_gmem, r_gmem, *out_gmems = refs
    elif has_add:
      a_gmem, w_gmem, s_gmem, *out_gmems = refs
    else:
      w_gmem, s_gmem, *out_gmems = refs

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(_ignore, _ignore).get_allocations(x_gmem, w_gmem),
        s_smem=plgpu.SMEM((2, tiles.tile_n), jnp.float32),
        s_bar=plgpu.Barrier(num_barriers=2),
        **store_scratch,
        **low_rank_scratch,
        collective_axes="wg")
    def _(allocs, s_smem, s_bar, out_smem=None, add_smem=None, add_bar=None, l_smem=None,
          r_smem=None, lr_bar=None):
      wg = lax.axis_index("wg")

      def one_tile(m_idx, n_idx):
        rows = pl.ds(m_idx * tiles.cta_m, tiles.cta_m)
        cols = pl.ds(n_idx * tiles.cta_n + wg * tiles.tile_n, tiles.tile_n)

        def context(run):
          # the scale's (and the low-rank or addend tiles') TMA loads overlap the main loop
          if has_add:  # once the previous tile's store has read the buffer
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.copy_gmem_to_smem(a_gmem.at[rows, cols], add_smem.at[wg], add_bar.at[wg])
          plgpu.copy_gmem_to_smem(s_gmem.at[cols], s_smem.at[wg], s_bar.at[wg])
          if rank:
            plgpu.copy_gmem_to_smem(l_gmem.at[rows, :], l_smem.at[wg], lr_bar.at[2 * wg])
            plgpu.copy_gmem_to_smem(r_gmem.at[:, cols], r_smem.at[wg], lr_bar.at[2 * wg + 1])

          @functools.partial(pl.run_scoped,
                             acc_ref=plgpu.ACC((tiles.tile_m, tiles.tile_n), jnp.float32))
          def _(acc_ref):
            run(acc_ref)
            if rank:
              plgpu.barrier_wait(lr_bar.at[2 * wg])
              plgpu.barrier_wait(lr_bar.at[2 * wg + 1])
              plgpu.wgmma(acc_ref, l_smem.at[wg], r_smem.at[wg])
              plgpu.wgmma_wait(0)
            plgpu.barrier_wait(s_bar.at[wg])
            scale = plgpu.load(s_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
            acc = acc_ref[...]
            if has_add:
              plgpu.barrier_wait(add_bar.at[wg])
              acc = acc + plgpu.load(add_smem.at[wg],
                                     layout=plgpu.Layout.WGMMA).astype(jnp.float32)
              add_smem[wg] = (acc * lax.broadcast_in_dim(scale, acc.shape, [1])).astype(dtype)
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(add_smem.at[wg], out_gmems[0].at[rows, cols])
              return
            tiles_out = [(acc * lax.broadcast_in_dim(scale, acc.shape, [1])).astype(dtype)]
            if with_unscaled:
              tiles_out.append(acc.astype(dtype))
            _store_tile(out_smem, [(t, o.at[rows, cols]) for t, o in zip(tiles_out, out_gmems)],
                        wg, tiles)

        def body(_, x_smem, w_smem, acc_ref):
          mine = pl.ds(wg * tiles.tile_n, tiles.tile_n)
          rhs = w_smem.at[mine, :].transpose((1, 0)) if trans_w else w_smem.at[:, mine]
          plgpu.wgmma(acc_ref, x_smem, rhs)
          plgpu.wgmma_wait(0)
          return acc_ref

        cta_cols = pl.ds(n_idx * tiles.cta_n, tiles.cta_n)
        pipeline(body, context)(x_gmem.at[rows, :],
                                w_gmem.at[cta_cols, :] if trans_w else w_gmem.at[:, cta_cols],
                                allocations=allocs)

      _tile_loop(m_iters, n_iters, tiles, one_tile)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  operands = ((x, lhs2, w, col_scale, rhs2) if rank else
              (x, addend, w, col_scale) if has_add else (x, w, col_scale))
  # the name profilers show: which operand layout and which extras
  kernel.__name__ = ("dora_matmul" + ("_wt" if trans_w else "") + ("_lowrank" if rank else "")
                     + ("_addend" if has_add else "") + ("_pre" if with_unscaled else ""))
  return _launch(kernel, (m, n), dtype, interpret, 2 if with_unscaled else 1)(*operands)
