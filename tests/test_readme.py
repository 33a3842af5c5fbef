"""The README's usage example runs as written."""

import pathlib
import re


def test_readme_usage_example_runs():
  readme = pathlib.Path(__file__).parents[1] / "README.md"
  blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
  assert blocks, "README.md has no python example"
  namespace = {}
  code = compile(blocks[0], "README.md", "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  assert namespace["y"].shape == (1, 3000, 512)
