import merlin.io
import numpy as np
import pandas as pd
import pytest

from twotower.stages.data import make_synthetic, positives, split_by_time
from twotower.views.explore import (
    dataset_summary,
    directory_tree,
    find_items,
    head_lines,
    most_specific_category,
    pca_2d,
    schema_table,
    similar_items,
)
from twotower.views.plots import plot_data_overview, plot_projection

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def small():
    data = make_synthetic(40, 30, 10, seed=0)
    return data, split_by_time(positives(data.interactions, 4.0), 0.2, 0.1)


def test_head_lines_returns_the_first_lines_verbatim(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_text("a:token\tb:float\n1\t2\n3\t4\n")
    assert head_lines(path, 2) == "a:token\tb:float\n1\t2\n"
    assert head_lines(path, 10) == path.read_text()


def test_dataset_summary_counts(small):
    data, split = small
    summary = dataset_summary(data, split)
    assert summary["ratings"] == len(data.interactions) == 400
    assert summary["users with ratings"] == 40
    assert (
        summary["train positives"] + summary["validation positives"] + summary["test positives"]
        == summary["positives (rating >= threshold)"]
    )
    assert 0 < summary["density"] <= 1


def test_schema_table_shows_tags_and_cardinality(prepared):
    schema = merlin.io.Dataset(str(prepared.data_dir / "train_encoded"), engine="parquet").schema
    table = schema_table(schema)
    assert table.loc["user_id", "tags"] == "categorical, id, user"
    assert table.loc["genres", "tags"] == "categorical, item"
    assert bool(table.loc["genres", "is_list"]) and not bool(table.loc["item_id", "is_list"])
    assert table.loc["item_id", "cardinality"] == schema["item_id"].int_domain.max + 1


def test_most_specific_category_picks_the_rarest():
    genres = pd.Series([["Comedy", "Animation"], ["Comedy"], ["Comedy", "Drama"], ["Drama"], []])
    # Comedy 3 times, Drama 2, Animation 1
    assert most_specific_category(genres).tolist() == ["Animation", "Comedy", "Drama", "Drama", "(none)"]


def test_pca_2d_finds_the_directions_of_largest_variance():
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 3.0, 0.1, 0.1])
    points = rng.normal(size=(500, 4)) * scales
    coords = pca_2d(points)
    assert coords.shape == (500, 2)
    np.testing.assert_allclose(coords.mean(axis=0), 0, atol=1e-9)
    assert abs(np.corrcoef(coords[:, 0], points[:, 0])[0, 1]) > 0.99
    assert abs(np.corrcoef(coords[:, 1], points[:, 1])[0, 1]) > 0.99


def test_find_items_by_exact_name():
    names = pd.Series(["A (1999)", "B (2000)"], index=[7, 8])
    assert find_items(names, ["B (2000)", "A (1999)"]).tolist() == [8, 7]
    with pytest.raises(KeyError, match="C"):
        find_items(names, ["A (1999)", "C"])


def test_similar_items_leaves_the_query_out_and_ranks_by_inner_product():
    item_ids = np.array([10, 20, 30, 40])
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    names = pd.Series(["a", "b", "c", "d"], index=item_ids)
    table = similar_items(item_ids, vectors, names, [10], k=2)
    assert table.loc["a"]["neighbour"].tolist() == ["b", "d"]
    assert table.loc["a"]["similarity"].tolist() == pytest.approx([0.9, 0.7])
    with pytest.raises(KeyError, match="99"):
        similar_items(item_ids, vectors, names, [99])


def test_directory_tree_lists_folders_first_with_depth_limit(tmp_path):
    (tmp_path / "root" / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "root" / "file.txt").write_text("abc")
    (tmp_path / "root" / "sub" / "deep" / "hidden.txt").write_text("x")
    tree = directory_tree(tmp_path / "root", max_depth=2)
    assert tree.splitlines() == ["root/", "    sub/", "        deep/", "    file.txt  (3 B)"]


def test_plots_are_written_and_returned(small, tmp_path):
    data, split = small
    figure = plot_data_overview(data, split, tmp_path / "overview.png")
    assert len(figure.axes) == 4 and (tmp_path / "overview.png").stat().st_size > 0
    labels = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    figure = plot_projection(
        np.random.default_rng(0).normal(size=(10, 2)), labels, "t", tmp_path / "p.png", top_labels=2
    )
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["other (2)", "a (5)", "b (3)"]
