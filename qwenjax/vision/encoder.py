"""The vision tower of Qwen3.5 / Qwen3.6: a ViT with a 2×2 patch merger (no DeepStack).

    x = p @ W_patch + b                          [N, D]   Conv3d with kernel = stride, as a dense
    x = x + bilinear(E_pos)[row, col]            learned √P×√P table resampled to each h×w grid
    x = scan(VisionBlock, x) over depth          attention only within a frame, 2-D rotary
        x = x + proj(attn(LN1(x)))
        x = x + fc2(gelu_tanh(fc1(LN2(x))))
    y = fc2(gelu(fc1(group4(LN(x)))))            [N/4, D_text]   one LLM token per 2×2 block

The N patch rows of `pixel_values` come image after image, frame after frame, each frame in
merge-block order `(h/2, w/2, 2, 2)`: the four patches of a merge block are consecutive rows, so
the merger's regrouping is a reshape. Every per-patch quantity (grid coordinates, frame id,
position-table taps) is computed from `grid_thw` with array ops, so a jitted tower compiles once
per patch count, not once per image shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.kernels.attention import attention
from qwenjax.model.params import normal_002, ones, param, zeros
from qwenjax.model.rope import base_inv_frequencies
from qwenjax.model.transformer import REMAT_POLICIES
from qwenjax.vision.config import GELU_APPROXIMATE, VisionConfig


# ---------------------------------------------------------------------- patch layout
def patch_layout(grid_thw: jax.Array, num_patches: int, merge: int) -> dict[str, jax.Array]:
    """Per-patch `row`, `col`, grid `height`/`width` and `frame` (a global frame id), each `[N]`.

    `grid_thw [n, 3]` lists each image or video as (frames t, patch rows h, patch columns w).
    """
    grid = jnp.asarray(grid_thw, jnp.int32)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    counts = t * h * w
    ends = jnp.cumsum(counts)
    p = jnp.arange(num_patches, dtype=jnp.int32)
    item = jnp.minimum(jnp.searchsorted(ends, p, side="right"), len(counts) - 1)  # [N]
    local = p - (ends - counts)[item]
    height, width = h[item], w[item]
    frame, within = local // (height * width), local % (height * width)
    # Inverse of the merge-block order (block_row, block_col, in_row, in_col).
    block, inner = within // (merge * merge), within % (merge * merge)
    block_row, block_col = block // (width // merge), block % (width // merge)
    row = block_row * merge + inner // merge
    col = block_col * merge + inner % merge
    first_frame = jnp.cumsum(t) - t
    return {
        "row": row,
        "col": col,
        "height": height,
        "width": width,
        "frame": first_frame[item] + frame,
    }


def _bilinear_taps(index: jax.Array, size: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    """Two taps into a `side`-long table and their weights, for target `index` of `size`
    (align_corners=True: the end points map to 0 and side−1; border taps clamped)."""
    src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(size - 1, 1)  # [N]
    floor = jnp.floor(src)
    offsets = jnp.arange(2)
    taps = jnp.clip(floor.astype(jnp.int32)[:, None] + offsets, 0, side - 1)  # [N, 2]
    weights = jnp.maximum(1 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0)
    return taps, weights


def check_grid(grid_thw, num_patches: int, merge: int, what: str = "pixel_values") -> None:
    """Raise a clear error when a concrete grid does not describe `num_patches` rows."""
    if isinstance(grid_thw, jax.core.Tracer):
        return
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"grid_thw must be [n, 3], got shape {grid.shape}")
    if (grid[:, 1:] % merge).any():
        raise ValueError(f"grid_thw h and w must be multiples of the merge size {merge}: {grid}")
    total = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    if total != num_patches:
        raise ValueError(f"grid_thw describes {total} patches but {what} has {num_patches} rows")


# ---------------------------------------------------------------------- layers
class Linear(nnx.Module):
    """`y = x · W + b` over the last `len(in_shape)` dims; W `[in..., out...]` is HF's weight,
    transposed."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, *, dtype, param_dtype, rngs):
        self.dtype = dtype
        self.num_in = len(in_shape)
        shape, axes = (*in_shape, *out_shape), (*in_axes, *out_axes)
        self.kernel = param(rngs, normal_002, shape, axes, param_dtype)
        self.bias = param(rngs, zeros, out_shape, out_axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x, self.kernel[...].astype(self.dtype), axes=self.num_in)
        return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """`(x − mean) / √(var + eps) · w + b`, in fp32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, ones, (dim,), (ax.EMBED,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (ax.EMBED,), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        w, b = self.weight[...].astype(y.dtype), self.bias[...].astype(y.dtype)
        return (y * w + b).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE over the whole head of `x [P, N, H]`, in fp32 (`cos, sin [P, H]`)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = xf * cos[:, None, :] + jnp.concatenate([-x2, x1], axis=-1) * sin[:, None, :]
    return rotated.astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention within each frame, full-head 2-D rotary in fp32."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # qkv rows are [q | k | v], each head-major: [D] → [3, N, H].
        self.qkv = Linear((d,), (3, n, h), (ax.EMBED,), (None, ax.Q_HEADS, ax.HEAD_DIM), **kw)
        self.proj = Linear((n, h), (d,), (ax.Q_HEADS, ax.HEAD_DIM), (ax.EMBED,), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, frame: jax.Array) -> jax.Array:
        q, k, v = jnp.unstack(self.qkv(x), axis=1)  # [P, N, H] each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # One row of P patches; frame ids as segment ids keep every frame to itself (the
        # kernel masks by segment, so no dense P×P mask is built here).
        index = jnp.arange(x.shape[0])[None]
        o = attention(
            q[None], k[None], v[None],
            q_positions=index, kv_positions=index,
            q_segment_ids=frame[None], kv_segment_ids=frame[None],
            causal=False,
        )[0]  # fmt: skip
        return self.proj(o)  # [P, D]


class VisionMLP(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.approximate = GELU_APPROXIMATE[config.hidden_act]
        self.linear_fc1 = Linear((d,), (f,), (ax.EMBED,), (ax.MLP,), **kw)
        self.linear_fc2 = Linear((f,), (d,), (ax.MLP,), (ax.EMBED,), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nnx.Module):
    """Pre-LN transformer block (the scan unit)."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(d, eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = VisionAttention(config, **kw)
        self.norm2 = LayerNorm(d, eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMLP(config, **kw)

    def __call__(self, x, cos, sin, frame):
        x = x + self.attn(self.norm1(x), cos, sin, frame)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LN per patch, then each merge block's 4 patches concatenated → fc1 → exact GELU → fc2."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, m, out = config.hidden_size, config.merge_unit, config.out_hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.merge_unit = m
        self.norm = LayerNorm(d, config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Linear((m, d), (m * d,), (None, ax.EMBED), (ax.MLP,), **kw)
        self.linear_fc2 = Linear((m * d,), (out,), (ax.MLP,), (ax.EMBED,), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x).reshape(-1, self.merge_unit, x.shape[-1])  # [P/4, 4, D]
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))


