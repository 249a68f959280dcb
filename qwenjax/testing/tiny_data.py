"""Embedded demo data: a byte-level tokenizer with the Qwen special tokens, and a synthetic task.

The task is "sort the digits": the user sends `sort 73915` (3 to 8 distinct digits) and the
assistant answers `13579`. It suits a ~1M-parameter model trained for minutes on a CPU: a rendered
example is 38-48 tokens, and each answer token is a simple content lookup (the smallest prompt
digit above the previous answer digit), which attention learns quickly, unlike reversal (position
arithmetic) or addition (carries). Exact match is well defined, and the held-out prompts never
occur in the training set.

Nothing is downloaded: the tokenizer is built in code and the data generated from a seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from qwenjax.chat import QWEN3_6_CHAT_TEMPLATE
from qwenjax.tokenizer import Tokenizer

# The Qwen3.5/3.6 added tokens in their id order (ARCHITECTURE.md §7). Those marked False are
# matched as single tokens but, as in Qwen's tokenizer_config, are not "special", so
# decode(skip_special_tokens=True) keeps them.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)


def _byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte value, as byte-level BPE tokenizers use.

    Printable Latin-1 bytes stand for themselves; the others are shifted past 255 in order.
    """
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def tiny_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level tokenizer: ids 0-255 are the bytes, then the Qwen added tokens (vocab 282).

    It has Qwen's structure (byte-level BPE, no BOS, the same added tokens) without merges, so
    every byte is one token and any text round-trips.
    """
    vocab = {char: byte for byte, char in enumerate(_byte_alphabet())}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for content, special in QWEN_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def save_tiny_tokenizer(directory: str | os.PathLike) -> Path:
    """Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, the Qwen3.6 chat
    template) into a checkpoint directory, loadable with `Tokenizer.from_dir`; returns the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    added = {
        str(i): {"content": t.content, "special": t.special, "normalized": False}
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": QWEN3_6_CHAT_TEMPLATE,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_tiny_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Saves the tiny tokenizer into `directory` and loads it back as a `Tokenizer`."""
    return Tokenizer.from_dir(save_tiny_tokenizer(directory))


def sort_answer(prompt: str) -> str:
    """The correct reply to a task prompt: `sort 73915` -> `13579`."""
    return "".join(sorted(prompt.removeprefix("sort ")))


def sort_examples(
    n: int,
    seed: int,
    *,
    min_digits: int = 3,
    max_digits: int = 8,
    exclude: frozenset[str] = frozenset(),
) -> list[dict]:
    """`n` distinct chat records of the sort task, deterministic in `seed`.

    Args:
        n: Number of records.
        seed: Generator seed.
        min_digits: Fewest digits in a prompt.
        max_digits: Most digits in a prompt (at most 10: the digits are distinct).
        exclude: Prompts not to generate (the held-out set, when generating training data).

    Returns:
        Records `{"messages": [{"role": "user", "content": "sort 73915"},
        {"role": "assistant", "content": "13579"}]}`.
    """
    if not 1 <= min_digits <= max_digits <= 10:
        raise ValueError(
            f"need 1 <= min_digits <= max_digits <= 10, got {min_digits}, {max_digits}"
        )
    rng = np.random.default_rng(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        length = int(rng.integers(min_digits, max_digits + 1))
        prompt = "sort " + "".join(map(str, rng.permutation(10)[:length]))
        if prompt not in exclude:
            prompts[prompt] = None
    return [
        {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": sort_answer(prompt)},
            ]
        }
        for prompt in prompts
    ]


def write_sort_task(
    directory: str | os.PathLike, *, n_train: int = 20000, n_eval: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """Writes `train.jsonl` and `eval.jsonl` of the sort task; eval prompts are held out of train.

    Returns:
        (train path, eval path).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    held_out = sort_examples(n_eval, seed + 1)
    exclude = frozenset(r["messages"][0]["content"] for r in held_out)
    train = sort_examples(n_train, seed, exclude=exclude)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, records in zip(paths, (train, held_out), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths
