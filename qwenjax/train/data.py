"""The training data pipeline: JSON records -> token ids and loss masks -> packed batches.

Stages, all grain datasets so that the whole pipeline checkpoints through `get_state()`:

1. records: the lines of JSONL files (or ArrayRecord records), one JSON document each, either
   `{"text": ...}` or `{"messages": [...], "tools": [...]}` (detected per record);
2. this host's share (`records[shard_index::shard_count]`: hosts that feed the same batch rows
   share a shard, see `sharding.data_shards`), a global shuffle by `seed` that is reseeded every
   epoch, and the epochs (or endless repetition);
3. tokenisation: text documents end with `<|endoftext|>`; chat documents are rendered in the
   built-in Qwen3.6 format and masked to the assistant turns (`qwenjax.chat.render_with_spans`);
4. documents longer than `seq_len` are split into `seq_len`-token pieces, each packed as its own
   document (positions restart at 0, and the first token of each piece is not a target, since
   its predecessor is in another row);
5. first-fit packing into `seq_len` rows (grain's `FirstFitPackIterDataset`), which gives each
   document a segment id (1, 2, ... within a row; 0 is padding) and positions from 0, and never
   splits a document across rows; with `pack=False` each row holds one document;
6. batches of `batch_size` rows.

With a `Processor` and the model's `VisionConfig` (a `Qwen35VL`), chat records may hold images
and videos (`qwenjax.train.vision_data`): their pads are expanded as `chat_inputs` does, each
such document is packed whole (one longer than `seq_len` is dropped with a warning), and batches
add `pixel_values` / `image_grid_thw` (and the video pair) in token order, padded to a multiple
of `patch_bucket` patches, while `positions` become the 3-D mRoPE positions `[3, B, T]`,
restarting at 0 for every document of a row.

`loss_mask[b, t]` is 1 when token t is a target, i.e. when predicting it from token t-1 counts:
it is 0 at the first token of every document and on padding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import Literal

import grain
import numpy as np

from qwenjax import chat
from qwenjax.tokenizer import Tokenizer
from qwenjax.train.loss import VISION_KEYS
from qwenjax.train.sources import open_records
from qwenjax.train.vision_data import (
    collate_vision,
    drop_long,
    expand_document,
    is_vision_document,
    with_mrope,
)
from qwenjax.vision.config import VisionConfig
from qwenjax.vision.processor import Processor, extract_media

FEATURES = ("input_ids", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it.

    Attributes:
        paths: Files or glob patterns: JSONL, or ArrayRecord (`.array_record`) of JSON documents.
        seq_len: Tokens per row.
        batch_size: Rows per batch on this host; the global batch is batch_size × the number
            of data shards: one per host, except that hosts splitting the same rows over the
            sequence (or tensor) axis read the same rows (`sharding.data_shards`).
        seed: Seed of the record shuffle and of the row order within a packed batch.
        shuffle: Shuffle records (reshuffled every epoch) and packed rows.
        num_epochs: Passes over the data; None repeats forever (stop by step count; the way to
            keep hosts in step, since hosts' shares pack into different numbers of rows).
        pack: Pack several documents per row; False gives one (padded) document per row.
        format: "auto" detects each record ({"text"} or {"messages"}); "text" or "chat" requires
            every record to be of that kind.
        loss_on: "assistant" trains chat documents on the assistant turns only; "all" trains on
            every token. Text documents always train on every token.
        preserve_thinking: Render chat documents with every assistant turn's reasoning (and train
            on all of those turns), as the `preserve_thinking` chat-template flag does.
        drop_remainder: Drop a last incomplete batch; otherwise it is filled with padding rows.
        patch_bucket: Image (video) patches per batch are padded to a multiple of this, so the
            jitted step compiles once per bucket size and not every step; a multiple of merge².
    """

    paths: str | Sequence[str]
    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    pack: bool = True
    format: Literal["auto", "text", "chat"] = "auto"
    loss_on: Literal["assistant", "all"] = "assistant"
    preserve_thinking: bool = False
    drop_remainder: bool = True
    patch_bucket: int = 1024

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {self}")
        if self.format not in ("auto", "text", "chat"):
            raise ValueError(f"format must be 'auto', 'text' or 'chat', got {self.format!r}")
        if self.loss_on not in ("assistant", "all"):
            raise ValueError(f"loss_on must be 'assistant' or 'all', got {self.loss_on!r}")
        if self.patch_bucket < 1:
            raise ValueError(f"patch_bucket must be >= 1, got {self.patch_bucket}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None or >= 1, got {self.num_epochs}")


