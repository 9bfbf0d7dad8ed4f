"""The five notebooks: parameter injection, and a headless run of all of them on synthetic data."""

import nbformat
import pytest

from twotower.notebooks import NOTEBOOK_DIR, NOTEBOOKS, declared_parameters, inject_parameters, run_notebooks


def _notebook(parameters_source="A = 1\nB: int = 2"):
    return nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell(parameters_source, metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell("print(A + B)"),
        ]
    )


@pytest.mark.unit
def test_parameters_go_into_one_cell_after_the_parameters_cell():
    notebook = inject_parameters(_notebook(), {"A": 3, "B": "x"})
    assert [c.metadata.get("tags") for c in notebook.cells[1:3]] == [["parameters"], ["injected-parameters"]]
    assert "A = 3\nB = 'x'\n" in notebook.cells[2].source
    again = inject_parameters(notebook, {"B": [1, None]})  # a second run replaces the first injection
    injected = [c for c in again.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "B = [1, None]" in injected[0].source and "A =" not in injected[0].source
    assert len(inject_parameters(again, {}).cells) == 3


@pytest.mark.unit
def test_undeclared_parameters_and_missing_parameters_cell_are_refused():
    assert declared_parameters(_notebook()) == ["A", "B"]
    with pytest.raises(ValueError, match="EPOCH"):
        inject_parameters(_notebook(), {"EPOCH": 1})
    with pytest.raises(ValueError, match="no code cell tagged"):
        inject_parameters(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("A = 1")]), {"A": 2})
    with pytest.raises(ValueError, match="declared by none"):
        run_notebooks({"NOT_A_PARAMETER": 1})


@pytest.mark.unit
def test_committed_notebooks_default_to_ml_1m():
    for name in NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        defaults = {}
        exec(next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", [])), defaults)
        assert defaults["CONFIG"] == "../configs/ml-1m.yaml", name
        assert defaults["OUTPUT_DIR"] == "../artifacts", name


def _text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.smoke
@pytest.mark.timeout(1200)
def test_every_notebook_runs_top_to_bottom_on_synthetic_data(tmp_path):
    committed = {name: (NOTEBOOK_DIR / name).read_bytes() for name in NOTEBOOKS}
    parameters = {
        "CONFIG": "../configs/synthetic.yaml",
        "OUTPUT_DIR": str(tmp_path / "artifacts"),
        "EXPORT_DIR": str(tmp_path / "triton_models"),
        "EPOCHS": 4,
        "BATCH_SIZE": 256,
        "TOP_K": 5,
        "GRPC_PORT": 0,  # free ports picked by the server itself
        "HTTP_PORT": 0,
        "METRICS_PORT": 0,
        "EXAMPLE_TITLES": None,
    }
    written = run_notebooks(parameters, output_dir=tmp_path / "executed", timeout_s=600)  # raises on a cell error

    assert [path.name for path in written] == list(NOTEBOOKS)
    executed = {path.name: nbformat.read(path, as_version=4) for path in written}
    for name, notebook in executed.items():
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in code), f"{name}: a cell did not run"
    for name in NOTEBOOKS[:3]:  # data overview, training curves, embedding projection
        images = [o for c in executed[name].cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert images, f"{name} shows no figure"
    assert "same as saved at training time: True" in _text(executed["03_embeddings.ipynb"])
    serving = _text(executed["05_ensemble_and_serving.ipynb"])
    assert "same as in process: True" in serving
    assert "is_fallback: [False, True]" in serving  # an unknown user gets the flagged fallback
    assert "user -1 gets the most popular items: True" in serving
    assert "empty batch: StatusCode.INVALID_ARGUMENT: [request id: <id_unknown>] input byte size mismatch" in serving
    assert "1025 users: StatusCode.INVALID_ARGUMENT: [request id: <id_unknown>] inference request batch-size" in serving
    assert "still ready: True" in serving
    assert "recommended again: False" in serving  # a live event: the watched item is gone from the next answer
    assert "tritonserver exited with code 0" in serving
    assert {name: (NOTEBOOK_DIR / name).read_bytes() for name in NOTEBOOKS} == committed
