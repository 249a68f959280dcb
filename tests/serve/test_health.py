"""`GET /health` follows the engine loop: the app in-process over a real `Scheduler` (tiny
model) answers 200 while the loop runs and 503, naming the error, once an error killed it."""

from __future__ import annotations

import pytest

from qwenjax.api import build
from qwenjax.config import ModelConfig
from qwenjax.serve.app import build_app
from qwenjax.serve.common import ServerState
from qwenjax.serve.scheduler import Scheduler
from qwenjax.testing.tiny_data import load_tiny_tokenizer
from tests.serve.server_util import ThreadServer, http


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_is_503_once_the_engine_loop_died(tmp_path, monkeypatch):
    tok = load_tiny_tokenizer(tmp_path)
    scheduler = Scheduler(
        build(ModelConfig.from_preset("tiny"), seed=3),
        slots=1,
        max_length=64,
        prefill_chunk=16,
        stop_token_ids=tok.eos_token_ids,
    )
    state = ServerState(
        scheduler=scheduler, tokenizer=tok, model_name="tiny", max_length=64, vocab_size=512
    )
    request = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with ThreadServer(build_app(state, drain_timeout=1)) as server:
        assert http(server.base, "GET", "/health")[::2] == (200, {"status": "ok"})

        def lost(*args):
            raise RuntimeError("device lost")

        # The loop's next iteration raises, as a failing device call would.
        monkeypatch.setattr(scheduler, "_admit", lost)
        http(server.base, "POST", "/v1/completions", request)  # aborted by the dying loop
        code, _, body = http(server.base, "GET", "/health")
        assert code == 503
        assert body == {
            "status": "error",
            "error": "the engine loop stopped: RuntimeError: device lost",
        }
        code, _, body = http(server.base, "POST", "/v1/completions", request)
        assert code == 500 and "device lost" in body["error"]["message"]
