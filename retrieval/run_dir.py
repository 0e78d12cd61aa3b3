"""The run directory of a fine-tune run: what it holds on disk and how each file is written.

    model.safetensors + encoder.json   the kept epoch's encoder (see retrieval.encoder.saved)
    fingerprint                        that encoder's fingerprint, one line
    last.pt                            the state to resume from (tensors and plain values only)
    metrics.json                       the configuration and every epoch's figures
    train.log                          one line per event, timestamped
    curves.png                         loss and retrieval figures per epoch
    pairs.json + pairs.png             per epoch, the hardest positive / negative cosine of each anchor of the
                                       split that chooses the kept epoch, and their picture (retrieval.pairs)

The trainer decides what goes in; this module only reads and writes, atomically (temp file + rename), so a
run killed at any moment leaves the previous complete version of every file. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RetrievalError
from .files import atomic_path, save_figure, write_text_atomic

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .encoder import Encoder

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
METRICS = "metrics.json"
TRAIN_LOG = "train.log"
CURVES = "curves.png"
FINGERPRINT = "fingerprint"
CHECKPOINT_FORMAT = 1


class RunDir:
    """One run directory; `writer` is False on the ranks that only train (they log to the logger only)."""

    def __init__(self, out: Path, *, writer: bool = True):
        self.out = Path(out).expanduser()
        self.writer = writer

    def prepare(self, *, resume: bool) -> None:
        """Create the folder; refuse to overwrite a run by accident or to resume from nothing."""
        has_run = (self.out / CHECKPOINT).exists() or (self.out / METRICS).exists()
        if has_run and not resume:
            raise RetrievalError(
                f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if resume and not (self.out / CHECKPOINT).is_file():
            raise RetrievalError(f"{self.out / CHECKPOINT} not found: nothing to resume (drop --resume to start)")
        self.out.mkdir(parents=True, exist_ok=True)

    def log(self, message: str) -> None:
        """One line of train.log (rank 0); every line also goes to the module logger."""
        log.info(message)
        if self.writer:
            with (self.out / TRAIN_LOG).open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def save_encoder(self, encoder: Encoder) -> str:
        """The kept epoch's weights, encoder.json and fingerprint; returns the fingerprint."""
        from .encoder import save_encoder

        fingerprint = save_encoder(encoder, self.out)
        write_text_atomic(self.out / FINGERPRINT, fingerprint + "\n")
        return fingerprint

    def fingerprint(self) -> str | None:
        path = self.out / FINGERPRINT
        return path.read_text().strip() if path.exists() else None

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """last.pt: `payload` (tensors and plain values only, loadable with weights_only=True) + the format."""
        import torch

        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        """last.pt's payload; a typed error when it is unreadable or of another format."""
        import torch

        path = self.out / CHECKPOINT
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file raises many kinds (pickle, zip, OS errors)
            raise RetrievalError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]})") from None
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise RetrievalError(f"{path}: checkpoint format {payload.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        return payload

    def write_metrics(self, data: dict[str, Any]) -> None:
        write_text_atomic(self.out / METRICS, json.dumps(data, indent=2) + "\n")

    def write_curves(self, history: list[dict]) -> Path:
        return plot_curves(history, self.out / CURVES)

    def write_pairs(self, pairs: dict[str, tuple[np.ndarray, np.ndarray]], *, split: str, m: float,
                    margin: float) -> Path:
        """pairs.json ({"split", "m", "margin", "epochs": {epoch: {"s_n": [...], "s_p": [...]}}}) and pairs.png."""
        from .pairs import PAIRS_JSON, PAIRS_PNG, plot_pairs

        epochs = {e: {"s_n": [round(float(v), 6) for v in s_n], "s_p": [round(float(v), 6) for v in s_p]}
                  for e, (s_n, s_p) in pairs.items()}
        data = {"split": split, "m": m, "margin": margin, "epochs": epochs}
        write_text_atomic(self.out / PAIRS_JSON, json.dumps(data) + "\n")
        return plot_pairs({f"epoch {e}": v for e, v in pairs.items()}, self.out / PAIRS_PNG, m=m, margin=margin,
                          title=f"{split} anchors: hardest negative vs hardest positive cosine")

    def read_pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The epochs of pairs.json (empty when there is none), for a resumed run to extend."""
        from .pairs import PAIRS_JSON

        path = self.out / PAIRS_JSON
        if not path.is_file():
            return {}
        epochs = json.loads(path.read_text())["epochs"]
        import numpy as np

        return {e: (np.asarray(v["s_n"], dtype=np.float32), np.asarray(v["s_p"], dtype=np.float32))
                for e, v in epochs.items()}


def plot_curves(history: list[dict], png: Path) -> Path:
    """Loss (left) and Recall@K + MAP@R (right) per epoch; epoch 0 is the pretrained baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .eval_config import DEFAULT_KS

    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    trained = [row for row in history if row["loss"] is not None]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], "o-")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [r["epoch"] for r in history]
    for key in [f"recall@{k}" for k in DEFAULT_KS] + ["map@r"]:
        ax_rec.plot(epochs, [r[key] for r in history], "o-" if key != "map@r" else "s--", label=f"test {key}")
    if all(r.get("val") for r in history):
        for key in ("recall@1", "map@r"):
            ax_rec.plot(epochs, [r["val"][key] for r in history], ":", marker="x", label=f"validation {key}")
    ax_rec.set(xlabel="epoch (0 = pretrained)", ylabel="retrieval", title="Recall@K and MAP@R")
    ax_rec.legend(fontsize=8)
    for ax in (ax_loss, ax_rec):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)
