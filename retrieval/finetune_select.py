"""Which epoch a fine-tune run keeps, and what its log says about the choice (pure functions of the figures)."""

from __future__ import annotations

from .data.records import Record


def selection_key(metrics: dict, baseline: dict) -> tuple[bool, float, float]:
    """How epochs rank for the kept checkpoint: first whether Recall@1 is not below the pretrained baseline's
    (fine-tuning must not trade the nearest neighbour for a better ranking), then MAP@R (it ranks all R
    relevant items, so it is less noisy than the single-neighbour Recall@1 and is what an index serves), then
    Recall@1. If no epoch keeps Recall@1, the best MAP@R is kept and the log says Recall@1 was lost."""
    return metrics["recall@1"] >= baseline["recall@1"], metrics["map@r"], metrics["recall@1"]


def is_better(metrics: dict, best: dict | None, baseline: dict) -> bool:
    """Whether an evaluated epoch replaces the kept one (`best` None: nothing kept yet)."""
    return best is None or selection_key(metrics, baseline) > selection_key(best, baseline)


def recall_lost_warning(history: list[dict], kept: int | None, split: str = "test") -> str | None:
    """The warning for a run whose kept epoch lost the baseline's (epoch 0's) Recall@1 on the split that
    chose it (`history`: that split's figures per epoch), else None."""
    if kept is None or history[kept]["recall@1"] >= history[0]["recall@1"]:
        return None
    return (f"warning: no epoch kept the pretrained {split} Recall@1 ({history[0]['recall@1']:.4f}); kept epoch "
            f"{kept} (Recall@1 {history[kept]['recall@1']:.4f}, best MAP@R); try a lower --lr-backbone or fewer "
            f"--epochs")


def chosen_split(row: dict) -> dict:
    """The figures of an epoch that choose the kept epoch: the validation split's, else the test split's."""
    return row["val"] if row.get("val") is not None else row


def selection_note(chooser: str, val_records: list[Record], val_fraction: float) -> str:
    """The log line that says which split chooses the kept epoch, and why."""
    if chooser == "validation":
        names = sorted({r.class_name for r in val_records})
        return (f"the validation split ({len(names)} train classes held out: {', '.join(names[:8])}"
                f"{', ...' if len(names) > 8 else ''}) chooses the kept epoch and stops early; the test split "
                f"is only reported")
    why = "--val-fraction 0" if val_fraction == 0 else "too few train classes to hold some out"
    return f"no validation split ({why}): the test split chooses the kept epoch, so its figures are optimistic"
