from pathlib import Path

import merlin.io
import pytest
from merlin.schema import Tags

from twotower.stages.workflow import USER_SUBGRAPH, category_table, load_workflow

pytestmark = pytest.mark.unit


def test_tags_are_on_the_right_columns(prepared):
    schema = merlin.io.Dataset(str(prepared.data_dir / "train_encoded"), engine="parquet").schema
    assert schema.select_by_tag(Tags.USER_ID).column_names == ["user_id"]
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    assert set(schema.select_by_tag(Tags.USER).column_names) == {
        "user_id",
        "age",
        "gender",
        "occupation",
        "zip_code",
        "history",
    }
    assert set(schema.select_by_tag(Tags.ITEM).column_names) == {"item_id", "year", "genres"}
    assert schema["genres"].is_list and schema["history"].is_list


def test_parquet_and_workflows_are_written_under_the_output_folder(prepared):
    assert list((prepared.data_dir / "train_encoded").glob("*.parquet"))
    for name in ("full", "user", "item"):
        assert (prepared.workflow_dir / name / "workflow.pkl").exists()
    assert not Path("categories").exists(), "Categorify wrote into the working directory"


def test_saved_user_workflow_encodes_only_user_features(prepared):
    user_workflow = load_workflow(prepared.workflow_dir, USER_SUBGRAPH)
    assert user_workflow.input_schema.column_names == ["user_id", "age", "gender", "occupation", "zip_code", "history"]
    assert user_workflow.output_schema.select_by_tag(Tags.ITEM).column_names == []


def test_workflow_is_fitted_on_training_split_only(prepared):
    import pandas as pd

    train = pd.read_parquet(prepared.data_dir / "splits" / "train.parquet")
    vocabulary = category_table(load_workflow(prepared.workflow_dir, "item"), "item_id")
    assert set(vocabulary["item_id"]) == set(train["item_id"])


def test_history_is_encoded_with_the_item_vocabulary(prepared):
    import pandas as pd

    from twotower.stages.workflow import transform_frame

    workflow = load_workflow(prepared.workflow_dir, "full")
    rows = pd.DataFrame(
        {
            "user_id": [10],
            "age": [18],
            "gender": ["F"],
            "occupation": [1],
            "zip_code": ["10001"],
            "item_id": [5],
            "year": [1990],
            "genres": [["Drama"]],
            "history": [[5, 7]],
        }
    )
    encoded = transform_frame(workflow, rows).iloc[0]
    item_codes = category_table(workflow, "item_id").reset_index().set_index("item_id")["index"]
    assert list(encoded["history"]) == [item_codes[5], item_codes[7]]
    assert encoded["item_id"] == item_codes[5]
