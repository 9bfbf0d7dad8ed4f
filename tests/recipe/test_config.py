"""Configuration checks: unknown keys and mistyped values are refused with a clear message."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np
import pandas as pd
import pytest
import yaml

from twotower import cli
from twotower.benchmarks.quality import _variant
from twotower.config import ConfigError, RecipeConfig, TrainConfig, config_to_dict, load_config, set_value
from twotower.stages.evaluate import build_eval_set, evaluate_scores

pytestmark = pytest.mark.unit


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(overrides=list(overrides))
    return str(error.value)


def test_overrides_of_the_right_type_are_applied():
    config = load_config(
        overrides=["train.epochs=3", "train.learning_rate=1e-2", "output_dir=/tmp/run", "serve.host=0.0.0.0"]
    )
    assert config.train.epochs == 3
    assert config.train.learning_rate == 0.01
    assert config.output_dir == Path("/tmp/run")
    assert config.serve.host == "0.0.0.0"


def test_text_for_an_int_is_refused():
    message = _refused("train.epochs=abc")
    assert "train.epochs" in message and "expected int" in message and "'abc'" in message


def test_a_float_for_an_int_is_refused_not_truncated():
    message = _refused("train.epochs=2.5")
    assert "train.epochs" in message and "expected int" in message and "2.5" in message


@pytest.mark.parametrize("value", ["1", "0", "'true'", "maybe"])
def test_a_bool_takes_only_true_or_false(value):
    assert "train.logq_correction: expected bool" in _refused(f"train.logq_correction={value}")


def test_a_bool_is_not_a_number():
    assert "expected int" in _refused("train.epochs=true")
    assert "expected float" in _refused("train.temperature=false")


def test_an_int_for_a_float_becomes_a_float():
    config = load_config(overrides=["train.temperature=1"])
    assert config.train.temperature == 1.0 and isinstance(config.train.temperature, float)


def test_a_number_for_text_is_refused_and_quoting_it_works():
    assert "quote it" in _refused("serve.model_name=123")
    assert load_config(overrides=["serve.model_name='123'"]).serve.model_name == "123"


def test_unknown_key_suggests_the_closest_one_and_lists_the_section():
    message = _refused("train.epoch=3")
    assert "'train.epoch'" in message and "did you mean 'train.epochs'?" in message
    assert "keys of train:" in message and "batch_size" in message


def test_unknown_section_suggests_the_closest_one():
    message = _refused("trian.epochs=3")
    assert "did you mean 'train.epochs'?" in message and "keys of the top level:" in message


def test_a_value_for_a_section_and_a_key_below_a_setting_are_refused():
    assert "'train' is a section, not a setting" in _refused("train=3")
    assert "train.epochs is a setting, not a section" in _refused("train.epochs.max=3")


def test_a_section_takes_a_mapping_of_its_keys():
    config = load_config(overrides=["train={epochs: 3, l2_normalize: false}"])
    assert config.train.epochs == 3 and config.train.l2_normalize is False


def test_list_elements_are_checked():
    assert load_config(overrides=["train.tower_layers=[256, 32]"]).train.tower_layers == [256, 32]
    assert "train.tower_layers[1]: expected int, got 'x'" in _refused("train.tower_layers=[256, x]")
    assert "expected a list of int" in _refused("train.tower_layers=256")


def test_optional_takes_null():
    assert load_config(overrides=["train.embedding_dim=null"]).train.embedding_dim is None
    assert "expected int or null" in _refused("train.embedding_dim=big")


@pytest.mark.parametrize(
    "override", ["data.dataset=ml-100k", "features.online_store=memcached", "train.early_stopping_metric=recall@7"]
)
def test_a_value_outside_the_declared_choices_is_refused(override):
    key, _, value = override.partition("=")
    message = _refused(override)
    assert message.startswith(f"{key}: expected one of ") and repr(value) in message


def test_every_early_stopping_metric_is_one_evaluation_reports():
    rng = np.random.default_rng(0)
    held_out = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [3, 4, 5]})
    earlier = pd.DataFrame({"user_id": [1, 2], "item_id": [6, 7]})
    metrics = evaluate_scores(
        lambda rows: rng.random((len(rows), 150)), build_eval_set(held_out, earlier, np.arange(150))
    )
    assert set(get_args(get_type_hints(TrainConfig)["early_stopping_metric"])) <= set(metrics)


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian:\n  epochs: 3\n", r"recipe\.yaml: unknown configuration key 'trian'.*did you mean 'train'"),
        ("train:\n  epochs: 3\n  batch_size: many\n", r"recipe\.yaml: train\.batch_size: expected int, got 'many'"),
        ("train:\n  epochs:\n    max: 3\n", r"train\.epochs: expected int, got \{'max': 3\}"),
    ],
    ids=["unknown-key", "mistyped-value", "mapping-for-a-setting"],
)
def test_a_bad_yaml_file_is_refused(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_invalid_yaml_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    assert "is not valid YAML" in _refused("train.tower_layers=[1,")


def test_the_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(RecipeConfig())))
    assert load_config(path) == RecipeConfig()


def test_set_value_checks_python_values():
    config = RecipeConfig()
    set_value(config, "serve.top_k", 20)
    assert config.serve.top_k == 20
    with pytest.raises(ConfigError, match=r"serve\.top_k: expected int, got '20'"):
        set_value(config, "serve.top_k", "20")


def test_quality_variants_go_through_the_checks():
    base = RecipeConfig()
    assert _variant(base, "x", {"train.epochs": 1}).train.epochs == 1
    with pytest.raises(ConfigError, match="unknown configuration key 'train.nope'"):
        _variant(base, "x", {"train.nope": 1})
    with pytest.raises(ConfigError, match=r"train\.temperature: expected float"):
        _variant(base, "x", {"train.temperature": "hot"})


def test_cli_reports_a_configuration_error_in_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "--set", "train.epochs=abc"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "twotower: configuration error: train.epochs: expected int, got 'abc'\n"
