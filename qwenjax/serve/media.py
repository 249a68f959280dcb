"""Images in API requests → image parts for the chat template and the processor.

    OpenAI Chat Completions   {"type": "image_url", "image_url": {"url": "data:...", "detail"}}
    OpenAI Responses          {"type": "input_image", "image_url": "data:...", "detail"}
    Anthropic Messages        {"type": "image", "source": {"type": "base64", "media_type",
                                                           "data"}}

Only inline images are taken: the server never fetches a URL (http(s) and Anthropic `url`
sources are a 400 saying so) and never opens a path of its own filesystem (any other URL is a
400). `detail` is ignored: the checkpoint's processor config sets the pixel budget. Each image is
decoded here, so a malformed one is a 400 naming its field before anything is queued. Images are
accepted only when the served model has a vision tower (`ServerState.processor` is set); else a
400 says the model is text-only. Videos are refused: video files are not decoded (no decoder
dependency), and no API part carries frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import PIL.Image

from qwenjax.serve.common import ServerState, invalid
from qwenjax.vision.preprocess import load_image

REMOTE = ("http://", "https://")


def require_images(state: ServerState, where: str, what: str = "image") -> None:
    """A 400 naming `where` unless the server takes images."""
    if state.processor is None:
        raise invalid(
            f"'{where}': {what} input is not supported: the model '{state.model_name}' served "
            "here is text-only (no vision tower)",
            where,
        )


def image_part(state: ServerState, url: Any, where: str) -> dict[str, Any]:
    """A `data:` URL (`where` names its field) → `{"type": "image", "image": <decoded>}`."""
    require_images(state, where)
    if not isinstance(url, str):
        raise invalid(f"'{where}' must be a string (a data: URL)", where)
    if url.startswith(REMOTE):
        raise invalid(
            f"'{where}': remote fetching is disabled on this server; send the image inline as "
            "a base64 data: URL (data:image/png;base64,...)",
            where,
        )
    if not url.startswith("data:"):
        raise invalid(
            f"'{where}' must be a base64 data: URL (data:image/png;base64,...), got {url[:40]!r}",
            where,
        )
    try:
        rgb = load_image(url)
        state.processor.image.resized_size(*rgb.shape[:2])  # e.g. an aspect ratio over 200
    except Exception as e:  # whatever PIL or base64 raise for bad bytes: the client's error
        raise invalid(f"'{where}' is not a decodable image: {e}", where) from None
    return {"type": "image", "image": PIL.Image.fromarray(rgb)}


def anthropic_image_part(state: ServerState, block: Mapping[str, Any], where: str) -> dict:
    """An Anthropic `image` block with a base64 `source` → an image part."""
    require_images(state, where)
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if kind == "url":
        raise invalid(
            f"'{where}.source': remote fetching is disabled on this server; send the image as "
            "a base64 source",
            f"{where}.source",
        )
    if kind != "base64":
        raise invalid(
            f"'{where}.source.type' must be 'base64', got {kind!r}", f"{where}.source.type"
        )
    media_type, data = source.get("media_type"), source.get("data")
    for name, value in (("media_type", media_type), ("data", data)):
        if not isinstance(value, str):
            raise invalid(f"'{where}.source.{name}' must be a string", f"{where}.source.{name}")
    return image_part(state, f"data:{media_type};base64,{data}", f"{where}.source.data")
