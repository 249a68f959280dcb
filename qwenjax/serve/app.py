"""The `qwenjax serve` HTTP server: a Starlette ASGI app on uvicorn in front of the `Scheduler`.

    GET  /health                      no auth; 200 while the engine runs, 503 (naming the
                                      error) once its loop has died
    GET  /metrics                     Prometheus text (qwenjax:-prefixed vLLM names)
    GET  /v1/models
    POST /v1/chat/completions, /v1/completions, /v1/responses      (openai_api)
    POST /v1/messages, /v1/messages/count_tokens                   (anthropic_api)

Every route but /health needs the API key when one is configured: `Authorization: Bearer KEY`
or `x-api-key: KEY` (Claude Code sends either; accepting both everywhere costs nothing). Errors
come in the envelope of the API the route belongs to. The engine runs on its own thread
(`Scheduler.start`); the event loop only renders prompts, detokenises and writes SSE. On SIGTERM
uvicorn stops accepting connections and lets running requests finish (up to
`--shutdown-timeout` seconds, then their streams are cancelled), and the lifespan hook stops the
scheduler after draining it.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qwenjax import sharding
from qwenjax.inference.sampling import checkpoint_defaults
from qwenjax.serve import anthropic_api, openai_api
from qwenjax.serve.common import ApiError, ServerState, log
from qwenjax.serve.metrics import CONTENT_TYPE

API_KEY_ENV = "QWENJAX_API_KEY"
Handler = Callable[[Request, ServerState], Awaitable[Response]]


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def check_auth(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    key = _presented_key(request)
    if key is None or not hmac.compare_digest(key.encode(), state.api_key.encode()):
        what = "no API key given" if key is None else "the API key is not valid"
        raise ApiError(
            "authentication",
            f"{what}: send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY')",
        )


def _endpoint(handler: Handler, api: Any) -> Callable[[Request], Awaitable[Response]]:
    """Auth, then the handler; an `ApiError` (or a crash) becomes `api`'s error response."""

    async def endpoint(request: Request) -> Response:
        state: ServerState = request.app.state.qwenjax
        try:
            check_auth(request, state)
            return await handler(request, state)
        except ApiError as e:
            if e.kind != "authentication":
                log.info("%s %s: %s %s", request.method, request.url.path, e.kind, e.message)
            return api.error_response(e)
        except Exception as e:
            log.exception("%s %s failed", request.method, request.url.path)
            return api.error_response(ApiError("server", f"internal error: {e}"))

    return endpoint


async def _health(request: Request) -> Response:
    scheduler = request.app.state.qwenjax.scheduler
    if scheduler.healthy:
        return JSONResponse({"status": "ok"})
    error = scheduler.error
    reason = "is not running" if error is None else f"stopped: {type(error).__name__}: {error}"
    return JSONResponse({"status": "error", "error": f"the engine loop {reason}"}, 503)


async def _metrics(request: Request, state: ServerState) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _models(request: Request, state: ServerState) -> Response:
    return JSONResponse(openai_api.models(state))


async def _not_found(request: Request, exc: HTTPException) -> Response:
    api = anthropic_api if request.url.path.startswith("/v1/messages") else openai_api
    kind = "not_found" if exc.status_code == 404 else "invalid_request"
    e = ApiError(kind, f"{request.method} {request.url.path}: {exc.detail}")
    response = api.error_response(e)
    response.status_code = exc.status_code
    return response


