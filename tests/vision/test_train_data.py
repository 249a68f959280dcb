"""Fine-tuning data with images: chat JSONL → packed batches with pixels and mRoPE positions.

(a) every document of a batch equals `chat_inputs` (ids, pixel_values, grids), trains only on its
assistant reply, and has `get_rope_index` positions of its own; (b) two image documents packed
in one row give the loss of the same documents each in its own row; (c) one step through the
train-step API on a pipeline batch has transformers' loss, and `train_vision` moves the tower;
an image document longer than a row is dropped with a warning; the run-config switch parses.
"""

from __future__ import annotations

import base64
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax import sharding as ax
from qwenjax.checkpoint import load
from qwenjax.inference.text import chat_inputs
from qwenjax.runconfig import RunConfigError, from_dict
from qwenjax.tokenizer import Tokenizer
from qwenjax.train.data import DataConfig, make_dataset
from qwenjax.train.loop import ModelSection, _global_batch
from qwenjax.train.loss import loss_fn
from qwenjax.train.optim import OptimConfig
from qwenjax.train.step import init_train_state, jit_train_step, make_train_step
from qwenjax.vision.processor import Processor
from qwenjax.vision.rope_index import get_rope_index
from tests.vision.conftest import CHAT_TOKENS, make_vlm, tokenizer_id
from tests.vision.test_chat_inputs import write_image

SEQ = 96


