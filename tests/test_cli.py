"""CLI skeleton: every command has help, errors are one line with exit != 0, --help stays light."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.output
        sub = runner.invoke(cli, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage:" in sub.output


def test_contract_commands_exist():
    assert {"make-dataset", "finetune", "index", "query", "eval"} <= set(cli.commands)


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert "circle-retrieval" in result.output


@pytest.mark.slow
def test_help_does_not_import_heavy_modules():
    code = (
        "import sys; sys.argv = ['cli.py', '--help']\n"
        "import cli\n"
        "try:\n    cli.cli.main(args=['--help'], standalone_mode=False)\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'faiss', 'open_clip', 'lmdb', 'fastapi', 'uvicorn', 'starlette')\n"
        "         if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    assert "HEAVY []" in out.stdout


@pytest.mark.slow
def test_bad_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    out = subprocess.run(
        [sys.executable, "cli.py", "eval", "--dataset", "cub", "--root", str(missing), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_out_of_range_train_fraction_is_a_usage_error():
    for command in (["finetune", "--dataset", "folder"], ["eval", "--dataset", "folder"]):
        result = CliRunner().invoke(cli, [*command, "--train-fraction", "1.5"])
        assert result.exit_code == 2 and "--train-fraction" in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
