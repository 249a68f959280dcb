"""The data pipeline: packing correctness, loss masks, shuffling, host sharding, exact resume."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from qwenjax.testing.tiny_data import load_tiny_tokenizer, sort_examples
from qwenjax.tokenizer import Tokenizer
from qwenjax.train.data import DataConfig, SplitLong, Tokenize, make_dataset

SEQ_LEN = 64


def _records() -> list[dict]:
    """Chat and text documents, all distinct; some text ones longer than SEQ_LEN tokens."""
    records = sort_examples(24, seed=3)
    records += [{"text": f"doc {i} " + "ab" * (7 * i)} for i in range(12)]
    records += [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": "hello", "reasoning_content": "r"},
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"name": "w", "arguments": {"d": i}}],
                },
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."},
            ],
            "tools": [{"type": "function", "function": {"name": "w"}}],
        }
        for i in range(4)
    ]
    return records


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    # Blank lines and CRLF line ends are tolerated.
    path.write_text("\n".join(json.dumps(r) for r in _records()) + "\r\n\n", newline="")
    return path


def _config(path, **overrides) -> DataConfig:
    settings = {"seq_len": SEQ_LEN, "batch_size": 4, "seed": 0, "drop_remainder": False}
    return DataConfig(paths=str(path), **{**settings, **overrides})


def _take(config, tokenizer, n=None, **kwargs) -> list[dict]:
    it = iter(make_dataset(config, tokenizer, **kwargs))
    return list(it) if n is None else [next(it) for _ in range(n)]


def _segments(batches, pad_id) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(ids, loss_mask) of every packed document, checking the row layout on the way."""
    out = []
    for batch in batches:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            k: ((4, SEQ_LEN), np.int32)
            for k in ("input_ids", "segment_ids", "positions", "loss_mask")
        }
        for ids, seg, pos, mask in zip(
            *(batch[k] for k in ("input_ids", "segment_ids", "positions", "loss_mask")), strict=True
        ):
            used = int(np.count_nonzero(seg))
            assert (
                np.all(seg[used:] == 0) and np.all(ids[used:] == pad_id) and not mask[used:].any()
            )
            if not used:
                continue
            bounds = np.flatnonzero(np.diff(seg[:used], prepend=0))
            assert list(seg[bounds]) == list(range(1, len(bounds) + 1))  # ids 1, 2, ... in a row
            for start, end in zip(bounds, [*bounds[1:], used], strict=True):
                assert list(pos[start:end]) == list(range(end - start))  # positions restart per doc
                assert mask[start] == 0  # a document's first token is never a target
                out.append((tuple(ids[start:end]), tuple(mask[start:end])))
    return out


def _expected_pieces(records, tokenizer, config) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    tokenize, split = Tokenize(tokenizer, config), SplitLong(config.seq_len)
    pieces = [p for r in records for p in split.flat_map(tokenize.map(json.dumps(r)))]
    return [(tuple(p["input_ids"]), tuple(p["loss_mask"])) for p in pieces]


def test_every_token_is_packed_once_with_its_loss_mask(tokenizer, data_path):
    config = _config(data_path)
    segments = _segments(_take(config, tokenizer), tokenizer.pad_id)
    expected = _expected_pieces(_records(), tokenizer, config)
    # Each packed segment is a whole document (or a whole piece of a split one): none is cut
    # across rows, none is lost or duplicated.
    assert collections.Counter(segments) == collections.Counter(expected)
    assert len(expected) > len(_records())  # some documents were split


def test_documents_longer_than_seq_len_are_split(tokenizer):
    config = DataConfig(paths="unused", seq_len=SEQ_LEN)
    doc = Tokenize(tokenizer, config).map(json.dumps({"text": "x" * 150}))
    assert list(doc["input_ids"][-1:]) == [tokenizer.token_to_id("<|endoftext|>")]
    pieces = SplitLong(SEQ_LEN).flat_map(doc)
    assert [len(p["input_ids"]) for p in pieces] == [64, 64, 23]
    assert np.array_equal(np.concatenate([p["input_ids"] for p in pieces]), doc["input_ids"])
    # Text trains on every token except the first of each piece (its context is in another row).
    assert [list(p["loss_mask"]).count(0) for p in pieces] == [1, 1, 1]
    assert [p["loss_mask"][0] for p in pieces] == [0, 0, 0]


