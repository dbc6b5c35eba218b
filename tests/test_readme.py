"""The README's drop-in example runs exactly as printed."""

import re

from conftest import ROOT


def readme_snippet(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_drop_in_example_runs_and_its_interventions_fire():
    namespace: dict = {}
    exec(compile(readme_snippet("Drop interventions into your own agent"), "README.md", "exec"), namespace)
    hare_tortoise, redo = namespace["interventions"]
    assert hare_tortoise.resets == 2  # 1000 steps, reset every 400
    assert len(redo.recycled) == 10  # scored every 100 steps
    assert namespace["loss"].isfinite()
