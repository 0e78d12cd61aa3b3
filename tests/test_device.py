"""--device: one rule (auto -> cuda when present, else cpu) for finetune, index, query and serve."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from retrieval.device import resolve_device
from retrieval.errors import RetrievalError


def test_auto_is_cuda_exactly_when_cuda_is_available():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_explicit_cuda_without_a_gpu_is_an_error_that_says_what_to_do():
    with pytest.raises(RetrievalError, match="CUDA is not available; use --device cpu"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("command", ["index", "query", "serve", "finetune"])
def test_auto_is_the_default_device(command):
    out = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert out.exit_code == 0
    line = next(line for line in out.output.splitlines() if "--device" in line)
    block = out.output[out.output.index(line):].split("\n  -")[0]
    assert "auto" in block and "[default: auto]" in " ".join(block.split())
