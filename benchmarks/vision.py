"""Vision throughput: the ViT alone (images/s) and the prefill of an image prompt through the VLM.

    python -m benchmarks.vision                        # tiny model (CPU-friendly), fp32
    python -m benchmarks.vision --model 27b            # the published 27B ViT + 27B VLM, bf16

A script, not a test. Random weights, random pixels (speed does not depend on them). The ViT
row times `VisionEncoder(pixel_values, grid_thw)` on `--batch` square images of each `--sizes`
side (e.g. 448² = 28×28 patches → 196 LLM tokens; 2048² is left out on CPU unless asked for);
GFLOP/s counts the ViT's matmuls
(2·params·patches plus attention's 4·N²·D per block, per image). The prefill row times
`Qwen35VL.hidden` on one prompt of `--prompt-text` text tokens around one `--prefill-size`²
image (ViT + merge + mRoPE + every text layer). Medians of `--repeats` runs after warm-up (the
first call compiles). Results go to `--out` as JSON lines, and a table is printed.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import timed, utc_stamp, write_results
from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.vision import config as vision_config
from qwenjax.vision.config import VisionConfig


def model_config(name: str) -> ModelConfig:
    """The text model plus its vision tower: the published 27B, or a tiny one for CPUs."""
    if name == "27b":
        return ModelConfig.from_preset("qwen3_6_27b").replace(vision=vision_config.qwen3_6_27b())
    text = ModelConfig.from_preset("tiny")
    ids = range(text.vocab_size - 4, text.vocab_size)
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    vision = VisionConfig(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=text.hidden_size,
        **dict(zip(keys, ids, strict=True)),
    )
    return text.replace(vision=vision)


def random_model(config: ModelConfig, dtype: jnp.dtype) -> nnx.Module:
    """A `Qwen35VL` with N(0, 0.02) weights drawn on the host (an eager `build` compiles every
    initialiser op, which is slower than the whole benchmark on a CPU)."""
    graphdef, state = nnx.split(build(config, dtype=dtype, abstract=True, vision=True))
    rng = np.random.default_rng(0)
    draw = lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32), x.dtype)
    return nnx.merge(graphdef, jax.tree.map(draw, state))


def image_inputs(vision: VisionConfig, side: int, batch: int) -> tuple[jax.Array, jax.Array]:
    """`pixel_values [batch·(side/p)², C·Tp·p·p]` and `grid_thw [batch, 3]` of square images."""
    n = side // vision.patch_size
    grid = np.tile([1, n, n], (batch, 1)).astype(np.int32)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((batch * n * n, vision.patch_dim)).astype(np.float32)
    return jnp.asarray(pixels), jnp.asarray(grid)


def vit_flops(vision: VisionConfig, patches_per_image: int) -> float:
    """Matmul FLOPs of one image through the ViT (blocks, patch embedding, merger)."""
    d, f, n = vision.hidden_size, vision.intermediate_size, patches_per_image
    block = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
    merger = (
        2
        * (n // vision.merge_unit)
        * (
            vision.merge_unit * d * vision.merge_unit * d
            + vision.merge_unit * d * vision.out_hidden_size
        )
    )
    return vision.depth * block + 2 * n * vision.patch_dim * d + merger


def bench_vit(model, sides, batch: int, repeats: int) -> list[dict]:
    vision = model.config.vision
    encode = nnx.jit(lambda m, p, g: m.visual(p, g))
    rows = []
    for side in sides:
        pixels, grid = image_inputs(vision, side, batch)
        seconds = timed(encode, (model, pixels, grid), repeats)
        patches = (side // vision.patch_size) ** 2
        rows.append(
            dict(
                what="vit",
                size=f"{side}x{side}",
                batch=batch,
                patches=patches * batch,
                llm_tokens=patches * batch // vision.merge_unit,
                ms=seconds * 1e3,
                images_per_s=batch / seconds,
                gflops_per_s=batch * vit_flops(vision, patches) / seconds / 1e9,
            )
        )
        print(rows[-1], flush=True)
    return rows


def bench_prefill(model, side: int, text_tokens: int, repeats: int) -> dict:
    vision = model.config.vision
    pixels, grid = image_inputs(vision, side, 1)
    pads = int(np.prod(grid[0])) // vision.merge_unit
    text = np.random.default_rng(1).integers(3, vision.image_token_id - 8, text_tokens)
    half = text_tokens // 2
    ids = np.concatenate(
        [
            text[:half],
            [vision.vision_start_token_id],
            [vision.image_token_id] * pads,
            [vision.vision_end_token_id],
            text[half:],
        ]
    )[None].astype(np.int32)
    hidden = nnx.jit(lambda m, i, p, g: m.hidden(i, pixel_values=p, image_grid_thw=g))
    seconds = timed(hidden, (model, jnp.asarray(ids), pixels, grid), repeats)
    row = dict(
        what="prefill",
        size=f"{side}x{side}",
        batch=1,
        prompt_tokens=ids.shape[1],
        llm_tokens=pads,
        ms=seconds * 1e3,
        tokens_per_s=ids.shape[1] / seconds,
    )
    print(row, flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| what | size | batch | tokens | ms (median) | images/s | prompt tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r['images_per_s']:.2f}" if "images_per_s" in r else "–"
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "–"
        tokens = r.get("prompt_tokens", r["llm_tokens"])
        lines.append(
            f"| {r['what']} | {r['size']} | {r['batch']} | {tokens} | {r['ms']:.1f} | {rate} "
            f"| {tps} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "27b"], default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", help="default 448 1024 2048 (CPU: 448 1024)")
    p.add_argument("--batch", type=int, default=1, help="images per ViT call")
    p.add_argument("--prefill-size", type=int, default=448)
    p.add_argument("--prompt-text", type=int, default=64, help="text tokens of the prompt")
    p.add_argument("--no-prefill", action="store_true", help="time the ViT only")
    p.add_argument("--dtype", default=None, help="default: float32 for tiny, bfloat16 for 27b")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    dtype = jnp.dtype(args.dtype or ("float32" if args.model == "tiny" else "bfloat16"))
    device = jax.devices()[0]
    stamp = utc_stamp()
    print(f"{device.device_kind}, jax {jax.__version__}, {stamp}, {args.model}, {dtype}")
    # On CPUs attention within an image is dense: 2048² (16,384 patches) takes ~25 s a call.
    sizes = args.sizes or ([448, 1024] if device.platform == "cpu" else [448, 1024, 2048])
    config = model_config(args.model)
    side_unit = config.vision.patch_size * config.vision.spatial_merge_size
    bad = [s for s in [*sizes, args.prefill_size] if s % side_unit]
    if bad:
        p.error(f"image sides must be multiples of {side_unit} (patch x merge); got {bad}")
    model = random_model(config, dtype)
    rows = bench_vit(model, sizes, args.batch, args.repeats)
    if not args.no_prefill:
        rows.append(bench_prefill(model, args.prefill_size, args.prompt_text, args.repeats))
    meta = dict(device=device.device_kind, model=args.model, dtype=dtype.name, jax=jax.__version__)
    write_results(args.out, f"vision_{args.model}", stamp, rows, meta=meta, table=table(rows))


if __name__ == "__main__":
    main()
