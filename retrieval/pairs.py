"""Circle Loss's picture: where each anchor's hardest positive and hardest negative similarity lie.

For every anchor with at least one positive: s_p = its lowest cosine to an item of its class, s_n = its
highest cosine to an item of another class. Circle Loss (Sun et al., CVPR 2020) replaces the triplet
boundary s_p - s_n = m by the circle (s_n - 0)^2 + (s_p - 1)^2 = 2 m^2: centred at (s_n, s_p) = (0, 1),
radius sqrt(2) m, a definite target. Points inside the circle (and above the line) are anchors the loss
is done with; training moves the cloud up and to the left. `pairs.png` draws the cloud as a 2-D density,
one panel per epoch (or per run, side by side), with the circle and the line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

PAIRS_PNG = "pairs.png"
PAIRS_JSON = "pairs.json"
_MAX_PANELS = 6


def hardest_pairs(embeddings: np.ndarray, labels: np.ndarray, *, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(s_n, s_p) per anchor that has a positive, in index order: hardest negative and hardest positive
    cosines of L2-normalised `embeddings` (N, D). Anchors of a class with one item are left out; an anchor
    with no negative (a single class) gets s_n = -1. Memory O(block * N)."""
    import torch

    emb = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32))
    lab = torch.as_tensor(np.asarray(labels))
    s_n, s_p, keep = [], [], []
    for start in range(0, len(emb), block):
        sims = emb[start:start + block] @ emb.T
        same = lab[start:start + block, None] == lab[None, :]
        rows = torch.arange(start, min(start + block, len(emb)))
        same[rows - start, rows] = False                       # an item is not its own positive
        positive = sims.masked_fill(~same, math.inf).amin(dim=1)
        negative = sims.masked_fill(same, -math.inf)
        negative[rows - start, rows] = -math.inf
        s_p.append(positive)
        s_n.append(negative.amax(dim=1).clamp(min=-1.0))
        keep.append(same.any(dim=1))
    mask = torch.cat(keep)
    return torch.cat(s_n)[mask].numpy(), torch.cat(s_p)[mask].numpy()


def plot_pairs(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], png: Path, *, m: float, margin: float,
               title: str = "") -> Path:
    """One density panel per entry (title -> (s_n, s_p)), at most 6 (the first, the last, evenly between),
    each with the circle (centre (0, 1), radius sqrt(2) m) and the triplet line s_p - s_n = margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    from .files import save_figure

    names = list(panels)
    if len(names) > _MAX_PANELS:
        picks = sorted({round(i * (len(names) - 1) / (_MAX_PANELS - 1)) for i in range(_MAX_PANELS)})
        names = [names[i] for i in picks]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 0.6, 2.9), dpi=80, squeeze=False,
                             sharex=True, sharey=True)
    for ax, name in zip(axes[0], names, strict=True):
        s_n, s_p = panels[name]
        ax.hist2d(s_n, s_p, bins=40, range=[[-0.2, 1.0], [0.0, 1.2]], cmap="Blues", cmin=1)
        ax.add_patch(Circle((0.0, 1.0), math.sqrt(2) * m, fill=False, color="crimson", lw=1.5))
        line = np.array([-0.2, 1.0])
        ax.plot(line, line + margin, "--", color="darkorange", lw=1.2)
        ax.plot(np.median(s_n), np.median(s_p), "k+", ms=9)
        ax.set(xlim=(-0.2, 1.0), ylim=(0.0, 1.2), aspect="equal", xlabel="s_n (hardest negative)",
               title=f"{name}\nmedian s_p-s_n {np.median(s_p - s_n):+.3f}")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("s_p (hardest positive)")
    handles = [plt.Line2D([], [], color="crimson", lw=1.5), plt.Line2D([], [], color="darkorange", ls="--")]
    fig.legend(handles, [f"circle: centre (0,1), r = sqrt(2)*{m:g}", f"triplet: s_p - s_n = {margin:g}"],
               loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_figure(fig, png)
