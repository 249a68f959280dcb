"""`qwenjax generate` / `qwenjax chat` and the text layer on a tiny random checkpoint.

The oracle is `Engine.decode` on the same prompt ids, cut after the first EOS id and decoded with
`Tokenizer.decode` in one piece: it shares no code with the text layer. Prompts, batch sizes and
token budgets repeat on purpose, so that the whole module compiles only a few programs.
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import pytest

from qwenjax.chat import parse_reply
from qwenjax.checkpoint import load
from qwenjax.cli import main
from qwenjax.config import ModelConfig
from qwenjax.inference.engine import Engine
from qwenjax.inference.sampling import SamplingParams
from qwenjax.inference.text import chat_prompt, complete, stream
from qwenjax.testing.hf_checkpoint import write_random_hf_checkpoint
from qwenjax.testing.tiny_data import save_tiny_tokenizer
from qwenjax.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)
PROMPT = "hello world"
N = 16  # --max-new-tokens of the single-prompt runs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    write_random_hf_checkpoint(path, ModelConfig.from_preset("tiny"), seed=3)
    save_tiny_tokenizer(path)  # vocab 282 <= the model's 512
    return str(path)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(load(ckpt))


def oracle(engine, tok, prompts, params, max_new_tokens, num_top=0):
    """[(text, token ids, finish reason, logprobs)] from `Engine.decode` and one-piece decoding."""
    rows = [dataclasses.replace(p, stop_token_ids=tok.eos_token_ids) for p in params]
    gen = engine.decode(
        prompts, rows, max_new_tokens=max_new_tokens, pad_id=tok.pad_id, num_top_logprobs=num_top
    )
    out = []
    for b, reason in enumerate(gen.finish_reasons):
        ids = [int(t) for t in gen.tokens[b, : gen.lengths[b]]]
        text_ids = ids[:-1] if reason == "stop" else ids
        text = tok.decode(text_ids, skip_special_tokens=True)
        out.append((text, ids, reason, gen.logprobs[b, : len(ids)]))
    return out


def cli(capsys, *argv) -> tuple[str, str]:
    main(list(argv))
    captured = capsys.readouterr()
    return captured.out, captured.err


def cli_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    return err


@pytest.fixture(scope="module")
def greedy_text(engine, tok):
    text = oracle(engine, tok, [tok.encode(PROMPT)], [GREEDY], N)[0][0]
    # The stop-string tests need text to cut; this seed's random model produces enough.
    assert len(text) >= 8, text
    return text


def test_generate_prompt_prints_the_greedy_text(ckpt, capsys, greedy_text):
    out, err = cli(
        capsys, "generate", "--checkpoint", ckpt, "--prompt", PROMPT,
        "--temperature", "0", "--max-new-tokens", str(N),
    )  # fmt: skip
    assert out == greedy_text + "\n"
    assert "generate: 1/1 prompts" in err


def test_generate_jsonl_matches_engine_decode(ckpt, engine, tok, capsys, tmp_path):
    chat = [{"role": "user", "content": "sort 3142"}]
    lines = [
        {"id": "plain", "prompt": PROMPT},
        {"messages": chat, "max_tokens": 5},
        {"prompt": "abc", "temperature": 0.9, "seed": 3, "top_k": 50},
        {"messages": chat, "enable_thinking": False, "logprobs": True, "top_logprobs": 2},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    jsonl = [json.dumps(r) + "\n" for r in lines]
    src.write_text("".join(jsonl[:2]) + "\n" + "".join(jsonl[2:]))  # a blank line is skipped
    cli(
        capsys, "generate", "--checkpoint", ckpt, "--input", str(src), "--output", str(dst),
        "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "4",
    )  # fmt: skip
    assert not (tmp_path / "out.jsonl.partial").exists()
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [g["index"] for g in got] == [0, 1, 2, 3] and got[0]["id"] == "plain"

    prompts = [
        tok.encode(PROMPT),
        tok.encode(tok.apply_chat_template(chat)),
        tok.encode("abc"),
        tok.encode(tok.apply_chat_template(chat, enable_thinking=False)),
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=5),
        SamplingParams(temperature=0.9, seed=3, top_k=50, max_tokens=12),
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=2),
    ]
    expected = oracle(engine, tok, prompts, params, 12, num_top=2)
    for g, p, (text, ids, reason, _) in zip(got, prompts, expected, strict=True):
        assert (g["text"], g["token_ids"], g["finish_reason"]) == (text, ids, reason)
        assert (g["completion_tokens"], g["prompt_tokens"]) == (len(ids), len(p))
    assert got[1]["completion_tokens"] <= 5
    for g in got[1], got[3]:  # chat lines carry the parsed reply
        parsed = parse_reply(g["text"], thinking_open=g is got[1])
        assert {k: g[k] for k in parsed} == parsed
    assert "reasoning" not in got[0]
    lp = got[3]["logprobs"]
    assert [e["token_id"] for e in lp] == got[3]["token_ids"]
    assert [e["logprob"] for e in lp] == pytest.approx(expected[3][3].tolist(), abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in lp)
    assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-5 for e in lp)
    assert "logprobs" not in got[0]


def test_stop_string_cuts_before_it(ckpt, tmp_path, capsys, greedy_text):
    stop = greedy_text[4:7]
    cut = greedy_text[: greedy_text.find(stop)]
    args = ["generate", "--checkpoint", ckpt, "--prompt", PROMPT, "--temperature", "0",
            "--max-new-tokens", str(N), "--stop", stop]  # fmt: skip
    out, _ = cli(capsys, *args)
    assert out == cut + "\n"
    cli(capsys, *args, "--output", str(tmp_path / "o.jsonl"))
    (row,) = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert (row["text"], row["finish_reason"], row["stop_reason"]) == (cut, "stop", stop)
    assert row["completion_tokens"] < N


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_concatenates_to_complete(engine, tok, greedy_text, chunk):
    (whole,) = complete(engine, tok, [PROMPT], GREEDY, max_new_tokens=N)
    assert whole.text == greedy_text
    deltas = list(stream(engine, tok, PROMPT, GREEDY, max_new_tokens=N, chunk=chunk))
    assert "".join(d.text for d in deltas) == whole.text
    assert all(d.text for d in deltas[:-1]) and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].completion == whole

    # A stop string: the stream ends there, with the same cut as the non-streamed run.
    params = SamplingParams(temperature=0.0, stop=[greedy_text[4:7]])
    (cut,) = complete(engine, tok, [PROMPT], params, max_new_tokens=N)
    deltas = list(stream(engine, tok, PROMPT, params, max_new_tokens=N, chunk=chunk))
    expected = greedy_text[: greedy_text.find(params.stop[0])]
    assert "".join(d.text for d in deltas) == cut.text == expected
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion.token_ids == cut.token_ids


def test_sampled_stream_equals_complete(engine, tok):
    params = SamplingParams(temperature=1.0, seed=11, top_p=0.9)
    (whole,) = complete(engine, tok, [PROMPT], params, max_new_tokens=N)
    text = "".join(d.text for d in stream(engine, tok, PROMPT, params, max_new_tokens=N))
    assert text == whole.text == oracle(engine, tok, [tok.encode(PROMPT)], [params], N)[0][0]


def test_chat_through_a_pipe(ckpt, engine, tok, capsys, monkeypatch):
    def reply(messages):
        return oracle(engine, tok, [chat_prompt(tok, messages)], [GREEDY], N)[0][0]

    first = [{"role": "user", "content": "hi"}]
    r1 = reply(first)
    parsed = parse_reply(r1, thinking_open=True)
    assistant = {"role": "assistant", "content": parsed["content"]}
    if parsed["reasoning"]:
        assistant["reasoning_content"] = parsed["reasoning"]
    r2 = reply([*first, assistant, {"role": "user", "content": "and now?"}])

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nand now?\n\n/reset\nhi\n"))  # then EOF
    out, _ = cli(capsys, "chat", "--checkpoint", ckpt, "--temperature", "0",
                 "--max-new-tokens", str(N))  # fmt: skip
    # The prompt opened the think block, so a piped reply starts with the tag the model did not
    # write; the history makes turn 2 differ from a fresh conversation.
    assert out == f"<think>\n{r1}\n<think>\n{r2}\n[conversation reset]\n<think>\n{r1}\n"

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\nhi\n"))
    out, _ = cli(capsys, "chat", "--checkpoint", ckpt, "--temperature", "0",
                 "--max-new-tokens", str(N))  # fmt: skip
    assert out == f"<think>\n{r1}\n"


def test_errors(ckpt, tmp_path, capsys):
    assert "does not exist" in cli_error(
        capsys, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"
    )
    assert "temperature" in cli_error(
        capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--temperature", "5"
    )
    assert "does not exist" in cli_error(capsys, "chat", "--checkpoint", str(tmp_path / "nope"))
    assert "--attention-kernel: kernels.attention=pallas_gpu is a GPU kernel" in cli_error(
        capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--attention-kernel",
        "pallas_gpu",
    )  # fmt: skip
    assert "--gdn-kernel: kernels.gated_delta_rule=pallas_tpu is a TPU kernel" in cli_error(
        capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--gdn-kernel", "pallas_tpu"
    )
    assert "--mesh takes axis=size pairs" in cli_error(
        capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--mesh", "fsdp=2,pipe=2"
    )
    if jax.device_count() > 1:  # tests/conftest.py asks for 8 CPU devices
        assert "must divide over the mesh" in cli_error(
            capsys, "generate", "--checkpoint", ckpt, "--prompt", "x", "--mesh", "fsdp=-1",
            "--batch-size", "3",
        )  # fmt: skip
        assert "chat decodes one conversation" in cli_error(
            capsys, "chat", "--checkpoint", ckpt, "--mesh", "fsdp=-1"
        )
    bad = {
        '{"prompt": "a"}\n{"prompt": "b"\n': ":2: not valid JSON",
        '{"prompt": "a"}\n\n{"prompt": "b", "temprature": 1}\n':
            ":3: unknown key(s) ['temprature']",
        '{"prompt": "a", "messages": []}\n': ":1: give exactly one of",
        '{"prompt": "a", "top_p": 0}\n': ":1: top_p must be in (0, 1]",
        '[1, 2]\n': ":1: expected a JSON object",
        '{"prompt": ""}\n': ":1: the prompt is empty",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}\n':
            ":1: cannot render the messages",
    }  # fmt: skip
    for i, (text, message) in enumerate(bad.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        err = cli_error(capsys, "generate", "--checkpoint", ckpt, "--input", str(path))
        assert f"{path}{message}" in err, (text, err)


def test_speculative_greedy_is_plain_greedy(ckpt, engine, tok, capsys, greedy_text):
    """MTP drafts change how many tokens a step emits, not which (greedy); streamed deltas then
    span several tokens."""
    out, _ = cli(
        capsys, "generate", "--checkpoint", ckpt, "--prompt", PROMPT, "--temperature", "0",
        "--max-new-tokens", str(N), "--speculative-tokens", "2",
    )  # fmt: skip
    assert out == greedy_text + "\n"
    deltas = stream(engine, tok, PROMPT, GREEDY, max_new_tokens=N, num_speculative_tokens=2)
    assert "".join(d.text for d in deltas) == greedy_text


def test_reply_printer_dims_reasoning_on_a_terminal(monkeypatch):
    from qwenjax.inference.jobs import _ReplyPrinter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    monkeypatch.setattr("sys.stdout", out)
    printer = _ReplyPrinter(thinking_open=True)
    for piece in ["Let me", " think.\n</th", "ink>\n", "\n", "The ", "answer</"]:
        printer.write(piece)
    printer.close()
    assert out.getvalue() == "\033[2mLet me think.\033[0m\nThe answer</\n"
