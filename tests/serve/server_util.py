"""Running a server for the tests: the app on uvicorn in a thread (over a scheduler double), or
a real `qwenjax serve` process on the tiny checkpoint; both on a free localhost port, waited for
via /health. `offline` is the reference the real server's greedy output is compared with."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import uvicorn

import qwenjax
from qwenjax.config import ModelConfig
from qwenjax.testing.hf_checkpoint import write_random_hf_checkpoint
from qwenjax.testing.tiny_data import save_tiny_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before it was healthy")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} not healthy after {timeout}s")


class ThreadServer:
    """uvicorn serving `app` on a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_healthy(self.base, 30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def http(
    base: str,
    method: str,
    path: str,
    body=None,
    *,
    key: str | None = None,
    headers: dict | None = None,
    raw: bytes | None = None,
):
    """(status, headers, decoded JSON or text) of a plain HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            status, hdrs, payload = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, payload = e.code, dict(e.headers), e.read()
    text = payload.decode()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


def metric(text: str, name: str) -> float | None:
    """The value of an unlabelled sample in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def tiny_checkpoint(path: Path) -> Path:
    """The random tiny model (seed 3) with the tiny byte-level tokenizer, in HF layout."""
    write_random_hf_checkpoint(path, ModelConfig.from_preset("tiny"), seed=3)
    save_tiny_tokenizer(path)
    return path


def start_server(checkpoint: Path | None, log_path: Path, key: str, *args: str) -> subprocess.Popen:
    """`qwenjax serve` on CPU with test hooks (`args`: more flags), healthy; `.base` is its URL
    and `.log_path` its log. The caller kills it. `checkpoint` None: `args` name the model."""
    port = free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "QWENJAX_API_KEY": key,
    }
    cmd = [
        sys.executable,
        "-m",
        "qwenjax.cli",
        "serve",
        *(["--checkpoint", str(checkpoint)] if checkpoint is not None else []),
        "--port",
        str(port),
        "--enable-test-hooks",
        *args,
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, 180, alive=lambda: proc.poll() is None)
    except Exception:
        proc.kill()
        raise AssertionError("server did not start:\n" + log_path.read_text()[-3000:]) from None
    proc.base, proc.log_path = base, log_path
    return proc


@contextlib.contextmanager
def serving(checkpoint: Path, log_path: Path, key: str, *args: str) -> Iterator[subprocess.Popen]:
    """`start_server` for the body of a `with` (a module fixture's); killed at its end."""
    proc = start_server(checkpoint, log_path, key, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def offline(model, tok, prompts: list[list[int]], budgets: list[int]) -> list[str]:
    """Greedy text of each prompt from `qwenjax.generate`, cut at its budget or first EOS."""
    out = qwenjax.generate(
        model, prompts, max(budgets), stop_token_ids=tok.eos_token_ids, pad_id=tok.pad_id
    )
    texts = []
    for row, budget in zip(np.asarray(out), budgets, strict=True):
        ids = []
        for t in row[:budget]:
            if int(t) in tok.eos_token_ids:
                break
            ids.append(int(t))
        texts.append(tok.decode(ids, skip_special_tokens=True))
    return texts
