"""Plots saved next to the artifacts (PNG) and returned, so notebooks show the same figure.

Figures are built without pyplot: no global backend is switched, so a notebook's
inline backend stays in charge and the CLI needs no display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from twotower.store.artifacts import RecipeData, Split


def _save(fig: Figure, path: Path | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def plot_training(history: list[dict[str, float]], path: Path | None = None) -> Figure:
    """Training loss and validation recall per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    loss_ax, recall_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss")
    for key in ("val_recall@10", "val_recall@100"):
        if history and key in history[0]:  # a warm start of 0 epochs has no history
            recall_ax.plot(epochs, [h[key] for h in history], marker="o", label=key.removeprefix("val_"))
    recall_ax.set(title="validation (full catalogue)", xlabel="epoch", ylabel="recall")
    if history:
        recall_ax.legend()
    for ax in (loss_ax, recall_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def plot_data_overview(
    data: RecipeData, split: Split, path: Path | None = None, item_category: str | None = "genres"
) -> Figure:
    """Rating values, ratings per user, item popularity (long tail) and, when ``item_category``
    names a categorical item feature (single or multi-valued), items per category."""
    inter = data.interactions
    fig = Figure(figsize=(12, 8))
    (ratings_ax, users_ax), (items_ax, genres_ax) = fig.subplots(2, 2)
    inter["rating"].value_counts().sort_index().plot.bar(ax=ratings_ax, color="tab:blue")
    ratings_ax.set(title="rating values", xlabel="rating", ylabel="ratings")
    per_user = inter.groupby("user_id").size()
    users_ax.hist(per_user, bins=np.geomspace(per_user.min(), per_user.max() + 1, 40))
    users_ax.set(title="ratings per user", xlabel="ratings (log)", ylabel="users", xscale="log")
    popularity = split.train["item_id"].value_counts().to_numpy()
    items_ax.loglog(np.arange(1, len(popularity) + 1), popularity)
    items_ax.set(title="training positives per item, by rank", xlabel="item rank (log)", ylabel="positives (log)")
    if item_category:
        data.items[item_category].explode().value_counts().head(20).sort_values().plot.barh(
            ax=genres_ax, color="tab:green"
        )
        genres_ax.set(title=f"items per {item_category} (top 20)", xlabel="items")
    else:
        genres_ax.set_axis_off()
    return _save(fig, path)


def plot_projection(
    coords: np.ndarray, labels: pd.Series | np.ndarray, title: str, path: Path | None = None, top_labels: int = 8
) -> Figure:
    """2-D points coloured by label; the ``top_labels`` (at most 9) most frequent labels get
    colours, the rest is light grey."""
    palette = [colormaps["tab10"](i) for i in range(10) if i != 7]  # tab10 without its grey
    if top_labels > len(palette):
        raise ValueError(f"at most {len(palette)} labels can get distinct colours")
    labels = pd.Series(np.asarray(labels))
    shown = labels.value_counts().index[:top_labels]
    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    rest = ~labels.isin(shown).to_numpy()
    if rest.any():
        ax.scatter(coords[rest, 0], coords[rest, 1], s=4, color="lightgrey", label=f"other ({rest.sum()})")
    for name, colour in zip(shown, palette):
        mask = (labels == name).to_numpy()
        ax.scatter(coords[mask, 0], coords[mask, 1], s=6, color=colour, label=f"{name} ({mask.sum()})")
    ax.set(title=title, xlabel="component 1", ylabel="component 2")
    ax.legend(markerscale=3, fontsize="small", loc="best")
    return _save(fig, path)


def plot_quality(results: dict[str, dict], ks: tuple[int, ...], out_dir: Path) -> tuple[Figure, Figure]:
    """Recall@K against K for every configuration, and training loss per epoch for the trained ones."""
    recall = Figure(figsize=(6, 4))
    ax = recall.subplots()
    for name, values in results.items():
        ax.plot(ks, [values[f"recall@{k}"] for k in ks], marker="o", label=name)
    ax.set(title="Recall@K, full catalogue", xlabel="K", ylabel="recall", xscale="log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=7)

    loss = Figure(figsize=(6, 4))
    ax = loss.subplots()
    for name, values in results.items():
        if "history" in values:
            ax.plot(
                [h["epoch"] for h in values["history"]], [h["loss"] for h in values["history"]], marker="o", label=name
            )
    ax.set(title="training loss per epoch", xlabel="epoch", ylabel="loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return _save(recall, out_dir / "recall_at_k.png"), _save(loss, out_dir / "training_loss.png")


def plot_model_tradeoff(rows: dict[str, dict], path: Path | None = None) -> Figure:
    """Recall@100 against serving p50 and against trainable parameters, one point per model."""
    fig = Figure(figsize=(12, 4.5))
    latency_ax, params_ax = fig.subplots(1, 2)
    for name, row in rows.items():
        if row.get("serving_p50_ms") is not None:
            latency_ax.scatter(row["serving_p50_ms"], row["recall@100"])
            latency_ax.annotate(
                name, (row["serving_p50_ms"], row["recall@100"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        if row.get("params"):
            params_ax.scatter(row["params"], row["recall@100"])
            params_ax.annotate(
                name, (row["params"], row["recall@100"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    latency_ax.set(
        title="effectiveness vs serving latency",
        xlabel="Triton p50, single user, concurrency 1 (ms)",
        ylabel="test Recall@100",
    )
    params_ax.set(
        title="effectiveness vs size", xlabel="trainable parameters (log)", ylabel="test Recall@100", xscale="log"
    )
    return _save(fig, path)


def plot_scale(report: dict, path: Path | None = None) -> Figure:
    """Triton p50 (concurrency 1) and measured memory per item against catalogue size, per index kind."""
    fig = Figure(figsize=(12, 4.5))
    latency_ax, memory_ax = fig.subplots(1, 2)
    kinds = sorted({kind for rows in report["sizes"].values() for kind in rows})
    for kind in kinds:
        sizes = [int(n) for n, rows in report["sizes"].items() if kind in rows]
        rows = [report["sizes"][str(n)][kind] for n in sizes]
        latency_ax.plot(sizes, [r["p50_ms_triton"] for r in rows], marker="o", label=kind)
        memory_ax.plot(sizes, [r["memory_bytes"] / 2**20 for r in rows], marker="o", label=kind)
    latency_ax.set(
        title="served latency",
        xlabel="catalogue items (log)",
        ylabel="Triton p50, single user, concurrency 1 (ms, log)",
        xscale="log",
        yscale="log",
    )
    memory_ax.set(
        title="index memory (measured heap growth)",
        xlabel="catalogue items (log)",
        ylabel="MiB (log)",
        xscale="log",
        yscale="log",
    )
    for ax in (latency_ax, memory_ax):
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_train_benchmark(report: dict, labels: dict[str, str], path: Path | None = None) -> Figure:
    """Training examples per second of each side (``labels``: report key -> label), and one
    epoch of the recipe against the number of training interactions."""
    fig = Figure(figsize=(12, 4.5))
    speed_ax, scale_ax = fig.subplots(1, 2)
    speed_ax.barh(list(labels.values()), [report[side]["examples_per_s"] for side in labels], color="tab:blue")
    speed_ax.set(title=f"training throughput, batch {report['batch_size']}", xlabel="examples per second")
    scale = report["scale"]
    interactions = [row["interactions"] for row in scale.values()]
    scale_ax.plot(interactions, [row["epoch_s"] for row in scale.values()], marker="o")
    for name, row in scale.items():
        scale_ax.annotate(
            name, (row["interactions"], row["epoch_s"]), fontsize=8, xytext=(4, -10), textcoords="offset points"
        )
    scale_ax.set(title="one epoch of the recipe against data size", xlabel="training interactions", ylabel="epoch (s)")
    return _save(fig, path)


def plot_replay(rows: list[dict], path: Path | None = None) -> Figure:
    """Per replay step and way of retraining: Recall@10 and Recall@100 on the next slice, and the
    wall seconds the retrain took."""
    fig = Figure(figsize=(15, 4.5))
    recall10_ax, recall100_ax, seconds_ax = fig.subplots(1, 3)
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    timed_arms = [arm for arm in arms if any(row["arm"] == arm and row["wall_seconds"] is not None for row in rows)]
    width = 0.8 / len(timed_arms)
    for arm in arms:
        mine = [row for row in rows if row["arm"] == arm]
        steps = [row["step"] for row in mine]
        recall10_ax.plot(steps, [row["recall@10"] for row in mine], marker="o", label=arm)
        recall100_ax.plot(steps, [row["recall@100"] for row in mine], marker="o", label=arm)
    for position, arm in enumerate(timed_arms):
        timed = [row for row in rows if row["arm"] == arm and row["wall_seconds"] is not None]
        offset = (position - (len(timed_arms) - 1) / 2) * width
        seconds_ax.bar(
            [row["step"] + offset for row in timed], [row["wall_seconds"] for row in timed], width, label=arm
        )
    recall10_ax.set(title="Recall@10 on the next slice", xlabel="step (cutoff advanced by one slice)", ylabel="recall")
    recall100_ax.set(
        title="Recall@100 on the next slice", xlabel="step (cutoff advanced by one slice)", ylabel="recall"
    )
    seconds_ax.set(title="retrain wall time (step 0: the first model)", xlabel="step", ylabel="seconds")
    for ax in (recall10_ax, recall100_ax, seconds_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sequential(report: dict, path: Path | None = None) -> Figure:
    """Validation HR@10 against training time for each trained model of benchmark-sequential, its
    test HR@10 as a point at the end, and the published test rows as dashed lines."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, row in report["rows"].items():
        if row.get("curve"):
            seconds = [point["train_seconds"] / 60 for point in row["curve"]]
            (line,) = ax.plot(seconds, [point["hr@10"] for point in row["curve"]], marker=".", label=f"{name} (valid)")
            ax.scatter([seconds[-1]], [row["hr@10"]], color=line.get_color(), marker="*", s=80)
        else:
            ax.axhline(row["hr@10"], color="grey", linestyle=":", label=f"{name} (test)")
    for name, row in report["published"].items():
        ax.axhline(row["hr@10"], linestyle="--", linewidth=0.8, color="black", alpha=0.5)
        ax.annotate(name, (0, row["hr@10"]), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set(
        title=f"{report['dataset']}: HR@10 against training time (star: test)",
        xlabel="training minutes (2 CPU cores)",
        ylabel="HR@10",
    )
    ax.legend(fontsize=7)
    return _save(fig, path)
