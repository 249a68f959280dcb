"""What one compiled train step holds and sends between chips, for a TPU topology, from this CPU.

    python -m benchmarks.train_hlo --config configs/sft_27b_v5p.yaml --topology v5p:2x2x1 \
        data.seq_len=4096 data.batch_size=4
    python -m benchmarks.train_hlo --config configs/sft_27b_262k_v5p.yaml --topology v5p-64

A script, not a test, and not a timing: it compiles the run config's real train step (the one
`qwenjax plan` compiles) for the 27B geometry with `--blocks` of its 16 super-blocks (scanned, so
one block's body is what each block runs; the embedding, LM head and loss are whole), and lists
XLA's temporaries per chip and every collective (all-gather, all-reduce, reduce-scatter, ...)
whose result is at least `--min-mib`, grouped, with the source line JAX recorded for it. A
collective inside a loop body runs once per iteration, so where it sits is part of its cost.
Needs jax[tpu] (`ALLOW_MULTIPLE_LIBTPU_LOAD=1` beside another libtpu user). Results:
`{stamp}_{topology}-compile-only_train_hlo.*` under `--out`.
"""

from __future__ import annotations

import argparse
import collections
import re

import jax

from benchmarks.common import utc_stamp, write_results
from benchmarks.decode_hlo import large_writes
from qwenjax import plan as plan_mod
from qwenjax.config import ModelConfig
from qwenjax.runconfig import load_run_config

_PRESET = "qwen3.6-27b"
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _source(hlo: str, name: str) -> str:
    """The last three parts of the op_name JAX recorded for instruction `name`."""
    line = re.search(rf"%{re.escape(name)} = [^\n]*", hlo)
    op_name = re.search(r'op_name="([^"]*)"', line.group(0)) if line else None
    return "/".join(op_name.group(1).split("/")[-3:]) if op_name else ""


def compile_train(config: str, topology: str, blocks: int, overrides: list[str], min_mib: float):
    cfg = load_run_config(config, [*overrides, "model.checkpoint=null", f"model.preset={_PRESET}"])
    model = ModelConfig.from_preset(_PRESET)
    layers = blocks * (model.num_hidden_layers // model.num_blocks)
    model = model.replace(num_hidden_layers=layers, layer_types=model.layer_types[:layers])
    compiled = {}
    real = jax.stages.Lowered.compile

    def keep(self, *args, **kwargs):
        compiled["step"] = real(self, *args, **kwargs)
        return compiled["step"]

    jax.stages.Lowered.compile = keep
    try:
        report = plan_mod.plan(cfg, topology, model_config=model)
    finally:
        jax.stages.Lowered.compile = real
    hlo = compiled["step"].as_text()
    collectives = [
        dict(w, source=_source(hlo, w["name"]))
        for w in large_writes(hlo, int(min_mib * 2**20))
        if w["op"].startswith(_COLLECTIVES) or "all-reduce-scatter" in w["op"]
    ]
    return dict(
        config=config, topology=topology, blocks=blocks, overrides=overrides,
        temp_gib=report["temporaries_per_chip"] / 2**30,
        total_gib=report["total_per_chip"] / 2**30,
        compile_s=report["compile_seconds"], collectives=collectives,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="a run config (configs/*.yaml)")
    p.add_argument("--topology", required=True, help="e.g. v5p:2x2x1, v5p-64, v6e-16")
    p.add_argument("--blocks", type=int, default=2, help="super-blocks of the 27B (of 16)")
    p.add_argument("--min-mib", type=float, default=64)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("overrides", nargs="*", help="run config overrides, key=value")
    args = p.parse_args()
    stamp = utc_stamp()
    r = compile_train(args.config, args.topology, args.blocks, args.overrides, args.min_mib)
    lines = [
        f"# One train step compiled for {args.topology} (not timed), {stamp}, "
        f"jax {jax.__version__}",
        "",
        f"`{args.config}` {' '.join(args.overrides)}, the 27B geometry with {args.blocks} of its "
        f"16 super-blocks. Per chip: temporaries {r['temp_gib']:.2f} GiB, total "
        f"{r['total_gib']:.2f} GiB; compiled in {r['compile_s']:.0f} s. Collectives with a "
        f"result of at least {args.min_mib:.0f} MiB (a loop body's run once per iteration):",
        "",
        "| where | op | result | MiB each | count | source |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    groups = collections.Counter(
        (w["computation"], re.sub(r"\.\d+$|\.clone.*$", "", w["op"]), w["shape"],
         round(w["mib"]), w["source"])
        for w in r["collectives"]
    )  # fmt: skip
    lines += [
        f"| {where} | {op} | {shape} | {mib} | {n} | `{source}` |"
        for (where, op, shape, mib, source), n in sorted(groups.items())
    ]
    device = re.sub(r"[\s:=]+", "-", args.topology.lower()) + "-compile-only"
    meta = {"jax": jax.__version__, "topology": args.topology}
    table = "\n".join(lines)
    write_results(args.out, "train_hlo", stamp, [r], meta=meta, table=table, device=device)


if __name__ == "__main__":
    main()