def build_app(state: ServerState, *, drain_timeout: float = 30.0) -> Starlette:
    """The ASGI app over a scheduler; the lifespan starts and (draining) stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.scheduler.start()
        try:
            yield
        finally:
            log.info("shutting down: draining the scheduler")
            state.scheduler.stop(drain=True, timeout=drain_timeout)

    o, a = openai_api, anthropic_api
    routes = [
        Route("/health", _health, methods=["GET"]),
        Route("/metrics", _endpoint(_metrics, o), methods=["GET"]),
        Route("/v1/models", _endpoint(_models, o), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(o.chat_completions, o), methods=["POST"]),
        Route("/v1/completions", _endpoint(o.completions, o), methods=["POST"]),
        Route("/v1/responses", _endpoint(o.responses, o), methods=["POST"]),
        Route("/v1/messages", _endpoint(a.messages, a), methods=["POST"]),
        Route("/v1/messages/count_tokens", _endpoint(a.count_tokens, a), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found}
    )
    app.state.qwenjax = state
    return app


# ---------------------------------------------------------------------------- the CLI verb
def default_model_name(checkpoint: str | os.PathLike, config: Any, tokenizer: Any) -> str:
    """`qwen/qwen3.6-27b` for that architecture (`qwen3.5-27b` when the checkpoint's own
    template lacks 3.6's `preserve_thinking`), else the checkpoint directory's name."""
    from qwenjax.config import ModelConfig

    ref = ModelConfig.from_preset("qwen3.6-27b")
    dims = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "linear_key_head_dim",
        "linear_value_head_dim",
    )
    if all(getattr(config, d) == getattr(ref, d) for d in dims):
        template = tokenizer.chat_template
        if template is None or "preserve_thinking" in str(template):
            return "qwen/qwen3.6-27b"
        return "qwen/qwen3.5-27b"
    return Path(checkpoint).resolve().name


def _warn_no_key() -> None:
    bar = "!" * 78
    sys.stderr.write(
        f"{bar}\n!! qwenjax serve: NO API KEY CONFIGURED — every route is open to anyone who can\n"
        f"!! reach this port. Set --api-key or {API_KEY_ENV} unless this is a private test.\n"
        f"{bar}\n"
    )
    sys.stderr.flush()


def _random_model(args: argparse.Namespace, mesh: Any, rules: Any):
    """(model, tokenizer, label) for `--random-weights PRESET`: the preset's shapes with random
    weights (bf16 unless --dtype), built in place on the device or the mesh. Token ids the
    tokenizer lacks decode to nothing, so any tokenizer serves for load tests."""
    import jax
    import jax.numpy as jnp

    from qwenjax.api import build, build_sharded
    from qwenjax.config import ModelConfig
    from qwenjax.tokenizer import Tokenizer

    if not args.tokenizer:
        raise ValueError("--random-weights needs --tokenizer DIR (any tokenizer directory)")
    config = ModelConfig.from_preset(args.random_weights)
    dtype = jnp.dtype(args.dtype or "bfloat16")
    print(f"building {args.random_weights} with random weights ...", file=sys.stderr, flush=True)
    kwargs = {"dtype": dtype, "param_dtype": dtype, "seed": args.seed}
    if mesh is not None:
        model = build_sharded(config, mesh, rules, **kwargs)
    else:  # jitted, so the parameters are created on the device, not copied from the host
        model = jax.jit(lambda: build(config, **kwargs))()
    return model, Tokenizer.from_dir(args.tokenizer), f"random weights ({args.random_weights})"


def serve(args: argparse.Namespace, mesh: Any = None, rules: Any = None) -> None:
    """Load the checkpoint, start the engine and serve until SIGTERM / Ctrl-C."""
    import jax
    import uvicorn

    from qwenjax.checkpoint import load
    from qwenjax.kernels.choice import kernel_flags
    from qwenjax.serve.scheduler import Scheduler
    from qwenjax.tokenizer import Tokenizer
    from qwenjax.vision.model import Qwen35VL
    from qwenjax.vision.processor import Processor

    # force: an import may already have configured the root logger at WARNING.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    positive = ("slots", "max_length", "prefill_chunk", "max_waiting", "max_pixels", "max_images")
    for name in positive:  # the last two may be unset (None)
        if (value := getattr(args, name, None)) is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.speculative_tokens < 0:
        raise ValueError("--speculative-tokens must be >= 0")
    kernels = kernel_flags(args, jax.default_backend())
    split = sharding.batch_split(mesh, rules)
    if args.slots % split:  # before loading: the scheduler would refuse it after
        raise ValueError(
            f"--slots {args.slots} must be a multiple of {split}, the devices --mesh splits "
            "the batch over (its data and fsdp axes)"
        )
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if getattr(args, "random_weights", None):
        model, tokenizer, source = _random_model(args, mesh, rules)
        defaults = {}
    else:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
        tokenizer = Tokenizer.from_dir(args.tokenizer or checkpoint)
        defaults = checkpoint_defaults(checkpoint)
        print(f"loading {checkpoint} ...", file=sys.stderr, flush=True)
        # The vision tower when the checkpoint has one: requests may then hold images.
        model = load(checkpoint, dtype=args.dtype, mesh=mesh, rules=rules, vision=None)
        source = checkpoint
    processor = None
    if isinstance(model, Qwen35VL):
        # its preprocessor_config.json, else Qwen3.6's; --max-pixels lowers the budget
        max_pixels = getattr(args, "max_pixels", None)
        processor = Processor.from_dir(source, **({"max_pixels": max_pixels} if max_pixels else {}))
        budget = processor.image.min_pixels, processor.image.max_pixels
        if budget[1] < budget[0]:
            raise ValueError(f"--max-pixels {budget[1]} is below the processor's min_pixels "
                             f"{budget[0]}")  # fmt: skip
        log.info("images accepted (%d to %d pixels each, after resizing)", *budget)
    config = model.config
    max_length = min(args.max_length, config.max_position_embeddings)
    with kernels.pinned():  # the scheduler traces its programs under the pins it is built under
        scheduler = Scheduler(
            model,
            slots=args.slots,
            max_length=max_length,
            prefill_chunk=args.prefill_chunk,
            num_speculative_tokens=args.speculative_tokens,
            max_waiting=args.max_waiting,
            stop_token_ids=tokenizer.eos_token_ids,
            mesh=mesh,
            rules=rules,
            prefix_cache=not args.no_prefix_cache,
            # each message starts with one: snapshots where the system message ends and where
            # the generation prompt starts serve other conversations and the next turn
            boundary_token=tokenizer.token_to_id("<|im_start|>"),
        )
    if args.served_model_name:
        name = args.served_model_name
    elif getattr(args, "random_weights", None):
        name = f"random-{args.random_weights}"
    else:
        name = default_model_name(source, config, tokenizer)
    state = ServerState(
        scheduler=scheduler,
        tokenizer=tokenizer,
        model_name=name,
        max_length=max_length,
        vocab_size=config.vocab_size,
        api_key=api_key,
        enable_test_hooks=args.enable_test_hooks,
        sampling_defaults=defaults,
        processor=processor,
        max_images=getattr(args, "max_images", None),
    )
    if api_key is None:
        _warn_no_key()
    if args.enable_test_hooks:
        log.warning("test hooks are on: requests may script the output (never in production)")
    log.info(
        "serving %s as %r on http://%s:%d (%d slots, max length %d)",
        source,
        name,
        args.host,
        args.port,
        args.slots,
        max_length,
    )
    app = build_app(state, drain_timeout=args.shutdown_timeout)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=args.shutdown_timeout,
        access_log=args.access_log,
    )
