"""Tokenizer: an HF `tokenizer.json` (via `tokenizers`) or a SentencePiece model, plus chat.

`Tokenizer.from_dir(checkpoint_dir)` reads what a Hugging Face checkpoint ships next to its
weights: `tokenizer.json` (or `tokenizer.model`), `tokenizer_config.json` (special tokens, added
tokens, chat template), `chat_template.jinja` (which wins over the config's template, as in
transformers) and `generation_config.json` (stop ids). Encoding never adds a BOS token and always
recognises special tokens written in the text, which is how chat prompts are tokenised.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from qwenjax import chat

# Stop tokens of the Qwen chat format, used when present in the vocabulary (ARCHITECTURE.md §7).
_QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

Offsets = list[tuple[int, int]]


class _HFBackend:
    """A `tokenizers.Tokenizer`; added tokens (specials included) are matched in the text."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self.added = {token.content: i for i, token in added.items()}
        self.special_ids = {i for i, token in added.items() if token.special}

    def encode(self, text: str) -> tuple[list[int], Offsets]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A SentencePiece model; control / user-defined pieces and config-added tokens are split out
    of the text first (SentencePiece itself never matches control pieces in text)."""

    def __init__(self, path: Path, added_tokens: Mapping[int, tuple[str, bool]]):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
        control, user_defined = proto.SentencePiece.CONTROL, proto.SentencePiece.USER_DEFINED
        self.added = {
            p.piece: i for i, p in enumerate(proto.pieces) if p.type in (control, user_defined)
        }
        self.special_ids = {i for i, p in enumerate(proto.pieces) if p.type == control}
        for token_id, (content, special) in added_tokens.items():
            self.added[content] = token_id
            if special:
                self.special_ids.add(token_id)
        self.extra = {i: s for s, i in self.added.items() if i >= self.sp.get_piece_size()}
        self.pieces = {i: s for s, i in self.added.items()}
        names = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> tuple[list[int], Offsets]:
        ids: list[int] = []
        offsets: Offsets = []
        start = 0
        for chunk in self.split.split(text) if self.split else [text]:
            if chunk in self.added:
                ids.append(self.added[chunk])
                offsets.append((start, start + len(chunk)))
            elif chunk:
                encoded = self.sp.encode(chunk, return_type="offset_mapping")
                ids += encoded["ids"]
                offsets += [(start + a, start + b) for a, b in encoded["offsets"]]
            start += len(chunk)
        return ids, offsets

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for token_id in ids:
            if token_id in self.pieces:
                out.append(self.sp.decode(run))
                run = []
                if not (skip_special_tokens and token_id in self.special_ids):
                    out.append(self.pieces[token_id])
            else:
                run.append(int(token_id))
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self.sp.piece_to_id(token)  # unknown pieces map to <unk>
        return token_id if self.sp.id_to_piece(token_id) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.extra:
            return self.extra[token_id]
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.extra)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
    return value.get("content") if isinstance(value, Mapping) else value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    """Text <-> token ids for a checkpoint, its stop and pad ids, and its chat template.

    Attributes:
        special_tokens: Special-token role -> token string (`eos_token`, `pad_token`, ...), as
            passed to Jinja chat templates.
        chat_template: The checkpoint's own Jinja template (a string, or a dict of named
            templates), or None to use the built-in Qwen3.6 renderer.
    """

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
        extra_eos_ids: Sequence[int] = (),
    ):
        self._backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        eos = [self.token_to_id(self.special_tokens.get("eos_token", "")), *extra_eos_ids]
        eos += [self.token_to_id(token) for token in _QWEN_STOP_TOKENS]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
        pad = self.token_to_id(self.special_tokens.get("pad_token", ""))
        candidates = (pad, self.token_to_id("<|endoftext|>"), *self.eos_token_ids, 0)
        self.pad_id: int = next(i for i in candidates if i is not None)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Loads the tokenizer files of a checkpoint directory.

        Raises:
            FileNotFoundError: The directory is missing, or has neither `tokenizer.json` nor
                `tokenizer.model`.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        config = _read_json(directory / "tokenizer_config.json")
        added = {
            int(i): (token["content"], bool(token.get("special", False)))
            for i, token in config.get("added_tokens_decoder", {}).items()
        }
        if (directory / "tokenizer.json").is_file():
            backend = _HFBackend(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")))
        elif (directory / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(directory / "tokenizer.model", added)
        else:
            raise FileNotFoundError(
                f"no tokenizer in {directory}: expected tokenizer.json (Hugging Face tokenizers) "
                "or tokenizer.model (SentencePiece)"
            )
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates, as transformers saves several
            template = {entry["name"]: entry["template"] for entry in template}
        template = _read_json(directory / "chat_template.json").get("chat_template", template)
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        stop = _read_json(directory / "generation_config.json").get("eos_token_id", [])
        specials = {k: _token_content(config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
        return cls(
            backend,
            special_tokens={k: v for k, v in specials.items() if v},
            chat_template=template,
            extra_eos_ids=[stop] if isinstance(stop, int) else stop,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a bare `tokenizer.json` or SentencePiece `.model` file (no config, no template)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if path.suffix == ".json":
            return cls(_HFBackend(tokenizers.Tokenizer.from_file(str(path))))
        return cls(_SentencePieceBackend(path, {}))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS is added, special tokens in the text become their ids."""
        return list(self._backend.encode(text)[0])

    def encode_with_mask(
        self, text: str, spans: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        """Token ids of `text` and a 0/1 mask of the tokens overlapping the character `spans`.

        The text is tokenised in one piece, so ids equal `encode(text)`; a token counts as inside
        a span when its characters overlap it (as transformers' assistant masks do).
        """
        ids, offsets = self._backend.encode(text)
        mask, k = [0] * len(ids), 0
        for t, (start, end) in enumerate(offsets):
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            if k == len(spans):
                break
            if end > spans[k][0] or (start == end and start >= spans[k][0]):
                mask[t] = 1
        return list(ids), mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; with `skip_special_tokens` the special tokens are left out."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def to_json(self) -> str | None:
        """The Hugging Face `tokenizer.json` text (None for SentencePiece), for libraries that
        build their own view of the vocabulary (the grammar matcher of `qwenjax.serve.grammar`)."""
        backend = self._backend
        return backend.tokenizer.to_str() if isinstance(backend, _HFBackend) else None

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, or None if it is not in the vocabulary."""
        return self._backend.token_to_id(token) if token else None

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id, or None if out of range."""
        return self._backend.id_to_token(int(token_id))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        preserve_thinking: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Renders a conversation: with the checkpoint's own template if it ships one (Jinja, as
        transformers does), else with the built-in Qwen3.6 renderer.

        `enable_thinking` / `preserve_thinking` left as None are not passed to a Jinja template
        (it sees them undefined); the built-in renderer reads None as thinking on, not preserved.
        """
        if self.chat_template is None:
            return chat.render(
                messages,
                tools,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking is not False,
                preserve_thinking=preserve_thinking is True,
                **kwargs,
            )
        flags = {"enable_thinking": enable_thinking, "preserve_thinking": preserve_thinking}
        template_vars = {
            **self.special_tokens,
            **{k: v for k, v in flags.items() if v is not None},
            **kwargs,
        }
        return chat.render_template(
            self._template_for(tools),
            messages,
            tools,
            add_generation_prompt=add_generation_prompt,
            **template_vars,
        )

    def _template_for(self, tools: Any) -> str:
        template = self.chat_template
        if isinstance(template, Mapping):  # transformers' choice among named templates
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template:
                raise ValueError(f"chat templates {sorted(template)} have no 'default'")
            template = template[name]
        return template
