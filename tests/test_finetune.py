"""Fine-tuning on a tiny generated set with the tiny ViT: artefacts, loss going down, resume (exact), Ctrl-C
(an injected KeyboardInterrupt and a real SIGINT to the CLI), and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.data import load_records, split_records
from retrieval.data.generate import GenerateConfig, make_dataset
from retrieval.data.records import carve_validation
from retrieval.embed import embed_records, evaluate_records
from retrieval.encoder import load_encoder, save_encoder
from retrieval.errors import RetrievalError
from retrieval.finetune import TrainingInterrupted, run_finetune
from retrieval.finetune_config import AUTO_LOCKED, FinetuneConfig, default
from retrieval.finetune_select import is_better, recall_lost_warning
from retrieval.finetune_setup import lr_factor
from retrieval.run_dir import CHECKPOINT
from tests.signals import default_sigint

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ("model.safetensors", "encoder.json", "fingerprint", "metrics.json", "train.log", "curves.png", CHECKPOINT)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP spinning makes them slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """6 classes x 8 images at 48 px: 3 train classes (24 images, 2 P x K batches of 3 x 4), 3 test classes."""
    return Path(make_dataset(GenerateConfig(out_dir=tmp_path_factory.mktemp("birds"), classes=6, per_class=8,
                                            size=48)).root)


TINY_CNN = "tiny-cnn-finetune-test"
TINY_CNN_CFG = {  # timm's 0.1M-parameter test EfficientNet as an open_clip timm tower: has BatchNorm, 32 px
    "embed_dim": 256,
    "vision_cfg": {"timm_model_name": "test_efficientnet", "timm_model_pretrained": False, "timm_pool": "avg",
                   "timm_proj": "none", "image_size": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random CNN saved as a run directory (a spec torchrun's fresh processes can load too).

    A CNN rather than conftest's tiny ViT: it has BatchNorm, whose statistics fine-tuning must keep.
    """
    import open_clip

    out = tmp_path_factory.mktemp("tiny")
    config = out.parent / f"{TINY_CNN}.json"
    config.write_text(json.dumps(TINY_CNN_CFG))
    open_clip.add_model_config(config)
    save_encoder(load_encoder(f"{TINY_CNN}:none", embed_dim=16), out)
    return out


def _config(data: Path, tiny_dir: Path, out: Path, **kw) -> FinetuneConfig:
    """Fast settings: 2 steps of 3 x 4 per epoch, no frozen phase, constant rates, no worker processes."""
    base = FinetuneConfig(out=out, dataset="cub", root=data, model=str(tiny_dir), p=3, k=4, epochs=4,
                          lr_backbone=1e-4, lr_head=1e-3, warmup_epochs=0, schedule="constant",
                          freeze_backbone_epochs=0, locked_groups=0, workers=0, device="cpu", eval_batch_size=16)
    return replace(base, **kw)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The encoder state in a run's last.pt (or, for a saved encoder directory, its safetensors)."""
    if (run / CHECKPOINT).exists():
        return torch.load(run / CHECKPOINT, weights_only=True)["encoder"]
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _changed(a: dict, b: dict, *, part: str) -> set[bool]:
    """For every tensor whose name contains `part` ("head." matches the head only): whether it differs."""
    names = [n for n in a if n.startswith(part)] if part == "head." else [n for n in a if part in n]
    assert names, part
    return {not torch.equal(a[name], b[name]) for name in names}


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["epochs"]


