"""`qwenjax convert` and `tools/convert_checkpoint.py` run the same conversion end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwenjax.cli import main
from tests.checkpoint.conftest import read_all

REPO = Path(__file__).resolve().parents[2]


def test_cli_round_trip(hf_source, tmp_path):
    _, src = hf_source("text", "bfloat16")
    ours, back = tmp_path / "ours", tmp_path / "back"
    tool = [sys.executable, "tools/convert_checkpoint.py", str(src), str(ours)]
    subprocess.run(tool, cwd=REPO, check=True, capture_output=True)
    cli = [sys.executable, "-m", "qwenjax.cli", "convert", str(ours), str(back)]
    subprocess.run([*cli, "--max-shard-size", "40KB"], cwd=REPO, check=True, capture_output=True)
    assert read_all(back) == read_all(src)  # text layout: every tensor comes back


def test_cli_reports_errors(converted, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(converted()), str(tmp_path / "dst")])
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err
