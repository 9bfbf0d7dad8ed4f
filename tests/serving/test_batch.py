"""`twotower recommend`: top-k for many users from the exported model, with no server; its
answers are checked against a real Triton server serving the same export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from twotower import cli
from twotower.serving.batch import (
    RecommendError,
    distinct_user_ids,
    load_served_graph,
    long_format,
    read_user_file,
    run_recommend,
)
from twotower.serving.client import recommend
from twotower.serving.triton import triton_server
from twotower.store.artifacts import EXTERNAL_ID, load_recipe_data

UNKNOWN_USER = 999_999_999


@pytest.fixture(scope="module")
def server(exported):
    config = dataclasses.replace(
        exported, serve=dataclasses.replace(exported.serve, grpc_port=0, http_port=0, metrics_port=0)
    )
    with triton_server(config) as running:
        yield running


def _server_rows(user_ids: list[int], url: str) -> pd.DataFrame:
    """The server's answer for ``user_ids`` in one request, as rows (user, rank), built here
    independently of twotower.serving.batch."""
    answer = recommend(user_ids, url)
    rows = [
        (user_id, rank, item_id, score, fallback)
        for user_id, items, scores, fallback in zip(
            user_ids, answer["item_ids"], answer["scores"], answer["is_fallback"]
        )
        for rank, (item_id, score) in enumerate(zip(items, scores), start=1)
    ]
    return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score", "is_fallback"])


@pytest.mark.integration
def test_batch_answers_equal_the_triton_servers_answers(exported, server, tmp_path, capsys):
    test_users = pd.read_parquet(exported.splits_dir / "test.parquet")["user_id"].drop_duplicates().head(9)
    users = load_recipe_data(exported.data_dir).users.set_index("user_id").loc[test_users, EXTERNAL_ID].tolist()
    users.insert(4, UNKNOWN_USER)  # answered with the most popular items, flagged
    user_file = tmp_path / "users.txt"
    user_file.write_text("\n".join(map(str, [*users, users[0], users[6]])) + "\n")  # two repeats, answered once
    # 10 users, 3 per batch: four batches, the last one short
    config = dataclasses.replace(exported, serve=dataclasses.replace(exported.serve, max_request_users=3))
    out = tmp_path / "recs.parquet"

    returned = run_recommend(config, str(user_file), out)

    written = pd.read_parquet(out)
    pd.testing.assert_frame_equal(written, returned)
    expected = _server_rows(users, server.grpc_url)
    assert len(written) == len(users) * exported.serve.top_k
    exact = ["user_id", "rank", "item_id", "is_fallback"]
    pd.testing.assert_frame_equal(written[exact], expected[exact], check_dtype=False)
    np.testing.assert_allclose(written["score"], expected["score"], rtol=1e-5, atol=1e-6)
    assert written.loc[written.user_id == UNKNOWN_USER, "is_fallback"].all()
    assert not written.loc[written.user_id != UNKNOWN_USER, "is_fallback"].any()

    printed = capsys.readouterr()
    assert "10 users (from" in printed.out and "2 repeated id(s) answered once" in printed.out
    assert "[recommend] 10/10 users (batch 4/4" in printed.err


@pytest.mark.integration
def test_cli_recommends_every_user_of_the_run(exported, tmp_path, capsys):
    out = tmp_path / "all.parquet"
    cli.main(
        [
            "recommend",
            "--users",
            "all",
            "--out",
            str(out),
            "--set",
            f"output_dir={exported.output_dir}",
            "--set",
            f"export_dir={exported.export_dir}",
        ]
    )
    written = pd.read_parquet(out)
    users = load_recipe_data(exported.data_dir).users[EXTERNAL_ID]  # as the data files spell them
    assert written["user_id"].drop_duplicates().tolist() == users.tolist()
    top_k = written.groupby("user_id")["rank"].max()
    assert (top_k == exported.serve.top_k).all()  # the export's top_k, whatever the CLI's config says
    assert f"written to {out}" in capsys.readouterr().out


def _user_list(path, text_ids=False):
    return distinct_user_ids(read_user_file(path), str(path), text_ids)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, r"user list .*missing\.txt does not exist"),
        ("empty.txt", "\n\n", r"user list .*empty\.txt holds no user ids"),
        ("words.txt", "12\nabc\n", r"'abc' is not an integer user id, as this run's are \(1 such value"),
        ("fraction.csv", "user_id\n1\n2.5\n", r"'2.5' is not an integer user id"),
        ("blank_cell.csv", "user_id,name\n1,a\n,b\n", r"1 empty user id\(s\), the first in row 2"),
        ("no_column.csv", "uid\n1\n", r"has no 'user_id' column \(columns: uid\)"),
        ("no_column.parquet", pd.DataFrame({"id": [1, 2]}), r"has no 'user_id' column \(columns: id\)"),
        ("empty.parquet", pd.DataFrame({"user_id": np.array([], dtype=np.int64)}), "holds no user ids"),
    ],
)
def test_bad_user_lists_are_refused_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RecommendError, match=message) as raised:
        _user_list(path)
    assert "\n" not in str(raised.value)


@pytest.mark.unit
def test_user_lists_keep_first_order_and_answer_repeats_once(tmp_path):
    text, csv, parquet = tmp_path / "users.txt", tmp_path / "users.csv", tmp_path / "users.parquet"
    text.write_text(" 7\n3\n\n7\n5\n")
    csv.write_text("title,user_id\nx,7\ny,3\nz,7\nw,5\n")
    pd.DataFrame({"user_id": [7, 3, 7, 5]}).to_parquet(parquet)
    for path in (text, csv, parquet):
        user_list = _user_list(path)
        assert user_list.ids.tolist() == [7, 3, 5] and user_list.ids.dtype == np.int64, path
        assert user_list.repeats_dropped == 1, path
        # where the run's ids are text, the same lists are text ids
        assert _user_list(path, text_ids=True).ids.tolist() == ["7", "3", "5"], path


@pytest.mark.unit
def test_text_ids_are_written_as_text():
    answer = {
        "item_ids": np.array([[b"A-1", b"C-3"], [b"B-2", b"A-1"]], dtype=object),
        "scores": np.array([[0.9, 0.5], [0.8, 0.1]], dtype=np.float32),
        "is_fallback": np.array([False, True]),
    }
    rows = long_format(np.array(["ann", "zed"], dtype=object), answer)
    assert rows.to_dict("list") == {
        "user_id": ["ann", "ann", "zed", "zed"],
        "rank": [1, 2, 1, 2],
        "item_id": ["A-1", "C-3", "B-2", "A-1"],
        "score": pytest.approx([0.9, 0.5, 0.8, 0.1]),
        "is_fallback": [False, False, True, True],
    }


@pytest.mark.unit
def test_a_missing_export_names_the_stage_to_run(tmp_path):
    with pytest.raises(RecommendError, match=r"no exported model 'executor_model' in .*: run `twotower export`"):
        load_served_graph(tmp_path / "triton_models", "executor_model")


@pytest.mark.unit
def test_cli_reports_a_bad_user_list_in_one_line_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "users.txt"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["recommend", "--users", str(missing), "--out", str(tmp_path / "recs.parquet")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == f"twotower: user list {missing} does not exist (give a file of user ids or 'all')\n"
    )
    assert not (tmp_path / "recs.parquet").exists()