def test_short_finetune_lowers_the_loss_and_writes_every_artefact(data, tiny_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_finetune(_config(data, tiny_dir, out, epochs=5), progress=False)

    assert {p.name for p in out.iterdir()} >= set(ARTEFACTS)
    history = _history(out)
    assert [row["epoch"] for row in history] == list(range(6))
    assert history[0]["loss"] is None                                  # epoch 0: the untouched baseline
    losses = [row["loss"] for row in history[1:]]
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    for row in history:
        assert {"recall@1", "recall@2", "recall@4", "recall@8", "map@r"} <= set(row)
    log = (out / "train.log").read_text()
    assert all(f"epoch {e}:" in log for e in range(6))
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # The saved weights are the best epoch's: reload them and recompute its metrics on the test split.
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best_epoch"]
    assert summary.best_epoch == best and best >= 1
    keeps_recall = [row for row in history[1:] if row["recall@1"] >= history[0]["recall@1"]]
    assert history[best]["map@r"] == max(row["map@r"] for row in keeps_recall or history[1:])
    assert ("warning: no epoch kept the pretrained Recall@1" in log) == (not keeps_recall)
    encoder = load_encoder(str(out))
    assert encoder.fingerprint() == (out / "fingerprint").read_text().strip() == summary.fingerprint
    test = split_records(load_records("cub", data), "test")
    again = evaluate_records(encoder, test, batch_size=7).metrics
    assert again["recall@1"] == pytest.approx(history[best]["recall@1"])
    assert again["map@r"] == pytest.approx(history[best]["map@r"], abs=1e-6)

    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)     # tensors and plain values only
    assert checkpoint["epoch"] == 5 and checkpoint["step"] == 0
    before, after = _weights(tiny_dir), checkpoint["encoder"]
    assert _changed(before, after, part="conv") == {True}             # the trunk trained...
    assert _changed(before, after, part="running_") == {False}        # ...but kept its BatchNorm statistics
    with pytest.raises(RetrievalError, match="--resume"):            # never overwrite a run by accident
        run_finetune(_config(data, tiny_dir, out), progress=False)


def test_the_eval_crop_is_used_by_every_evaluation_saved_with_the_weights_and_kept_on_resume(data, tiny_dir,
                                                                                             tmp_path):
    out = tmp_path / "run"
    run_finetune(_config(data, tiny_dir, out, epochs=1, crop_pct=0.5, head_init="fixed"), progress=False)
    assert json.loads((out / "encoder.json").read_text())["config"]["crop_pct"] == 0.5
    baseline = _history(out)[0]
    test = split_records(load_records("cub", data), "test")
    pretrained = evaluate_records(load_encoder(str(tiny_dir), crop_pct=0.5), test, batch_size=7).metrics
    assert baseline["map@r"] == pytest.approx(pretrained["map@r"], abs=1e-6)
    with pytest.raises(RetrievalError, match="crop_pct 0.5 -> 0.75"):
        run_finetune(_config(data, tiny_dir, out, epochs=2, crop_pct=0.75, head_init="fixed", resume=True),
                     progress=False)


