"""The notebooks run headless (nbclient) against a small run, and store no outputs."""

import json
from pathlib import Path

import pytest
import yaml

from mtp_spec.experiment.runner import run
from mtp_spec.tokenizer import write_byte_tokenizer

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def small_run(tiny_fp8, tmp_path_factory):
    write_byte_tokenizer(tiny_fp8)
    d = tmp_path_factory.mktemp("nbrun")
    suite = d / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": str(i), "category": ["code", "prose"][i % 2],
                                         "prompt": f"x = {i}\ny = x + {i}\n"}) + "\n" for i in range(4)))
    cfg = d / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "nb", "model": str(tiny_fp8), "suites": [str(suite)], "prompts_per_suite": 4,
        "strategies": [{"name": "mtp", "k": [1, 2]}, {"name": "ngram", "k": [2]}],
        "sweep": {"temperature": [0.0, 0.7], "batch_size": [1, 2], "max_new_tokens": [8]}}))
    return run(cfg, out=d / "results", progress=False), tiny_fp8


def test_notebooks_are_stored_without_outputs():
    assert len(NOTEBOOKS) == 4
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, p.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_headless(path, small_run, monkeypatch):
    run_dir, model = small_run
    monkeypatch.setenv("MTP_SPEC_RUN", str(run_dir))
    monkeypatch.setenv("MTP_SPEC_MODEL", str(model))
    monkeypatch.setenv("MTP_SPEC_MAX_NEW", "8")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
