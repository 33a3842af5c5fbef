"""colab/ notebooks run top to bottom at smoke sizes and are stored stripped.

Each notebook runs in a fresh Jupyter kernel on this very interpreter (so on
a fresh machine the project's venv is the whole environment), with
``NSA_NOTEBOOK_SMOKE=1`` and its folder as working directory, skipping the
cells tagged ``skip-execution`` (the install cell), as nbmake does. A cell
that raises fails the test with the cell's traceback.
"""

import json
import pathlib
import sys

from nbclient import NotebookClient
import nbformat
import pytest

COLAB = pathlib.Path(__file__).parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
EXPECTED = {"quickstart", "train", "kernels"}
SKIP_TAG = "skip-execution"
KERNEL_NAME = "nsa-jax-tests"
SMOKE_LINE = 'SMOKE = os.environ.get("NSA_NOTEBOOK_SMOKE") == "1"'


def _code_cells(nb):
  return [cell for cell in nb.cells if cell.cell_type == "code"]


def _own_kernelspec(root: pathlib.Path) -> None:
  """A kernelspec on sys.executable, found first through JUPYTER_PATH."""
  spec = root / "kernels" / KERNEL_NAME
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "nsa-jax tests", "language": "python"}))


def test_the_expected_notebooks_exist():
  assert {path.stem for path in NOTEBOOKS} == EXPECTED


def test_readme_lists_every_notebook():
  readme = (COLAB / "README.md").read_text()
  for path in NOTEBOOKS:
    assert path.name in readme, f"colab/README.md does not list {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_well_formed(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    assert "execution" not in cell.metadata, f"{path.name}: timing metadata"
    assert "attachments" not in cell or not cell.attachments
  for i, cell in enumerate(_code_cells(nb)):
    assert cell.outputs == [], f"{path.name}: code cell {i} has outputs"
    assert cell.execution_count is None, (
        f"{path.name}: code cell {i} has an execution count")
  install, parameters = _code_cells(nb)[:2]
  assert SKIP_TAG in install.metadata.get("tags", [])
  assert "REPO_URL = " in install.source and "pip" in install.source
  assert SMOKE_LINE in parameters.source
  assert "parameters" in parameters.metadata.get("tags", [])
  tagged = [c for c in _code_cells(nb)
            if SKIP_TAG in c.metadata.get("tags", [])]
  assert tagged == [install], f"{path.name}: only the install cell is skipped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  _own_kernelspec(tmp_path / "jupyter")
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user profile
  monkeypatch.setenv("NSA_NOTEBOOK_SMOKE", "1")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb, kernel_name=KERNEL_NAME, timeout=600,
      skip_cells_with_tag=SKIP_TAG, allow_errors=False,
      extra_arguments=["--InteractiveShell.colors=nocolor"],  # plain tracebacks
      resources={"metadata": {"path": str(COLAB)}})
  client.execute()
  ran = [c for c in _code_cells(nb) if SKIP_TAG not in c.metadata.get(
      "tags", [])]
  assert all(c.execution_count is not None for c in ran)