def test_frozen_backbone_epochs_train_only_the_head_and_train_bn_updates_statistics(data, tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_finetune(_config(data, tiny_dir, out, epochs=1, freeze_backbone_epochs=1, freeze_bn=False), progress=False)
    before, after = _weights(tiny_dir), _weights(out)
    assert _changed(before, after, part="head.") == {True}
    assert _changed(before, after, part="conv") == {False}
    assert True in _changed(before, after, part="running_mean")     # --train-bn: batch statistics flow in


def test_locked_groups_freeze_the_towers_first_groups(data, tiny_dir, tmp_path):
    """test_efficientnet's 6 groups: stem, blocks.0 ... blocks.3, blocks.4 + conv_head. By default half of
    them (3, below AUTO_LOCKED) stay frozen; an explicit count is taken as given."""
    from retrieval.finetune_setup import locked_groups

    assert [locked_groups(None, n) for n in (None, 6, 17, 40)] == [0, 3, AUTO_LOCKED, AUTO_LOCKED]
    assert locked_groups(4, 6) == 4 and locked_groups(0, 17) == 0
    out = tmp_path / "run"
    run_finetune(_config(data, tiny_dir, out, epochs=1, locked_groups=None), progress=False)
    before, after = _weights(tiny_dir), _weights(out)
    for frozen in ("conv_stem", "blocks.0.", "blocks.1."):
        assert _changed(before, after, part=frozen) == {False}, frozen
    for trained in ("blocks.2.0.conv_exp", "blocks.3.0.conv_pw", "blocks.4.0.conv_pw", "conv_head", "head."):
        assert _changed(before, after, part=trained) == {True}, trained
    assert "first 3 of 6 layer groups stay frozen" in (out / "train.log").read_text()
    with pytest.raises(RetrievalError, match="locked groups"):
        run_finetune(_config(data, tiny_dir, tmp_path / "bad", locked_groups=-1), progress=False)


def test_locked_groups_on_a_vit_tower_follow_open_clips_grouping(tiny_model_spec):
    """A 2-block ViT: stem, block 0, block 1 + ln_post, proj = 4 groups; locking 2 leaves block 1 on."""
    encoder = load_encoder(tiny_model_spec)
    assert encoder.layer_groups() == 4
    encoder.lock_tower(2)
    trainable = {name.split(".")[0] + (name.split(".")[2] if name.startswith("transformer.") else "")
                 for name, p in encoder.visual.named_parameters() if p.requires_grad}
    assert trainable == {"transformer1", "ln_post", "proj"}


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(data, tiny_dir, tmp_path):
    straight = tmp_path / "straight"
    run_finetune(_config(data, tiny_dir, straight, epochs=3), progress=False)
    split = tmp_path / "split"
    run_finetune(_config(data, tiny_dir, split, epochs=1), progress=False)
    first = _history(split)
    run_finetune(_config(data, tiny_dir, split, epochs=3, resume=True), progress=False)

    history = _history(split)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert history[:2] == first                                      # the saved epochs are kept, not redone
    assert "resumed from" in (split / "train.log").read_text()
    a = torch.load(straight / CHECKPOINT, weights_only=True)["encoder"]
    b = torch.load(split / CHECKPOINT, weights_only=True)["encoder"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    with pytest.raises(RetrievalError, match="p 3 -> 2"):             # a different batch layout cannot resume
        run_finetune(_config(data, tiny_dir, split, epochs=4, p=2, resume=True), progress=False)


def test_resuming_with_other_locked_groups_is_one_line_from_the_cli(data, tiny_dir, tmp_path):
    """The optimiser state depends on which groups train: a changed --locked-groups names itself, exit 1."""
    from click.testing import CliRunner

    from cli import cli

    out = tmp_path / "run"
    fast = ("--steps-per-epoch", "1")
    assert CliRunner().invoke(cli, _finetune_args(data, tiny_dir, out, "--epochs", "1", *fast,
                                                  "--locked-groups", "0")).exit_code == 0
    result = CliRunner().invoke(cli, _finetune_args(data, tiny_dir, out, "--epochs", "2", *fast, "--resume",
                                                    "--locked-groups", "2"))
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "cannot resume with different settings: locked_groups 0 -> 2" in line


def test_a_saved_state_that_no_longer_fits_is_one_error_not_a_torch_traceback(tmp_path):
    from retrieval.finetune_resume import TrainState, restore, state_payload

    two = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    saved = torch.optim.AdamW([{"params": two[:1]}, {"params": two[1:]}])
    payload = state_payload(TrainState(epoch=1), {"p": 3}, {"optimizer": saved})
    now = torch.optim.AdamW([{"params": two}])                      # one group where the checkpoint has two
    with pytest.raises(RetrievalError, match=r"saved optimizer state does not fit this run \(") as info:
        restore(payload, tmp_path / "last.pt", {"p": 3}, {"optimizer": now})
    assert "\n" not in str(info.value)
    assert restore(payload, tmp_path / "last.pt", {"p": 3}, {"optimizer": saved}).epoch == 1


def test_keyboard_interrupt_mid_epoch_saves_a_checkpoint_that_resumes(data, tiny_dir, tmp_path, monkeypatch):
    from retrieval.data.dataset import ImageDataset

    out = tmp_path / "run"
    original = ImageDataset.__getitem__
    calls = {"n": 0}
    # The PCA head reads the 24 train images; epoch 0 evaluates 24 test images; epoch 1 trains 24 and evaluates
    # 24; stop inside epoch 2's 2nd batch.
    stop_at = 24 + 24 + 48 + 12 + 5

    def interrupting(self, index):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", interrupting)
    with pytest.raises(TrainingInterrupted, match="resume with --resume"):
        run_finetune(_config(data, tiny_dir, out, epochs=3), progress=False)
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 1)                 # epoch 1 done, one batch of epoch 2

    monkeypatch.setattr(ImageDataset, "__getitem__", original)
    run_finetune(_config(data, tiny_dir, out, epochs=3, resume=True), progress=False)
    assert [row["epoch"] for row in _history(out)] == [0, 1, 2, 3]


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _finetune_args(data: Path, tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--dataset", "cub", "--root", str(data), "--model", str(tiny_dir), "--out", str(out),
            "-P", "3", "-K", "4", "--workers", "0", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.slow
def test_sigint_to_the_cli_saves_state_and_resume_finishes(data, tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(*_finetune_args(data, tiny_dir, out, "--epochs", "1000")), cwd=ROOT,
                            env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_sigint)  # as from a terminal, even if pytest ignores it
    try:
        log = out / "train.log"
        deadline = time.monotonic() + 240
        while proc.poll() is None and not (log.exists() and "epoch 1:" in log.read_text()):   # one epoch done
            assert time.monotonic() < deadline, "no epoch finished within 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:   # show where it hangs: faulthandler dumps every thread on SIGABRT
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"no exit within 120 s of SIGINT; stderr:\n{proc.communicate(timeout=30)[1][-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "resume with --resume" in err.strip().splitlines()[-1]
    done = torch.load(out / CHECKPOINT, weights_only=True)["epoch"]
    assert done >= 1

    # The same settings as the CLI call (its defaults are FinetuneConfig's), one more epoch.
    cfg = FinetuneConfig(out=out, dataset="cub", root=data, model=str(tiny_dir), p=3, k=4, workers=0, device="cpu",
                         epochs=done + 1, resume=True)
    assert run_finetune(cfg, progress=False).epochs == done + 1
    assert [row["epoch"] for row in _history(out)] == list(range(done + 2))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(data, tiny_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "cli.py"), *_finetune_args(data, tiny_dir, out, "--epochs", "2", "--json")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)                               # rank 0 alone prints one summary
    assert summary["epochs"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["world_size"] == 2
    assert [row["epoch"] for row in metrics["epochs"]] == [0, 1, 2]
    # 24 train images = 2 batches of 3 x 4: one per rank, so each epoch trains on all 24 images once.
    assert all(row["images_per_s"] > 0 for row in metrics["epochs"][1:])
    assert {p.name for p in out.iterdir()} >= set(ARTEFACTS)
    assert (out / "train.log").read_text().count("epoch 1:") == 1        # written once, by rank 0
    assert load_encoder(str(out)).fingerprint() == summary["fingerprint"]


def test_help_lists_every_loss_with_the_papers_defaults():
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(cli, ["finetune", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for fragment in ("circle", "class-circle", "triplet", "contrastive", "m=0.4, gamma=80.0", "m=0.25, gamma=256.0"):
        assert fragment in text, fragment


def test_lr_schedule_warms_up_linearly_then_follows_a_half_cosine():
    factors = [lr_factor(s, total=10, warmup=2, schedule="cosine") for s in range(11)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0) and factors[6] == pytest.approx(0.5) and factors[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert lr_factor(7, total=10, warmup=2, schedule="constant") == 1.0


def test_kept_epoch_is_the_best_map_at_r_among_epochs_that_keep_the_baseline_recall_at_1():
    baseline = {"recall@1": 0.9429, "map@r": 0.6934}
    epochs = [{"recall@1": 0.9413, "map@r": 0.7142},    # best MAP@R, but loses Recall@1
              {"recall@1": 0.9435, "map@r": 0.7015},    # keeps Recall@1: wins
              {"recall@1": 0.9359, "map@r": 0.6995}]
    kept = None
    for row in epochs:
        kept = row if is_better(row, kept, baseline) else kept
    assert kept is epochs[1]
    assert is_better({"recall@1": 0.9429, "map@r": 0.70}, epochs[1], baseline) is False   # equal R@1 counts as kept
    assert is_better({"recall@1": 0.9429, "map@r": 0.71}, epochs[1], baseline) is True
    # When no epoch keeps Recall@1, the best MAP@R among them is kept, with a warning.
    kept = None
    for row in (epochs[0], epochs[2]):
        kept = row if is_better(row, kept, baseline) else kept
    assert kept is epochs[0]
    history = [baseline, *epochs]
    assert "kept epoch 1 (Recall@1 0.9413" in recall_lost_warning(history, 1)
    assert recall_lost_warning(history, 2) is None and recall_lost_warning(history, None) is None


@pytest.fixture(scope="module")
def small_run(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(data, run) of a run with the defaults (P 16, K 4, validation 0.1, PCA head) on a set too small for
    them: 8 classes x 3 images -> 4 train classes, of which 2 go to validation; 2 epochs, 32 px tiny CNN."""
    data = Path(make_dataset(GenerateConfig(out_dir=tmp_path_factory.mktemp("small"), classes=8, per_class=3,
                                            size=48)).root)
    out = tmp_path_factory.mktemp("small-run") / "run"
    run_finetune(FinetuneConfig(out=out, dataset="cub", root=data, model=str(tiny_dir), epochs=2, workers=0,
                                device="cpu"), progress=False)
    return data, out


def test_a_small_data_set_trains_with_the_defaults(small_run):
    _, out = small_run
    log = (out / "train.log").read_text()
    assert "P lowered from 16 to 2: the train split has 2 classes with 2+ images; 2 of them have fewer than K=4 " \
           "images and are sampled with replacement" in log
    assert log.count("P lowered") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_on"] == "validation" and "the validation split (2 train classes held out" in log
    history = metrics["epochs"]
    assert [row["epoch"] for row in history] == [0, 1, 2] and all(row["images_per_s"] for row in history[1:])
    # the kept epoch is chosen on validation figures alone (the same rule as before, applied to them)
    val = [row["val"] for row in history]
    keeps = [e for e in (1, 2) if val[e]["recall@1"] >= val[0]["recall@1"]] or [1, 2]
    assert metrics["best_epoch"] == max(keeps, key=lambda e: (val[e]["map@r"], val[e]["recall@1"], -e))
    assert val[0]["n_queries"] == 6 and history[0]["n_queries"] == 12       # 2 validation / 4 test classes x 3


def test_pairs_plot_is_written_and_its_points_are_the_recomputed_hardest_similarities(small_run, tiny_dir):
    data, out = small_run
    with open(out / "pairs.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs["split"] == "validation" and set(pairs["epochs"]) == {"0", "1", "2"}
    assert pairs["m"] == 0.4                                                # circle's default m
    # Recompute epoch 2 from the last state: the validation classes carved again, embedded, every pair looped.
    _, val = carve_validation(split_records(load_records("cub", data), "train"), default("val_fraction"), seed=0)
    encoder = load_encoder(str(tiny_dir))
    encoder.load_state_dict(torch.load(out / CHECKPOINT, weights_only=True)["encoder"])
    embeddings, labels = embed_records(encoder, val, batch_size=5)
    expected_n, expected_p = [], []
    for i in range(len(val)):
        sims = [float(np.dot(embeddings[i], embeddings[j])) for j in range(len(val)) if j != i]
        same = [labels[j] == labels[i] for j in range(len(val)) if j != i]
        expected_p.append(min(s for s, hit in zip(sims, same, strict=True) if hit))
        expected_n.append(max(s for s, hit in zip(sims, same, strict=True) if not hit))
    np.testing.assert_allclose(pairs["epochs"]["2"]["s_p"], expected_p, atol=2e-5)
    np.testing.assert_allclose(pairs["epochs"]["2"]["s_n"], expected_n, atol=2e-5)


def test_validation_stops_early_after_patience_epochs_without_a_better_one(tiny_dir, tmp_path):
    """Zero learning rates: every epoch equals the first, so with patience 1 epoch 2 is the last trained."""
    data = Path(make_dataset(GenerateConfig(out_dir=tmp_path / "d", classes=12, per_class=4, size=48)).root)
    out = tmp_path / "run"
    result = run_finetune(_config(data, tiny_dir, out, epochs=5, val_fraction=0.4, patience=1, lr_backbone=0.0,
                                  lr_head=0.0), progress=False)
    assert result is not None and result.epochs == 2 and result.best_epoch == 1 and result.selected_on == "validation"
    assert "early stop: no better validation epoch in the 1 epoch(s) after epoch 1" in (out / "train.log").read_text()
    assert result.validation is not None and result.validation["best"] == result.validation["baseline"]


def test_resume_compares_the_settings_a_checkpoint_records_and_skips_newer_ones():
    from retrieval.finetune_resume import resume_changes

    now = {"p": 3, "locked_groups": 2, "tta": "flip"}
    assert resume_changes({"p": 3, "locked_groups": 0, "tta": "none"}, now) == ["locked_groups 0 -> 2",
                                                                              "tta 'none' -> 'flip'"]
    assert resume_changes({"p": 3, "locked_groups": 2}, now) == []   # made before tta existed
