"""The `histomim` command: subcommands listed and documented, the same functions as scripts/, and
`python -m histomim.cli` (what `accelerate launch -m histomim.cli` runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from histomim.cli import SUBCOMMANDS, main

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for name in ("tile", "pretrain", "extract", "survival", "benchmark"):
        assert f"  {name} " in listed, name
    assert main([]) == 2  # no command: usage, and a usage exit code


def test_unknown_subcommand_is_named(capsys):
    assert main(["pretrian"]) == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_explains_its_options(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: histomim {name}") and "--" in text


def test_module_entry_point_and_scripts_call_the_same_command():
    by_module = subprocess.run([sys.executable, "-m", "histomim.cli", "tile", "--help"], capture_output=True,
                               text=True, timeout=120)  # fmt: skip
    by_script = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "tile_slides.py"), "--help"],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert by_module.returncode == by_script.returncode == 0
    # the same parser: identical option text (the usage line differs by the program name)
    assert by_module.stdout.split("options:")[1] == by_script.stdout.split("options:")[1]
    assert by_module.stdout.startswith("usage: histomim tile")


def test_accelerate_launch_runs_the_module_entry_point(tmp_path):
    result = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "1", "-m", "histomim.cli",
                             "pretrain", "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: histomim pretrain" in result.stdout and "--demo" in result.stdout
