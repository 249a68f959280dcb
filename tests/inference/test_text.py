"""The text layer without a model: stop strings and incremental detokenization.

The tiny byte-level tokenizer makes every byte a token, so multi-byte UTF-8 characters arrive
one byte at a time, the hard case for streaming. The reference for every streamed text is
`Tokenizer.decode` of all the ids at once.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwenjax.inference.text import TextDecoder, find_stop, partial_stop_length
from qwenjax.testing.tiny_data import load_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def run(tok, ids, **kwargs) -> tuple[list[str], TextDecoder]:
    decoder = TextDecoder(tok, **kwargs)
    deltas = []
    for t in ids:
        if decoder.finished:
            break
        deltas.append(decoder.push(t))
    deltas.append(decoder.finish())
    return deltas, decoder


def test_find_stop_is_the_earliest_occurrence():
    assert find_stop("hello world", ["wor", "lo"]) == (3, "lo")
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("abcabc", ["bc"], start=2) == (4, "bc")
    assert find_stop("abcd", ["abc", "ab"]) == (0, "ab")  # same start: the shorter completes first


def test_partial_stop_length():
    assert partial_stop_length("hello wo", ["world"]) == 2
    assert partial_stop_length("hello o ", ["world", "o w"]) == 2
    assert partial_stop_length("hello", ["xyz"]) == 0
    assert partial_stop_length("ab", ["abc", "b"]) == 2
    assert partial_stop_length("", ["abc"]) == 0


def test_incomplete_utf8_is_held_back(tok):
    ids = tok.encode("a中b")  # a, 3 bytes, b
    assert len(ids) == 5
    deltas, d = run(tok, ids)
    assert deltas == ["a", "", "", "中", "b", ""]
    assert d.text == "a中b" and d.finish_reason == "length" and d.num_tokens == 5


def test_stop_string_cut_before_it_across_tokens(tok):
    ids = tok.encode("one two three")
    deltas, d = run(tok, ids, stop=["tw", "zzz"])
    assert "".join(deltas) == d.text == "one "
    assert (d.finish_reason, d.stop_reason) == ("stop", "tw")
    assert d.num_tokens == len("one tw")  # the token that completed the stop string is the last
    # "t" could start "tw": it is held back until "w" decides.
    assert deltas[: len("one t")] == ["o", "n", "e", " ", ""]


def test_held_back_prefix_is_released_when_it_does_not_match(tok):
    deltas, d = run(tok, tok.encode("abcabd"), stop=["abd!"])
    assert deltas == ["", "", "abc", "", "", "", "abd"]
    assert d.text == "abcabd" and d.finish_reason == "length"


def test_stop_token_ends_without_its_text(tok):
    ids = [*tok.encode("hi"), tok.eos_token_ids[0], *tok.encode("more")]
    deltas, d = run(tok, ids, stop_token_ids=tok.eos_token_ids)
    assert "".join(deltas) == d.text == "hi"
    assert (d.finish_reason, d.stop_reason, d.num_tokens) == ("stop", tok.eos_token_ids[0], 3)


def test_stop_token_flushes_an_incomplete_character(tok):
    ids = [*tok.encode("x"), 0xE4, 0xB8, tok.eos_token_ids[0]]
    deltas, d = run(tok, ids, stop_token_ids=tok.eos_token_ids)
    assert "".join(deltas) == d.text == tok.decode(ids[:3]) == "x\ufffd"


def test_special_tokens_skipped_but_think_tags_kept(tok):
    ids = tok.encode("<|im_start|>a<think>b</think>c<|im_end|>")
    deltas, _ = run(tok, ids)
    assert "".join(deltas) == "a<think>b</think>c"
    _, raw = run(tok, ids, skip_special_tokens=False)
    assert raw.text == "<|im_start|>a<think>b</think>c<|im_end|>"


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_concatenate_to_the_full_decode(tok, seed):
    """Random bytes (mostly invalid UTF-8) and special tokens; stop strings from the text."""
    rng = np.random.default_rng(seed)
    pool = [*tok.encode("ab é中😀\n"), *range(128, 256), *range(256, 282)]
    ids = [int(rng.choice(pool)) for _ in range(80)]
    full = tok.decode(ids, skip_special_tokens=True)
    deltas, d = run(tok, ids)
    assert "".join(deltas) == d.text == full
    # One stop string taken from the text: the cut is before its first occurrence.
    i = int(rng.integers(0, len(full) - 3))
    stop = full[i : i + 3]
    deltas, d = run(tok, ids, stop=[stop])
    assert "".join(deltas) == d.text == full[: full.find(stop)]
    assert d.finish_reason == "stop"
