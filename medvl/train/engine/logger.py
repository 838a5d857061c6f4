"""What a run reports: a progress bar, ``metrics.jsonl`` (one JSON record per log step,
appended as it goes so a killed run keeps its history and a resumed one continues it),
TensorBoard scalars when ``tensorboard`` is installed, and the loss curve as a PNG at the end
(when matplotlib is). Only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """``resume_step``: on a resumed run, records past the checkpoint's step (logged by the killed run after
    its last checkpoint, and about to be logged again) are cut from ``metrics.jsonl``, so each step appears
    once in the file, the loss curve and TensorBoard (whose writer purges them on the same step)."""

    def __init__(self, out: Path, *, fresh: bool, enabled: bool, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.write_text("")
        elif resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line torn by the kill
                    continue
            self.path.write_text("".join(x + "\n" for x in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step is not None and not fresh else None)
            except ImportError:  # tensorboard is optional (the train extra installs it)
                self.tb = None

    def log(self, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.close()
        plot_losses(self.path, self.path.parent / "training_loss.png")


def plot_losses(log_path: Path, png: Path) -> Path | None:
    """The loss curve from metrics.jsonl as a PNG, with the validation scores per epoch beside it when the
    run validated (skipped without matplotlib or records)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not log_path.exists():
        return None
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    if not rows:
        return None
    val_path = log_path.parent / "validation.jsonl"  # written when the run validates (engine.validate)
    val = [json.loads(x) for x in val_path.read_text().splitlines() if x.strip()] if val_path.exists() else []
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 3), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if val:
        vx = axes[0][1]
        names = [k for k in val[0] if k not in ("step", "epoch", "seconds", "best")]
        for k in names:
            vx.plot([r["epoch"] for r in val], [r.get(k) for r in val], marker="o", lw=1, label=k)
        vx.xaxis.get_major_locator().set_params(integer=True)
        vx.set_xlabel("epoch")
        vx.set_ylabel("validation")
        vx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png
