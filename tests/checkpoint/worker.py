"""One conversion or load in a fresh process, for peak-memory and crash tests.

    python -m tests.checkpoint.worker {import,export,load} SRC [DST] [--kill-after N]

Prints `{"baseline": RSS after imports, "peak": max RSS}` (bytes) as its last line. The peak is
Linux's VmHWM, reset to the current RSS after imports (`getrusage`'s ru_maxrss would not do: it
keeps the parent's RSS at fork across exec). With `--kill-after N` the process SIGKILLs itself
after N tensors, like a crash or an OOM kill.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

from qwenjax.checkpoint import orbax_io
from qwenjax.checkpoint.convert import hf_to_qwenjax, load, qwenjax_to_hf
from qwenjax.checkpoint.progress import Progress


def _kill_after(n: int) -> None:
    update = Progress.update

    def counting_update(self: Progress, name: str, nbytes: int) -> None:
        update(self, name, nbytes)
        if self.tensors >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    Progress.update = counting_update
    orbax_io.BATCH_BYTES = 1  # one orbax write per parameter, so the kill lands mid-checkpoint


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("op", choices=["import", "export", "load"])
    parser.add_argument("src")
    parser.add_argument("dst", nargs="?")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--max-shard-size", default="50MB")
    args = parser.parse_args()
    if args.kill_after is not None:
        _kill_after(args.kill_after)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    baseline = _status_bytes("VmRSS")
    if args.op == "import":
        hf_to_qwenjax(args.src, args.dst, progress=False)
    elif args.op == "export":
        qwenjax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, progress=False)
    else:
        load(args.src)
    peak = _status_bytes("VmHWM")
    print(json.dumps({"baseline": baseline, "peak": peak}))


if __name__ == "__main__":
    main()