# ---------------------------------------------------------------------- the tower
class VisionEncoder(nnx.Module):
    """`encoder(pixel_values [P, C·Tp·p·p], grid_thw [n, 3])` → LLM tokens `[P/4, D_text]`."""

    def __init__(
        self,
        config: VisionConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype | None = None,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        param_dtype = dtype if param_dtype is None else param_dtype
        c, tp, p, d = (
            config.in_channels,
            config.temporal_patch_size,
            config.patch_size,
            config.hidden_size,
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.dtype = dtype
        self.remat = remat
        # HF's Conv3d weight [D, C, Tp, p, p], as a dense kernel over the flattened patch.
        self.patch_embed = Linear((c, tp, p, p), (d,), (None,) * 4, (ax.EMBED,), rngs=rngs, **kw)
        self.pos_embed = param(
            rngs, normal_002, (config.num_position_embeddings, d), (None, ax.EMBED), param_dtype
        )

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: ax.LAYERS})
        def make_blocks(rngs: nnx.Rngs) -> VisionBlock:
            return VisionBlock(config, rngs=rngs, **kw)

        self.blocks = make_blocks(rngs)
        self.merger = PatchMerger(config, rngs=rngs, **kw)

    def position_embedding(self, layout: dict[str, jax.Array]) -> jax.Array:
        """The learned table resampled bilinearly to each patch's grid cell `[P, D]` (fp32)."""
        side = self.config.grid_side
        row_taps, row_w = _bilinear_taps(layout["row"], layout["height"], side)  # [P, 2]
        col_taps, col_w = _bilinear_taps(layout["col"], layout["width"], side)
        index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)  # [P, 4]
        weight = (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4)
        table = jnp.take(self.pos_embed[...], index, axis=0)  # [P, 4, D]
        return jnp.sum(table * weight[:, :, None], axis=1)

    def rotary(self, layout: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[P, H]`: H/4 frequencies of the row, then of the column, repeated twice."""
        spatial = self.config.head_dim // 2
        inv_freq = base_inv_frequencies(spatial, self.config.rope_theta)  # [H/4]
        f = jnp.concatenate(
            [
                layout["row"].astype(jnp.float32)[:, None] * inv_freq,
                layout["col"].astype(jnp.float32)[:, None] * inv_freq,
            ],
            axis=-1,
        )  # [P, H/2]
        emb = jnp.concatenate([f, f], axis=-1)  # [P, H]
        return jnp.cos(emb), jnp.sin(emb)

    def features(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        """The last block's output `[P, D]`, before the merger."""
        cfg = self.config
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(
                f"pixel_values must be [patches, {cfg.patch_dim}], got {pixel_values.shape}"
            )
        n = pixel_values.shape[0]
        check_grid(grid_thw, n, cfg.spatial_merge_size)
        layout = patch_layout(grid_thw, n, cfg.spatial_merge_size)
        patches = pixel_values.astype(self.dtype).reshape(
            n, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size
        )
        x = self.patch_embed(patches)  # [P, D]
        x = x + self.position_embedding(layout).astype(x.dtype)
        cos, sin = self.rotary(layout)
        frame = layout["frame"]
        graphdef, state = nnx.split(self.blocks)

        def body(x, block_state):
            return nnx.merge(graphdef, block_state)(x, cos, sin, frame), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        x, _ = jax.lax.scan(body, x, state)
        return x

    def __call__(self, pixel_values: jax.Array, grid_thw: jax.Array) -> jax.Array:
        """LLM tokens `[P/4, out_hidden_size]`, image after image in `grid_thw` order."""
        return self.merger(self.features(pixel_values, grid_thw))