def conversations(tmp_path) -> list[dict]:
    """Two image conversations (a path; a data: URL and a second path) and a text one."""
    a = write_image(tmp_path / "a.png", 40, 70, seed=1)
    write_image(tmp_path / "b.png", 64, 33, seed=2)
    c = write_image(tmp_path / "c.png", 50, 50, seed=3)
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "b.png").read_bytes()).decode()
    image = lambda src: {"type": "image_url", "image_url": {"url": src}}
    text = lambda s: {"type": "text", "text": s}
    return [
        {
            "messages": [
                {"role": "user", "content": [image(a), text("what is it?")]},
                {"role": "assistant", "content": "a cat"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [text("compare"), image(url), image(c)]},
                {"role": "assistant", "content": "same"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"},
            ]
        },
    ]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def setup(chat_vlm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision_data")
    records = conversations(tmp)
    tokenizer, processor = Tokenizer.from_dir(chat_vlm), Processor.from_dir(chat_vlm)
    model = load(chat_vlm, vision=True)
    return tmp, records, tokenizer, processor, model


def first_batch(setup, records, name: str, **config) -> dict:
    tmp, _, tokenizer, processor, model = setup
    config = {"seq_len": SEQ, "shuffle": False} | config
    config = DataConfig(write_jsonl(tmp / name, records), **config)
    ds = make_dataset(config, tokenizer, processor=processor, vision=model.config.vision)
    return next(iter(ds))


def test_documents_equal_chat_inputs(setup):
    _, records, tokenizer, processor, model = setup
    batch = first_batch(setup, records, "one_per_row.jsonl", batch_size=3, pack=False)
    assert batch["positions"].shape == (3, 3, SEQ)
    grids = iter(batch["image_grid_thw"])
    offset = 0
    for record in records:
        ids, inputs = chat_inputs(tokenizer, record["messages"], processor=processor)
        prompt, _ = chat_inputs(tokenizer, record["messages"][:-1], processor=processor)
        row = next(b for b in range(3) if batch["input_ids"][b, : len(prompt)].tolist() == prompt)
        n = int((batch["segment_ids"][row] == 1).sum())
        # The training document is the full conversation: chat_inputs' ids minus the final
        # generation prompt it appends.
        assert batch["input_ids"][row, :n].tolist() == ids[:n]
        assert tokenizer.decode(ids[n:], skip_special_tokens=False).startswith("<|im_start|>")
        mask = batch["loss_mask"][row, :n]
        trained = batch["input_ids"][row, :n][mask == 1].tolist()
        reply = tokenizer.decode(trained, skip_special_tokens=False)
        assert reply == f"<think>\n\n</think>\n\n{record['messages'][-1]['content']}<|im_end|>"
        assert np.all(np.diff(np.flatnonzero(mask)) == 1)  # one span: the assistant turn
        want = np.asarray(
            get_rope_index(
                np.asarray([ids[:n]]),
                model.config.vision,
                None if inputs is None else inputs.image_grid_thw,
            )[0]
        )
        np.testing.assert_array_equal(batch["positions"][:, row, :n], want[:, 0])
        if inputs is not None:
            for g in inputs.image_grid_thw:
                np.testing.assert_array_equal(next(grids), g)
            k = len(inputs.pixel_values)
            got = batch["pixel_values"][offset : offset + k]
            np.testing.assert_array_equal(got, inputs.pixel_values)
            offset += k
    padding = batch["pixel_values"][offset:]
    assert len(batch["pixel_values"]) % 1024 == 0 and not padding.any()


def test_a_vision_document_longer_than_a_row_is_dropped(setup, caplog):
    _, records, tokenizer, _, _ = setup
    whole = first_batch(setup, records, "lengths.jsonl", batch_size=3, pack=False)
    lengths = sorted((whole["segment_ids"] == 1).sum(1).tolist())
    short = lengths[0]  # the text conversation fits, the image ones do not
    assert lengths[1] > short
    with caplog.at_level("WARNING"):
        batch = first_batch(setup, records, "long.jsonl", batch_size=1, pack=False, seq_len=short)
    assert "pixel_values" not in batch and batch["positions"].shape == (3, 1, short)
    assert "hello there" in tokenizer.decode(batch["input_ids"][0].tolist())
    assert caplog.text.count("dropping an image/video chat document") == 2


def test_packed_row_has_the_loss_of_its_documents_alone(setup):
    _, records, _, _, model = setup
    images = records[:2]
    packed = first_batch(setup, images, "packed.jsonl", batch_size=1, patch_bucket=64)
    assert packed["segment_ids"].max() == 2  # both documents in the one row
    alone = first_batch(setup, images, "alone.jsonl", batch_size=2, pack=False, patch_bucket=64)
    run = nnx.jit(lambda m, b: loss_fn(m, b, mtp_weight=0.1, ce_chunk=16))
    (loss, got), (want_loss, want) = run(model, packed)[:2], run(model, alone)[:2]
    assert int(got["tokens"]) == int(want["tokens"]) > 0
    for key in ("ce_loss", "mtp_loss"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)


def hf_loss(chat_vlm, batch, n_images: int) -> float:
    """transformers' loss on rows of one document each (right padding does not reach back)."""
    ids_of = {key: tokenizer_id(chat_vlm, token) for key, token in CHAT_TOKENS.items()}
    hf = make_vlm(seed=5, token_ids=ids_of)  # the chat_vlm checkpoint's model
    ids = batch["input_ids"].astype(np.int64)
    grids = batch["image_grid_thw"][:n_images]  # without the padding grids
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(ids),
            mm_token_type_ids=torch.from_numpy((ids == ids_of["image_token_id"]).astype(int)),
            labels=torch.from_numpy(np.where(batch["loss_mask"] == 1, ids, -100)),
            pixel_values=torch.from_numpy(batch["pixel_values"][: int(grids.prod(1).sum())]),
            image_grid_thw=torch.from_numpy(grids.astype(np.int64)),
        )
    return float(out.loss)


def test_train_step_on_pipeline_batch_with_train_vision(setup, chat_vlm):
    """(Frozen by default: tests/vision/test_train.py.)"""
    _, records, _, _, _ = setup
    batch = first_batch(setup, records[:2], "step.jsonl", batch_size=2, pack=False)
    want = hf_loss(chat_vlm, batch, n_images=3)
    model = load(chat_vlm, vision=True)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    mesh = ax.make_mesh(ax.MeshConfig(fsdp=1), devices=jax.devices()[:1])
    optim = OptimConfig(lr=1e-3, warmup_steps=1, total_steps=4)
    kw = dict(train_vision=True)
    state, shardings = init_train_state(model, optim, mesh, ax.FSDP_RULES, **kw)
    step = make_train_step(model, optim, mtp_weight=0.0, ce_chunk=16, **kw)
    step = jit_train_step(step, mesh, ax.FSDP_RULES, shardings)
    state, metrics = step(state, _global_batch(batch, 1, mesh, ax.FSDP_RULES, shards=1))
    got = float(metrics["loss"])  # the loss before the update
    print(f"loss {got:.6f} vs transformers {want:.6f}")
    assert abs(got - want) / want < 1e-5
    assert "visual" in state.params and "visual" not in state.frozen
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(np.asarray(a), b), state.params["visual"], before["visual"]
    )
    assert all(jax.tree.leaves(moved))


def test_run_config_switch():
    section = from_dict(ModelSection, {"checkpoint": "ckpt", "vision": True, "train_vision": True})
    assert section.train_vision and not ModelSection(checkpoint="ckpt").train_vision
    with pytest.raises(RunConfigError, match=r"train_vision needs model\.vision"):
        from_dict(ModelSection, {"checkpoint": "ckpt", "train_vision": True})
