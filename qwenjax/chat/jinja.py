"""Rendering a checkpoint's own Jinja chat template the way transformers does.

transformers (5.x, `utils/chat_template_utils.py`) renders templates in an immutable sandbox with
`trim_blocks` and `lstrip_blocks` on and the `loopcontrols` extension, replaces the `tojson` filter
with plain `json.dumps` (no HTML escaping, no key sorting, non-ASCII kept), and adds the globals
`raise_exception`, `strftime_now`, `dict` and an underscore-proof `namespace`. Messages are
normalised first (None-valued keys dropped, reasoning aliased to `reasoning_content`), and the
tokenizer's special tokens (`eos_token`, ...) are passed as template variables. This module
reproduces that environment so a template renders here exactly as with `apply_chat_template`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenjax.chat.render import ChatTemplateError, normalize_messages


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Dict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` blocks; renders the body."""

    tags = {"generation"}  # noqa: RUF012 -- the attribute Jinja reads

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compiles a chat template in the transformers-compatible sandbox (cached per string)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def render_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Renders messages with a Jinja chat template as `tokenizer.apply_chat_template` would.

    Args:
        template: Jinja source (a checkpoint's `chat_template.jinja` or its
            `tokenizer_config.json` `chat_template`).
        messages: OpenAI-style messages.
        tools: JSON schemas of the available functions (callables are not converted).
        add_generation_prompt: Passed to the template (transformers' default is False; ours is
            True to match `render`).
        documents: Passed to the template for retrieval-style templates.
        **kwargs: Further template variables: `enable_thinking`, `preserve_thinking`, special
            tokens such as `eos_token`, ...

    Returns:
        The rendered text.

    Raises:
        ChatTemplateError: The template called `raise_exception`.
    """
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise TypeError("tools must be JSON schema dicts")
    return compile_template(template).render(
        messages=normalize_messages(messages),
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
