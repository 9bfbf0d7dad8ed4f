"""Small read-only views of the recipe's data, schemas and embeddings (used by the notebooks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from merlin.schema import Schema

from twotower.store.artifacts import RecipeData, Split


def head_lines(path: Path, count: int = 3) -> str:
    """The first ``count`` lines of a text file, as they are on disk."""
    with open(path, encoding="utf-8") as handle:
        return "".join(line for _, line in zip(range(count), handle))


def dataset_summary(data: RecipeData, split: Split) -> pd.Series:
    """Counts that describe a loaded data set and its split, one per row."""
    inter = data.interactions
    n_users, n_items = inter["user_id"].nunique(), inter["item_id"].nunique()
    held_out = pd.concat([split.valid, split.test])
    return pd.Series(
        {
            "users with ratings": n_users,
            "items with ratings": n_items,
            "items in the item table": len(data.items),
            "ratings": len(inter),
            "density": len(inter) / (n_users * n_items),
            "median ratings per user": inter.groupby("user_id").size().median(),
            "median ratings per item": inter.groupby("item_id").size().median(),
            "positives (rating >= threshold)": len(split.train) + len(held_out),
            "train positives": len(split.train),
            "validation positives": len(split.valid),
            "test positives": len(split.test),
            "held-out positives of items never in train": int(
                (~held_out["item_id"].isin(split.train["item_id"])).sum()
            ),
        },
        dtype=object,
    )


def schema_table(schema: Schema) -> pd.DataFrame:
    """One row per column of a Merlin schema: tags, element dtype, list or not, cardinality."""
    rows = []
    for column in schema:
        domain = column.properties.get("domain", {})
        rows.append(
            {
                "column": column.name,
                "tags": ", ".join(sorted(tag.value for tag in column.tags)),
                "dtype": column.dtype.name,
                "is_list": column.is_list,
                "cardinality": domain.get("max", -1) + 1 if "max" in domain else None,
            }
        )
    return pd.DataFrame(rows).set_index("column")


def most_specific_category(categories: pd.Series) -> pd.Series:
    """Per item, the one of its categories (genres on MovieLens) that is rarest across all items
    (a readable single label). Items without any get ``"(none)"``; a single-valued column is
    its own label."""
    lists = categories.map(lambda value: list(value) if isinstance(value, (list, np.ndarray)) else [value])
    frequency = lists.explode().value_counts()
    return lists.map(lambda names: min(names, key=lambda g: (frequency[g], str(g))) if len(names) else "(none)")


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Project rows onto their first two principal components (centred, via SVD)."""
    centred = np.asarray(vectors, dtype=np.float64) - np.mean(vectors, axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def find_items(names: pd.Series, wanted: list[str]) -> pd.Series:
    """Dataset item ids of the exact ``wanted`` names (``names``: item id -> readable name, as
    ``data.item_names`` gives), in order; raises KeyError naming a missing one."""
    by_name = pd.Series(names.index, index=names.to_numpy())
    by_name = by_name[~by_name.index.duplicated()]
    missing = [name for name in wanted if name not in by_name.index]
    if missing:
        raise KeyError(f"names not in the item table: {missing}")
    return by_name.loc[wanted]


def similar_items(
    item_ids: np.ndarray, vectors: np.ndarray, names: pd.Series, query_ids: list[int] | np.ndarray, k: int = 5
) -> pd.DataFrame:
    """The ``k`` nearest catalogue items of each query item by inner product (cosine for
    L2-normalised vectors), the query itself left out. ``vectors`` rows follow ``item_ids``;
    ``names`` maps item ids to what the table shows.
    """
    position = pd.Index(item_ids)
    rows = position.get_indexer(query_ids)
    if (rows < 0).any():
        raise KeyError(f"items not in the catalogue: {np.asarray(query_ids)[rows < 0].tolist()}")
    scores = vectors[rows] @ vectors.T
    scores[np.arange(len(rows)), rows] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    records = [
        {
            "query": names.get(item_ids[row], "?"),
            "rank": rank,
            "neighbour": names.get(item_ids[col], "?"),
            "similarity": float(scores[i, col]),
        }
        for i, row in enumerate(rows)
        for rank, col in enumerate(best[i], start=1)
    ]
    return pd.DataFrame(records).set_index(["query", "rank"])


def directory_tree(root: Path, max_depth: int = 4) -> str:
    """An indented listing of ``root`` (folders end with '/', files show their size)."""
    root = Path(root)
    lines = [f"{root.name}/"]

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(folder.iterdir(), key=lambda p: (p.is_file(), p.name)):
            indent = "    " * depth
            if child.is_dir():
                lines.append(f"{indent}{child.name}/")
                if depth < max_depth:
                    walk(child, depth + 1)
            else:
                lines.append(f"{indent}{child.name}  ({child.stat().st_size:,} B)")

    walk(root, 1)
    return "\n".join(lines)