def test_chat_loss_mask_covers_trained_assistant_turns(tokenizer):
    record = json.dumps(_records()[-1])
    for loss_on, expected in [
        (
            "assistant",
            "<tool_call>\n<function=w>\n<parameter=d>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>"
            "<think>\n\n</think>\n\nSunny.<|im_end|>",
        ),
        ("all", None),
    ]:
        doc = Tokenize(tokenizer, DataConfig(paths="unused", loss_on=loss_on)).map(record)
        ids, mask = doc["input_ids"], doc["loss_mask"].astype(bool)
        if expected is None:
            assert not mask[0] and mask[1:].all()
        else:  # the turn before the last query is context; the agent turns after it are trained
            assert tokenizer.decode(ids[mask]) == "<think>\n\n</think>\n\n" + expected


def test_shuffle_is_deterministic_in_the_seed(tokenizer, data_path):
    first = _take(_config(data_path), tokenizer, 3)
    again = _take(_config(data_path), tokenizer, 3)
    other = _take(_config(data_path, seed=1), tokenizer, 3)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    assert not all(
        np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other, strict=True)
    )
    ordered = _segments(_take(_config(data_path, shuffle=False), tokenizer, 1), tokenizer.pad_id)
    assert ordered[0] == _expected_pieces(_records()[:1], tokenizer, _config(data_path))[0]


def test_pack_false_puts_one_document_per_row(tokenizer, data_path):
    batches = _take(_config(data_path, pack=False), tokenizer)
    assert all(b["segment_ids"].max(axis=1).max() <= 1 for b in batches)
    segments = _segments(batches, tokenizer.pad_id)
    assert collections.Counter(segments) == collections.Counter(
        _expected_pieces(_records(), tokenizer, _config(data_path))
    )


def test_hosts_read_disjoint_records_covering_the_data(tokenizer, tmp_path):
    # Records short enough not to be split, so each packed document identifies its record.
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sort_examples(30, seed=4)))
    config = _config(path)
    single = collections.Counter(_segments(_take(config, tokenizer), tokenizer.pad_id))
    hosts = [
        collections.Counter(
            _segments(_take(config, tokenizer, shard_index=i, shard_count=2), tokenizer.pad_id)
        )
        for i in range(2)
    ]
    assert len(single) == 30 and set(single.values()) == {1}
    assert not set(hosts[0]) & set(hosts[1])
    assert hosts[0] + hosts[1] == single
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(config, tokenizer, shard_index=2, shard_count=2)


@pytest.mark.parametrize("num_epochs", [1, None])
def test_iterator_state_resumes_exactly(tokenizer, data_path, num_epochs):
    dataset = make_dataset(_config(data_path, num_epochs=num_epochs), tokenizer)
    it = iter(dataset)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # plain JSON: checkpointable anywhere
    # 28 batches make an epoch: when repeating, resume past the end of the first one.
    expected = [next(it) for _ in range(30 if num_epochs is None else 4)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_drop_remainder(tokenizer, data_path):
    kept = _take(_config(data_path), tokenizer)
    dropped = _take(_config(data_path, drop_remainder=True), tokenizer)
    assert len(dropped) == len(kept) - 1
    assert (kept[-1]["segment_ids"][-1] == 0).all()  # the last batch is filled with padding rows
    assert all((b["segment_ids"][:, 0] == 1).all() for b in dropped)


def test_array_record_files_and_globs(tokenizer, data_path, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "part.array_record"), "group_size:1")
    for record in _records()[:10]:
        writer.write(json.dumps(record).encode())
    writer.close()
    config = _config(tmp_path / "*.array_record")
    segments = _segments(_take(config, tokenizer), tokenizer.pad_id)
    assert collections.Counter(segments) == collections.Counter(
        _expected_pieces(_records()[:10], tokenizer, config)
    )


def test_bad_inputs_raise(tokenizer, data_path, tmp_path):
    with pytest.raises(ValueError, match="expected a text record"):
        _take(_config(data_path, format="text", shuffle=False), tokenizer, 1)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="'text' or 'messages'"):
        _take(_config(tmp_path / "bad.jsonl"), tokenizer, 1)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        make_dataset(_config(tmp_path / "*.parquet"), tokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(_config(tmp_path / "missing.jsonl"), tokenizer)
    with pytest.raises(ValueError, match="loss_on"):
        _config(data_path, loss_on="user")


def test_checkpoint_template_that_disagrees_is_refused(tokenizer, data_path):
    other = Tokenizer(
        tokenizer._backend, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="renders this conversation differently"):
        _take(_config(data_path, format="chat", shuffle=False), other, 1)
