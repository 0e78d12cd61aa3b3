"""Shared fixtures. `tiny_model_spec`: an open_clip ViT small enough for unit tests, as an encoder spec."""

from __future__ import annotations

import json

import pytest

TINY_MODEL = "tiny-vit-test"
TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True, scope="session")
def engine_cache(tmp_path_factory):
    """Exported ONNX graphs (the default fp32 engine's) go to a folder of this test session, shared by its tests
    and the commands they start, never to the user's ~/.cache."""
    from retrieval.encoder.engine import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("engine-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory) -> str:
    """Register the tiny ViT (32 px, patch 8, width 32, 2 layers; 32-d output) with open_clip."""
    import open_clip

    if open_clip.get_model_config(TINY_MODEL) is None:
        path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_MODEL}.json"
        path.write_text(json.dumps(TINY_MODEL_CFG))
        open_clip.add_model_config(path)
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_model_spec(tiny_model_name) -> str:
    """Encoder spec of the tiny ViT with random (deterministic) weights: "tiny-vit-test:none"."""
    return f"{tiny_model_name}:none"


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_spec, tmp_path_factory):
    """The tiny ViT saved as a run directory (8-d embeddings): a --model that subprocesses can load too."""
    from tests.index_support import save_run

    return save_run(tiny_model_spec, tmp_path_factory.mktemp("tiny-run") / "run")


@pytest.fixture(scope="module")
def single_thread_torch():
    """torch on one thread for the module (tiny models lose time to thread hand-offs on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