class Tokenize(grain.transforms.Map):
    """A raw JSON record -> {"input_ids", "loss_mask"} int32 arrays of one document."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: DataConfig,
        processor: Processor | None = None,
        vision: VisionConfig | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.processor, self.vision = processor, vision
        self.end_of_text = tokenizer.token_to_id("<|endoftext|>")
        template = tokenizer.chat_template
        # A checkpoint template other than the built-in one is cross-checked on every record: the
        # loss masks come from the built-in renderer and are only right if the texts agree.
        self.check_template = template is not None and template != chat.QWEN3_6_CHAT_TEMPLATE

    def map(self, element: bytes | str | dict) -> dict[str, np.ndarray]:
        record = element if isinstance(element, dict) else json.loads(element)
        kind = "chat" if "messages" in record else "text" if "text" in record else None
        if kind is None:
            raise ValueError(f"a record needs a 'text' or 'messages' key, got {sorted(record)}")
        if self.config.format not in ("auto", kind):
            raise ValueError(f"expected a {self.config.format} record, got keys {sorted(record)}")
        if kind == "text":
            ids = self.tokenizer.encode(record["text"])
            ids += [self.end_of_text] if self.end_of_text is not None else []
            mask = [1] * len(ids)
        else:
            messages, media = extract_media(record["messages"])
            ids, mask = self._chat(messages, record.get("tools"))
            if self.config.loss_on == "all":
                mask = [1] * len(ids)
            if media:
                if self.vision is None:
                    raise ValueError("a record holds images or videos: pass processor and vision")
                tok, proc = self.tokenizer, self.processor
                doc = expand_document(ids, mask, media, tok, proc, self.vision)
                doc["loss_mask"][0] = 0
                return with_mrope(doc, self.vision)
        if mask:
            mask[0] = 0  # the first token of a document has no predecessor
        doc = {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
        return doc if self.vision is None else with_mrope(doc, self.vision)

    def _chat(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
        preserve = self.config.preserve_thinking
        text, spans = chat.render_with_spans(messages, tools, preserve_thinking=preserve)
        if self.check_template:
            theirs = self.tokenizer.apply_chat_template(
                messages, tools, add_generation_prompt=False, preserve_thinking=preserve or None
            )
            if theirs != text:
                raise ValueError(
                    "the checkpoint's chat template renders this conversation differently from "
                    "the built-in Qwen3.6 format, which SFT loss masks are computed with:\n"
                    f"built-in: {text!r}\ntemplate: {theirs!r}"
                )
        return self.tokenizer.encode_with_mask(text, spans)


class SplitLong(grain.experimental.FlatMapTransform):
    """Splits a document into pieces of at most `seq_len` tokens (none when it is empty)."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        if is_vision_document(element):
            return drop_long(element, self.seq_len)
        pieces = []
        for start in range(0, len(element["input_ids"]), self.seq_len):
            # (a text document's empty pixel entries stay as they are)
            piece = element | {
                k: v[..., start : start + self.seq_len]
                for k, v in element.items()
                if k in ("input_ids", "loss_mask", "mrope")
            }
            if "mrope" in piece:
                piece["mrope"] = piece["mrope"] - piece["mrope"][:, :1]  # restart at 0
            if start:
                piece["loss_mask"] = piece["loss_mask"].copy()
                piece["loss_mask"][0] = 0  # its predecessor is in another row
            pieces.append(piece)
        return pieces


