"""Tokenizer: tokenizer.json and SentencePiece round trips, special tokens, stop/pad ids, masks
from character spans, checkpoint-directory loading and its errors, chat-template dispatch."""

from __future__ import annotations

import io
import json

import pytest

from qwenjax.chat import QWEN3_6_CHAT_TEMPLATE, render, render_with_spans
from qwenjax.testing.tiny_data import QWEN_ADDED_TOKENS, load_tiny_tokenizer, save_tiny_tokenizer
from qwenjax.tokenizer import Tokenizer

CHAT = [
    {"role": "user", "content": "Ça va? 你好 🙂"},
    {"role": "assistant", "content": "Très bien.", "reasoning_content": "réponds"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


def test_tiny_round_trip_and_special_tokens(tiny):
    assert tiny.vocab_size == 256 + len(QWEN_ADDED_TOKENS)
    text = "<|im_start|>user\nhé 🙂<think>x</think><tool_call><|im_end|>\n<|endoftext|>"
    ids = tiny.encode(text)
    assert tiny.decode(ids) == text
    im_start, im_end = tiny.token_to_id("<|im_start|>"), tiny.token_to_id("<|im_end|>")
    assert (im_start, im_end) == (257, 258)
    assert ids[0] == im_start  # no BOS is added, and specials are single tokens
    assert ids.count(tiny.token_to_id("<think>")) == 1
    assert len(ids) == len(text.encode()) - sum(
        len(t.encode()) - 1
        for t in (
            "<|im_start|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "<|im_end|>",
            "<|endoftext|>",
        )
    )
    # Specials are dropped on request; <think> and <tool_call> are added but not special in Qwen.
    assert tiny.decode(ids, skip_special_tokens=True) == "user\nhé 🙂<think>x</think><tool_call>\n"
    assert tiny.id_to_token(im_end) == "<|im_end|>"
    assert tiny.token_to_id("<|not_a_token|>") is None


def test_stop_and_pad_ids(tiny):
    assert tiny.eos_token_ids == (tiny.token_to_id("<|im_end|>"), tiny.token_to_id("<|endoftext|>"))
    assert tiny.pad_id == tiny.token_to_id("<|endoftext|>")
    assert tiny.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_encode_with_mask_marks_exactly_the_span_tokens(tiny):
    text, spans = render_with_spans(CHAT)
    ids, mask = tiny.encode_with_mask(text, spans)
    assert ids == tiny.encode(text)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tiny.decode(masked) == "".join(text[a:b] for a, b in spans)
    assert tiny.decode(masked).startswith("<think>\nréponds") and masked[-1] == tiny.token_to_id(
        "<|im_end|>"
    )


def test_from_dir_reads_template_files_and_generation_config(tmp_path):
    save_tiny_tokenizer(tmp_path)
    assert Tokenizer.from_dir(tmp_path).chat_template == QWEN3_6_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 258]}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.apply_chat_template(CHAT) == "Ça va? 你好 🙂!"
    assert tokenizer.eos_token_ids == (258, 7, 256)


def test_chat_template_dispatch_and_thinking_flags(tiny):
    assert tiny.apply_chat_template(CHAT, enable_thinking=False) == render(
        CHAT, enable_thinking=False
    )
    builtin = Tokenizer(tiny._backend)
    assert builtin.chat_template is None
    assert builtin.apply_chat_template(CHAT, preserve_thinking=True) == render(
        CHAT, preserve_thinking=True
    )
    # Unset flags stay undefined for a Jinja template, as with transformers.
    probe = Tokenizer(
        tiny._backend, chat_template="{{ enable_thinking is defined }},{{ eos_token }}"
    )
    probe.special_tokens["eos_token"] = "<|im_end|>"
    assert probe.apply_chat_template(CHAT) == "False,<|im_end|>"
    assert probe.apply_chat_template(CHAT, enable_thinking=True) == "True,<|im_end|>"
    named = Tokenizer(tiny._backend, chat_template={"default": "d", "tool_use": "t"})
    assert (named.apply_chat_template(CHAT), named.apply_chat_template(CHAT, [{}])) == ("d", "t")


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json .* or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    import sentencepiece as spm

    lines = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*lines, "héllo wörld"]),
        model_writer=model,
        vocab_size=70,
        model_type="bpe",
        character_coverage=1.0,
        user_defined_symbols=["<think>", "</think>"],
        control_symbols=["<|im_start|>", "<|im_end|>"],
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sentencepiece")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"70": {"content": "<|endoftext|>", "special": True}},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_sentencepiece_round_trip_and_special_tokens(sentencepiece_dir):
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    assert tokenizer.vocab_size == 71
    text = "<|im_start|>the lazy fox<think>héllo</think><|im_end|><|endoftext|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids[-1] == 70
    assert tokenizer.eos_token_ids == (tokenizer.token_to_id("<|im_end|>"), 70)
    assert tokenizer.pad_id == 70
    # Control pieces and special added tokens are skippable; user-defined pieces are kept.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the lazy fox<think>héllo</think>"
    spans = [(text.index("<think>"), text.index("<|im_end|>") + len("<|im_end|>"))]
    ids, mask = tokenizer.encode_with_mask(text, spans)
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(masked) == "<think>héllo</think><|im_end|>"
    assert Tokenizer.from_file(sentencepiece_dir / "tokenizer.model").encode(
        "fox"
    ) == tokenizer.encode("fox")
