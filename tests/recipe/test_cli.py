"""The command line and what it prints: every command listed in --help with one line, options
before or after the command (as the Makefile passes them), one timing line per stage, a summary
of where the outputs are, library chatter and known warnings kept out."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
from conftest import small_config

from twotower import cli, pipeline
from twotower.console import held_back_output, ignore_known_warnings

pytestmark = pytest.mark.unit


def _choices() -> list[str]:
    (command,) = [action for action in cli.build_parser()._actions if action.dest == "command"]
    return list(command.choices)


def test_help_lists_every_command_with_a_one_line_description():
    shown = subprocess.run(
        [sys.executable, "-m", "twotower", "--help"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    listed = shown[shown.index("\ncommands:\n") :].splitlines()[2:]
    described = {}
    for line in listed:
        match = re.fullmatch(r"  (\S+) +(\S.*)", line)
        assert match, f"not a 'name  description' line: {line!r}"
        described[match.group(1)] = match.group(2)
        assert len(line) <= 80, f"wraps in an 80-column terminal: {line!r}"
    assert list(described) == _choices()
    for name in ("data", "all", "run", "serve", "query", "recommend", "models", "benchmark-train"):
        assert name in described


def test_options_go_before_or_after_the_command():
    parser = cli.build_parser()
    args = parser.parse_args(["--set", "train.epochs=1", "serve", "--set", "serve.top_k=5", "--config", "my.yaml"])
    assert (args.command, args.overrides, str(args.config)) == ("serve", ["train.epochs=1", "serve.top_k=5"], "my.yaml")
    args = parser.parse_args(["query", "--user", "3", "--user", "4"])
    assert args.users == ["3", "4"]  # typed as the run's ids when the command runs
    args = parser.parse_args(["recommend", "--users", "all", "--out", "recs.parquet"])
    assert (args.user_list, str(args.out)) == ("all", "recs.parquet")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["query"], "query needs at least one --user"),
        (["recommend", "--users", "all"], r"recommend needs --users FILE\|all and --out FILE"),
        (["recommend", "--out", "recs.parquet"], r"recommend needs --users FILE\|all and --out FILE"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_incomplete_commands_are_refused_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_stage_ends_with_one_timing_line(tmp_path, capsys):
    pipeline.run_stage("data", small_config(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[data] synthetic:")
    assert re.fullmatch(r"\[data\] done in \d+\.\d s", lines[-1])
    assert sum("done in" in line for line in lines) == 1


def test_the_summary_names_the_artifacts_every_plot_and_the_model_repository(tmp_path):
    config = small_config(tmp_path)
    plots = [config.output_dir / "training_curves.png", config.output_dir / "benchmark-quality" / "recall_at_k.png"]
    for plot in plots:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot.write_bytes(b"")
    summary = pipeline.run_summary(config)
    assert f"artifacts                {config.output_dir} (" in summary
    assert all(f"plot                     {plot}\n" in summary for plot in plots)
    assert f"Triton model repository  {config.export_dir} (model executor_model)" in summary


def test_held_back_output_shows_only_when_the_step_fails(capsys):
    with held_back_output():
        print("progress bar")
        print("banner", file=sys.stderr)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(RuntimeError), held_back_output():
        print("what led to the failure")
        raise RuntimeError("failed")
    assert capsys.readouterr().err == "what led to the failure\n"


def test_only_the_known_warnings_are_filtered():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        ignore_known_warnings()
        warnings.warn("Initializing an NVTabular Dataset in CPU mode.This is an experimental feature", UserWarning)
        warnings.warn("distutils Version classes are deprecated. Use packaging.version instead.", DeprecationWarning)
        warnings.warn("Initializing an NVTabular Dataset in CPU mode", RuntimeWarning)  # same text, other category
        warnings.warn("some other deprecation", DeprecationWarning)
    assert [(w.category, str(w.message)) for w in shown] == [
        (RuntimeWarning, "Initializing an NVTabular Dataset in CPU mode"),
        (DeprecationWarning, "some other deprecation"),
    ]


@pytest.mark.parametrize(
    ("command", "first"),
    [
        (["train"], "data"),
        (["index"], "train"),
        (["features"], "data"),
        (["export"], "data"),
        (["serve"], "export"),
        (["query", "--user", "1"], "data"),
        (["recommend", "--users", "all", "--out", "answers.parquet"], "data"),
        (["refresh-items", "--items", "items.parquet"], "data"),
        (["retrain", "--since", "2000-01-01"], "data"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else value,
)
def test_a_command_run_before_its_inputs_exist_names_the_stage_to_run_first(tmp_path, capsys, command, first):
    run = ["--set", f"output_dir={tmp_path / 'artifacts'}", "--set", f"export_dir={tmp_path / 'triton_models'}"]
    with pytest.raises(SystemExit) as refused:
        cli.main([*run, *command])
    assert refused.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("twotower: ") and line.endswith(f": run the '{first}' stage first"), line
    assert not any(tmp_path.iterdir()), "a refused command wrote something"
