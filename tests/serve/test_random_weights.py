"""`qwenjax serve --random-weights PRESET`: a preset's shapes with random weights (load tests).

The server builds the tiny preset from its seed and answers like offline `generate` on the same
randomly built model; without --tokenizer it refuses to start with a message naming the flag.
"""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import openai

from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.testing.tiny_data import save_tiny_tokenizer
from qwenjax.tokenizer import Tokenizer
from tests.serve.server_util import offline, start_server

KEY = "sk-random"


def test_random_weights_serve_like_offline_generate(tmp_path):
    save_tiny_tokenizer(tmp_path / "tok")
    flags = ["--random-weights", "tiny", "--seed", "5", "--dtype", "float32"]
    proc = start_server(None, tmp_path / "log", KEY, *flags, "--tokenizer", str(tmp_path / "tok"))
    try:
        client = openai.OpenAI(base_url=proc.base + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["random-tiny"]
        prompt = np.random.default_rng(1).integers(3, 250, 11).tolist()
        reply = client.completions.create(
            model="random-tiny", prompt=prompt, max_tokens=7, temperature=0.0
        )
        model = build(ModelConfig.from_preset("tiny"), dtype=jnp.float32, seed=5)
        tok = Tokenizer.from_dir(tmp_path / "tok")
        assert reply.choices[0].text == offline(model, tok, [prompt], [7])[0]
    finally:
        proc.kill()


def test_random_weights_need_a_tokenizer():
    cmd = [sys.executable, "-m", "qwenjax.cli", "serve", "--random-weights", "tiny"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and "--tokenizer" in out.stderr, out.stderr[-2000:]
