"""Smoke tests of the examples (a few steps each, CPU): eager torch and fusedstab train from the same
weights to the same losses, and the loss plot is written."""
from __future__ import annotations

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["digits_convnet", "char_gpt"])
def test_example_runs(name, tmp_path):
    if name == "digits_convnet":
        pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    plot = tmp_path / f"{name}.png"
    extra = ["--sample", "4"] if name == "char_gpt" else []
    result = _load(name).main(["--device", "cpu", "--steps", "3", "--plot", str(plot), *extra])
    eager, fused = result["losses"].values()
    assert len(eager) == len(fused) == 3
    for a, b in zip(eager, fused):
        assert abs(a - b) <= 1e-4 * abs(a), (eager, fused)
    assert plot.stat().st_size > 1000
