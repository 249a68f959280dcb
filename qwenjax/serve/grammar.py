"""Constrained decoding for `response_format` json_object / json_schema, with llguidance.

    Grammars        the server's compiler: a JSON schema → a checked `Grammar` (a schema
                    llguidance cannot use is a ValueError with its message); builds llguidance's
                    view of the tokenizer (the checkpoint's tokenizer.json over the model's
                    padded vocabulary) on first use
    JsonConstraint  one output's matcher on the host, driven by the scheduler one token at a
                    time (`qwenjax.serve.scheduler.Constraint`): `fill` writes the packed bitmask
                    of the tokens allowed next, `advance` takes the token sampled

The grammar covers the reply's content. When the reply opens in reasoning (thinking on), its
tokens are free until the model writes `</think>`, and the grammar applies from the next token
on, as vLLM's reasoning-parser integration does (a reply that ends before `</think>` has no
JSON). Once the JSON value is complete only the end-of-turn tokens are allowed, and when nothing
can follow it the reply ends there ("stop"). Ids the tokenizer lacks (the padding of the model's
vocabulary) and special tokens other than end-of-turn are never allowed.

Whitespace before the value and between its tokens is allowed (Qwen writes `</think>\\n\\n`
before its answer, and pretty-printed JSON is valid) but at most `MAX_WHITESPACE` characters per
gap, so a weak model cannot fill `max_tokens` with blanks.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

MAX_WHITESPACE = 32
_BLANK = r"[\x20\x0A\x0D\x09]"  # JSON's whitespace
_JSON_OPTIONS = {"whitespace_pattern": f"{_BLANK}{{0,{MAX_WHITESPACE}}}"}


class JsonConstraint:
    """One output's grammar state; `think_end`: the token after which the grammar starts (None:
    from the first token)."""

    def __init__(self, matcher: llguidance.LLMatcher, think_end: int | None):
        self._matcher = matcher
        self._waiting = think_end
        self.finished = False
        self.error: str | None = None

    def fill(self, out: np.ndarray) -> None:
        if self._waiting is not None:
            out[:] = -1
        else:
            llguidance.numpy.fill_next_token_bitmask(self._matcher, out)

    def advance(self, token: int) -> None:
        if self._waiting is not None:
            if token == self._waiting:
                self._waiting = None
            return
        if not self._matcher.consume_token(token):
            self.error = self._matcher.get_error() or f"token {token} breaks the grammar"
        elif self._matcher.is_stopped():  # the end token was taken, or nothing can follow
            self.finished = True


class Grammar:
    """A checked grammar; every output of a request gets its own `constraint`."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher  # in its start state, never advanced

    def constraint(self, think_end: int | None = None) -> JsonConstraint:
        return JsonConstraint(self._matcher.deep_copy(), think_end)


class Grammars:
    """Compiles JSON schemas for one tokenizer (`qwenjax.tokenizer.Tokenizer`) and a model
    vocabulary of `vocab_size` ids; end-of-turn is the tokenizer's `eos_token_ids`."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        # About a second for a 250k vocabulary, so built once, when first needed.
        with self._lock:
            if self._ll is None:
                source = self._tokenizer.to_json()
                if source is None:
                    raise ValueError(
                        "constrained decoding needs a tokenizer.json tokenizer; this checkpoint "
                        "has a SentencePiece model"
                    )
                self._ll = llguidance.LLTokenizer(
                    source,
                    n_vocab=self._vocab_size,
                    eos_token=list(self._tokenizer.eos_token_ids),
                )
            return self._ll

    def json(self, schema: Mapping[str, Any]) -> Grammar:
        """The grammar of JSON values valid under `schema` (`{"type": "object"}`: any object).

        Raises:
            ValueError: llguidance's message when it cannot compile the schema (an invalid
                schema, or keywords it does not implement).
        """
        own = schema.get("x-guidance")  # llguidance's options in the schema win over ours
        options = {**_JSON_OPTIONS, **(own if isinstance(own, Mapping) else {})}
        schema = {**schema, "x-guidance": options}
        # The schema alone first: its errors read better than those of the grammar around it.
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_json_schema(schema)
        )
        if failed:
            raise ValueError(messages[0])
        # Optional leading whitespace, then the value.
        lark = f"start: LEAD? value\nLEAD: /{_BLANK}{{1,{MAX_WHITESPACE}}}/\n"
        lark += f"value: %json {json.dumps(schema)}\n"
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return Grammar(matcher)
