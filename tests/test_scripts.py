"""experiments/ scripts: one flag spelling, no imports of each other."""

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "experiments").glob("*.py"))


def _flags(tree):
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") ==
        "add_argument"):
      for arg in node.args:
        if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
          yield arg.value


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_flags_use_dashes_and_scripts_do_not_import_each_other(path):
  source = path.read_text()
  tree = ast.parse(source)
  assert [f for f in _flags(tree) if "_" in f] == []
  names = {p.stem for p in SCRIPTS}
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""])
      assert not {m.split(".")[0] for m in modules} & (names | {"importlib"})


def test_train_lm_is_thin():
  assert len((ROOT / "experiments" / "train_lm.py").read_text()
             .splitlines()) < 60


def test_packaging_extras_and_license():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == "Apache-2.0"  # SPDX string: no warnings
  extras = project["optional-dependencies"]
  assert any(d.startswith("ruff") for d in extras["test"])
  for name in ("notebook", "nbconvert", "ipykernel"):
    assert any(d.startswith(name) for d in extras["notebooks"]), name
  assert '".[notebooks]"' in (ROOT / "colab" / "README.md").read_text()
