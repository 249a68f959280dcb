"""The fine-tuning loop: data → jitted step → metrics, checkpoints, evaluation, export.

model   = build(preset) or load(checkpoint) [+ LoRA]; remat policy set
state   = init_train_state(model, optim, mesh, rules)      sharded, fp32 master weights
resume  = latest complete checkpoint (state + data iterator), on whatever mesh this run has
loop    : batch = next(data) → state, metrics = step(state, batch)
          log every N steps, checkpoint every M, stop cleanly on SIGTERM (save, then exit)
end     : final checkpoint, held-out evaluation (eval.json), optional HF export
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from qwenjax import distributed, sharding
from qwenjax.api import add_lora, build_sharded, merge_lora
from qwenjax.checkpoint.convert import load, save_hf
from qwenjax.config import ModelConfig
from qwenjax.distributed import DistributedConfig
from qwenjax.kernels.choice import KernelChoice
from qwenjax.model import Qwen35
from qwenjax.model.transformer import REMAT_POLICIES
from qwenjax.tokenizer import Tokenizer
from qwenjax.train.checkpoints import CheckpointConfig, Checkpointer, StopRequested, abstract_like
from qwenjax.train.data import DataConfig, make_dataset
from qwenjax.train.evaluate import chat_exact_match, read_jsonl
from qwenjax.train.loss import VISION_KEYS
from qwenjax.train.metrics import MetricsLogger
from qwenjax.train.optim import OptimConfig
from qwenjax.train.step import (
    batch_shardings,
    init_train_state,
    jit_train_step,
    make_train_step,
    microbatches,
)
from qwenjax.vision.processor import Processor

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "tokenizer.model",
)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train: a preset (random init) or a checkpoint (HF or qwenjax)."""

    preset: str | None = None
    checkpoint: str | None = None
    dtype: str = "bfloat16"  # compute dtype; master weights and Adam moments are fp32
    remat: str = "full"
    lora_rank: int = 0
    lora_alpha: float | None = None
    rules: str = "fsdp"  # a key of sharding.RULES
    seed: int = 0
    vision: bool = False  # load the checkpoint's vision tower: chat data may hold images/videos
    train_vision: bool = False  # train the vision tower too (frozen by default)

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("model: give exactly one of preset or checkpoint")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat {self.remat!r}: choose from {sorted(REMAT_POLICIES)}")
        if self.rules not in sharding.RULES:
            raise ValueError(f"model.rules {self.rules!r}: choose from {sorted(sharding.RULES)}")
        if self.vision and self.checkpoint is None:
            raise ValueError("model.vision needs a VLM checkpoint (presets are text-only)")
        if self.train_vision and not self.vision:
            raise ValueError("model.train_vision needs model.vision: true")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Steps, loss weights, logging and evaluation."""

    steps: int = 1000
    grad_accum: int = 1
    mtp_weight: float = 0.1
    ce_chunk: int = 512
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_data: str | None = None  # chat JSONL; exact match of the final assistant turn
    eval_examples: int = 200
    eval_max_new_tokens: int = 16
    tokenizer: str | None = None  # directory with tokenizer.json (default: the checkpoint's)
    peak_flops_per_device: float | None = None  # for MFU; None: not reported
    export_hf: bool = False  # write the trained weights as HF safetensors to run_dir/hf


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole fine-tuning run (one YAML file, see configs/)."""

    run_dir: str
    model: ModelSection
    data: DataConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: sharding.MeshConfig = dataclasses.field(default_factory=sharding.MeshConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    kernels: KernelChoice = dataclasses.field(default_factory=KernelChoice)

    def __post_init__(self) -> None:
        if self.data.batch_size % self.train.grad_accum:
            raise ValueError(
                f"data.batch_size {self.data.batch_size} (rows per host) is not divisible by "
                f"train.grad_accum {self.train.grad_accum}: each host splits its own rows "
                "into the micro-batches"
            )


def _model(cfg: RunConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> Qwen35:
    """The model with every parameter already on its shards (never a whole copy on a device)."""
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    if m.preset is not None:
        config = ModelConfig.from_preset(m.preset)
        kw = dict(dtype=dtype, param_dtype=jnp.float32, seed=m.seed, remat=m.remat)
        model = build_sharded(config, mesh, rules, **kw)
        if m.lora_rank:
            model = add_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, seed=m.seed)
        return model
    model = load(m.checkpoint, dtype=dtype, mesh=mesh, rules=rules, vision=m.vision)
    model.remat = m.remat
    if m.lora_rank:
        model = add_lora(model, rank=m.lora_rank, alpha=m.lora_alpha, seed=m.seed)
    return model


def _tokenizer(cfg: RunConfig) -> Tokenizer:
    where = cfg.train.tokenizer or cfg.model.checkpoint
    if where is None:
        raise ValueError("train.tokenizer: a preset model needs a tokenizer directory")
    return Tokenizer.from_dir(where)


def _global_batch(
    batch: dict, k: int, mesh: jax.sharding.Mesh, rules: sharding.Rules, shards: int
) -> dict:
    """This host's rows → the global `[k, B/k, T]` arrays the step expects.

    The global batch holds `shards` times this host's rows (`sharding.data_shards`); every
    host gives its whole rows, and its devices take their token ranges from them.
    """
    local = microbatches(batch, k)
    shardings = batch_shardings(mesh, rules, local)
    out = {}
    for name, x in local.items():
        x = np.asarray(x)
        if name in VISION_KEYS:  # replicated
            out[name] = jax.make_array_from_process_local_data(shardings[name], x)
            continue
        rows = x.ndim - 2  # next to last: [k, B/k, T], mRoPE positions [k, 3, B/k, T]
        shape = (*x.shape[:rows], x.shape[rows] * shards, *x.shape[rows + 1 :])
        out[name] = jax.make_array_from_process_local_data(shardings[name], x, shape)
    return out


def _vision_data(cfg: RunConfig, config: ModelConfig) -> dict[str, Any]:
    """The data pipeline's image arguments: the checkpoint's processor and vision config."""
    if not cfg.model.vision:
        return {}
    return {"processor": Processor.from_dir(cfg.model.checkpoint), "vision": config.vision}


def evaluate(model_graphdef, state, cfg: RunConfig, tokenizer: Tokenizer) -> dict:
    """Exact match on the held-out chat records, with the current parameters."""
    records = read_jsonl(cfg.train.eval_data)[: cfg.train.eval_examples]
    model = nnx.merge(model_graphdef, state.params, state.frozen)
    return chat_exact_match(model, tokenizer, records, max_new_tokens=cfg.train.eval_max_new_tokens)


def _export(graphdef, state, cfg: RunConfig, dst: Path) -> Path:
    """The trained weights as a HF checkpoint, with the tokenizer files beside them."""
    model = nnx.merge(graphdef, state.params, state.frozen)
    save_hf(merge_lora(model) if cfg.model.lora_rank else model, dst, overwrite=True)
    source = Path(cfg.train.tokenizer or cfg.model.checkpoint)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dst / name)
    return dst


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) the fine-tuning job described by `cfg`; returns the final summary."""
    distributed.initialize(cfg.distributed)
    cfg.kernels.check_platform(jax.default_backend())
    with cfg.kernels.pinned():  # every step and evaluation program is traced in here
        return _train(cfg)


def _train(cfg: RunConfig) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    start = time.perf_counter()
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.RULES[cfg.model.rules]
    shard_index, shard_count = sharding.data_shards(mesh, rules)
    if cfg.model.vision and shard_count > 1:
        raise ValueError(
            "model.vision: image and video inputs are replicated to every device, so every "
            f"host must read the same rows, but this mesh splits the batch {shard_count} ways "
            "over hosts; keep the data and fsdp axes within a host"
        )
    tokenizer = _tokenizer(cfg)
    model = _model(cfg, mesh, rules)
    config = model.config
    train_vision = cfg.model.train_vision
    step_fn = make_train_step(
        model,
        cfg.optim,
        mtp_weight=cfg.train.mtp_weight,
        ce_chunk=cfg.train.ce_chunk,
        train_vision=train_vision,
    )
    graphdef = nnx.split(model, nnx.LoRAParam if cfg.model.lora_rank else nnx.Param, ...)[0]
    state, shardings = init_train_state(
        model, cfg.optim, mesh, rules, seed=cfg.model.seed, train_vision=train_vision
    )
    del model  # its buffers now belong to the state
    train_step = jit_train_step(step_fn, mesh, rules, shardings)

    data = iter(
        make_dataset(
            cfg.data,
            tokenizer,
            shard_index=shard_index,
            shard_count=shard_count,
            **_vision_data(cfg, config),
        )
    )
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    log = MetricsLogger(run_dir, cfg.train.steps)
    step = saved_at = 0
    if ckpt.latest_step() is not None:
        state, data_state, step = ckpt.restore(abstract_like(state))
        saved_at = step
        data.set_state(data_state)
        log.message(f"resumed from step {step} ({ckpt.directory})")
    if distributed.is_main_process():
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    stop = StopRequested()
    devices = jax.device_count()
    flops = config.flops_per_token(cfg.data.seq_len)
    tokens_in_window, window_start = 0, time.perf_counter()
    last_metrics: dict[str, float] = {}
    stopped_early = False
    while step < cfg.train.steps:
        try:
            batch = next(data)
        except StopIteration:
            log.message(f"data exhausted after {step} steps")
            break
        global_batch = _global_batch(batch, cfg.train.grad_accum, mesh, rules, shard_count)
        state, metrics = train_step(state, global_batch)
        step += 1
        if step == 1:  # keep compilation out of the throughput figures
            jax.block_until_ready(metrics)
            window_start = time.perf_counter()
        else:
            tokens_in_window += batch["input_ids"].size * shard_count
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - window_start
            if tokens_in_window:
                last_metrics["tokens_per_s"] = tokens_in_window / seconds
            if cfg.train.peak_flops_per_device and tokens_in_window:
                peak = cfg.train.peak_flops_per_device * devices
                last_metrics["mfu"] = last_metrics["tokens_per_s"] * flops / peak
            log.log(step, last_metrics)
            tokens_in_window, window_start = 0, time.perf_counter()
        if cfg.train.eval_every and cfg.train.eval_data and step % cfg.train.eval_every == 0:
            result = evaluate(graphdef, state, cfg, tokenizer)
            log.log(step, {"exact_match": result["exact_match"]}, prefix="eval")
        if ckpt.should_save(step):
            ckpt.save(step, state, data.get_state())
            saved_at = step
        # Every process must stop at the same step, since all of them write the checkpoint.
        if multihost_utils.process_allgather(np.array(stop.requested)).any():
            log.message(f"stop requested: saving step {step} and exiting")
            stopped_early = True
            break
    if saved_at != step:
        ckpt.save(step, state, data.get_state(), force=True)
    ckpt.close()
    stop.restore_handlers()
    summary: dict[str, Any] = {
        "step": step,
        "stopped_early": stopped_early,
        "train_seconds": round(time.perf_counter() - start, 1),
        "last_metrics": last_metrics,
    }
    if not stopped_early and cfg.train.eval_data:
        result = evaluate(graphdef, state, cfg, tokenizer)
        summary["eval"] = result
        log.log(step, {"exact_match": result["exact_match"]}, prefix="eval")
        if distributed.is_main_process():
            (run_dir / "eval.json").write_text(json.dumps(result | {"step": step}, indent=2))
    if not stopped_early and cfg.train.export_hf and distributed.is_main_process():
        summary["hf_export"] = str(_export(graphdef, state, cfg, run_dir / "hf"))
    log.close()
    return summary
