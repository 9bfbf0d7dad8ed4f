"""Plots saved next to the artifacts (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(history: list[dict[str, float]], path: Path) -> None:
    """Training loss and validation recall per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    for key in ("val_recall@10", "val_recall@100"):
        if key in history[0]:
            recall_ax.plot(epochs, [h[key] for h in history], marker="o", label=key.removeprefix("val_"))
    recall_ax.set(title="validation (full catalogue)", xlabel="epoch", ylabel="recall")
    recall_ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(results: dict[str, dict], ks: tuple[int, ...], out_dir: Path) -> None:
    """Recall@K against K for every configuration, and training loss per epoch for the trained ones."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in results.items():
        ax.plot(ks, [values[f"recall@{k}"] for k in ks], marker="o", label=name)
    ax.set(title="Recall@K, full catalogue", xlabel="K", ylabel="recall", xscale="log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "recall_at_k.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in results.items():
        if "history" in values:
            ax.plot([h["epoch"] for h in values["history"]], [h["loss"] for h in values["history"]], marker="o", label=name)
    ax.set(title="training loss per epoch", xlabel="epoch", ylabel="loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "training_loss.png", dpi=110)
    plt.close(fig)