def _stack_rows(
    rows: Sequence[dict[str, np.ndarray]],
    batch_size: int,
    pad_id: int,
    vision: VisionConfig | None = None,
    patch_bucket: int = 0,
) -> dict:
    """Stacks packed rows into a batch, adding padding rows to reach batch_size (and with
    `vision`, the mRoPE positions and the pixels of `vision_data.collate_vision`)."""
    batch = {
        "input_ids": np.stack([r["input_ids"] for r in rows]),
        "segment_ids": np.stack([r["input_ids_segment_ids"] for r in rows]),
        "positions": np.stack([r["input_ids_positions"] for r in rows]),
        "loss_mask": np.stack([r["loss_mask"] for r in rows]),
    }
    missing = batch_size - len(rows)
    if missing:
        fill = {"input_ids": pad_id, "segment_ids": 0, "positions": 0, "loss_mask": 0}
        batch = {
            k: np.pad(v, ((0, missing), (0, 0)), constant_values=fill[k]) for k, v in batch.items()
        }
    batch = {k: v.astype(np.int32) for k, v in batch.items()}
    if vision is None:
        return batch
    seq_len, merge = batch["input_ids"].shape[1], vision.spatial_merge_size
    return batch | collate_vision(rows, seq_len, batch_size, patch_bucket, merge)


def make_dataset(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    processor: Processor | None = None,
    vision: VisionConfig | None = None,
) -> grain.IterDataset:
    """Builds this host's pipeline of packed batches.

    Args:
        config: Data settings.
        tokenizer: Tokenizer of the model being trained.
        shard_index: This host's data shard (`sharding.data_shards`; the process index when
            every host feeds rows of its own).
        shard_count: Number of data shards; shard i gets every `shard_count`-th record from
            record i, so shards see disjoint records and hosts of one shard the same ones.
        processor: Image / video preprocessing (`Processor.from_dir(checkpoint)`); with
            `vision`, chat records may hold images and videos.
        vision: The model's `config.vision` (token ids, merge size): batches then carry mRoPE
            positions `[3, B, T]` and, when they hold images or videos, their pixel inputs.

    Returns:
        A grain IterDataset; `iter(ds)` yields dicts of int32 numpy arrays
        `input_ids, segment_ids, positions, loss_mask`, each [batch_size, seq_len], and the
        iterator's `get_state()` / `set_state()` resume it exactly. With `vision`, `positions`
        is `[3, batch_size, seq_len]` and the `VISION_KEYS` present are added.
    """
    if vision is not None and config.patch_bucket % vision.merge_unit:
        raise ValueError(
            f"patch_bucket {config.patch_bucket}: not a multiple of merge² {vision.merge_unit}"
        )
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    records = open_records(config.paths)[shard_index::shard_count]
    if len(records) == 0:
        raise ValueError(
            f"no records for data shard {shard_index} of {shard_count} in {config.paths}"
        )
    if config.shuffle:
        records = records.shuffle(seed=config.seed)
    tokenize = Tokenize(tokenizer, config, processor or Processor(), vision)
    docs = records.repeat(config.num_epochs).map(tokenize).to_iter_dataset()
    docs = grain.experimental.FlatMapIterDataset(docs, SplitLong(config.seq_len))
    rows = grain.experimental.FirstFitPackIterDataset(
        docs,
        length_struct={"input_ids": config.seq_len, "loss_mask": config.seq_len},
        num_packing_bins=config.batch_size,
        seed=config.seed,
        shuffle_bins=config.shuffle,
        meta_features=("loss_mask",) + (() if vision is None else ("mrope", *VISION_KEYS)),
        padding_struct={"input_ids": tokenizer.pad_id, "loss_mask": 0},
        max_sequences_per_bin=None if config.pack else 1,
    )
    return rows.batch(
        config.batch_size,
        drop_remainder=config.drop_remainder,
        batch_fn=functools.partial(
            _stack_rows,
            batch_size=config.batch_size,
            pad_id=tokenizer.pad_id,
            vision=vision,
            patch_bucket=config.patch_bucket,
        ),
    )
