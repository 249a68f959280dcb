"""Which kernels a run uses: the run config's `kernels:` section.

Every model call asks its kernel for `backend="auto"`, and "auto" picks by platform from
measurement (see each `api.py`). A run may pin another backend, e.g. the Pallas TPU gated delta
rule, which "auto" does not pick before it is timed on a chip, but whose backward keeps far less
than the pure-JAX one (`qwenjax plan` at 262K tokens on a v5p-64: 36 instead of 52 GiB of
temporaries per chip). The pin applies while the run's programs are traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from qwenjax.kernels import attention as _attention
from qwenjax.kernels import gated_delta_rule as _gdn
from qwenjax.kernels.attention import api as _attention_api
from qwenjax.kernels.attention.api import BACKENDS as ATTENTION_BACKENDS
from qwenjax.kernels.gated_delta_rule import api as _gdn_api
from qwenjax.kernels.gated_delta_rule.api import BACKENDS as GDN_BACKENDS

# The platform a compiled (not interpreted) backend is for. Elsewhere its Pallas kernels run in
# the interpreter: right, but orders of magnitude slower, which a run never wants.
_PLATFORM = {"pallas_tpu": "tpu", "splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """What `backend="auto"` means for the model's sequence mixers during a run."""

    gated_delta_rule: str = "auto"  # auto | reference | chunked | pallas_tpu | pallas_gpu
    attention: str = "auto"  # auto | xla | chunked | cudnn | splash | pallas_gpu | pallas_tpu

    def __post_init__(self) -> None:
        for key, valid in (("gated_delta_rule", GDN_BACKENDS), ("attention", ATTENTION_BACKENDS)):
            value = getattr(self, key)
            if value != "auto" and value not in valid:
                raise ValueError(
                    f"kernels.{key} {value!r}: choose from {', '.join(['auto', *valid])}"
                )

    def check_platform(self, platform: str) -> None:
        """Refuses a backend compiled for another platform than `platform` ("cpu", "gpu",
        "tpu"): there it would only run interpreted."""
        for key in ("gated_delta_rule", "attention"):
            value = getattr(self, key)
            wanted = _PLATFORM.get(value)
            if wanted is not None and wanted != platform:
                raise ValueError(
                    f"kernels.{key}={value} is a {wanted.upper()} kernel, and this run compiles "
                    f"for {platform.upper()}, where it would run in the Pallas interpreter; "
                    f"use auto or a backend for {platform.upper()}"
                )

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Within the block, `backend="auto"` means this choice (at trace time)."""
        with contextlib.ExitStack() as stack:
            if self.gated_delta_rule != "auto":
                stack.enter_context(_gdn.auto_backend(self.gated_delta_rule))
            if self.attention != "auto":
                stack.enter_context(_attention.auto_backend(self.attention))
            yield

    @contextlib.contextmanager
    def exactly(self) -> Iterator[None]:
        """Within the block, `backend="auto"` means this choice and nothing else: pins of an
        enclosing block are lifted too (a program traced here is this choice's alone)."""
        stacks = (
            (_gdn_api._pins.names, self.gated_delta_rule),
            (_attention_api._pins.names, self.attention),
        )
        saved = [list(stack) for stack, _ in stacks]
        for stack, value in stacks:
            stack[:] = [] if value == "auto" else [value]
        try:
            yield
        finally:
            for (stack, _), old in zip(stacks, saved, strict=True):
                stack[:] = old


def current() -> KernelChoice:
    """The pins in force now: what `backend="auto"` means for a program traced at this point."""
    return KernelChoice(
        gated_delta_rule=_gdn_api._pins.top() or "auto",
        attention=_attention_api._pins.top() or "auto",
    )


def kernel_flags(args: object, platform: str) -> KernelChoice:
    """The `--attention-kernel` and `--gdn-kernel` flags of `args` (generate, chat, serve; absent
    flags mean "auto") as one choice, checked for `platform`; an error names the flag."""
    attention = getattr(args, "attention_kernel", "auto")
    gdn = getattr(args, "gdn_kernel", "auto")
    flags = {
        "--attention-kernel": KernelChoice(attention=attention),
        "--gdn-kernel": KernelChoice(gated_delta_rule=gdn),
    }
    for flag, choice in flags.items():
        try:
            choice.check_platform(platform)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    return KernelChoice(gated_delta_rule=gdn, attention=attention)
