"""The benchmark report without timing anything: results are built from the real cases of every op
with made-up times (``fake_result``), then the text, the Markdown page and the figures are checked.
Figures are checked as matplotlib objects (a legend, no empty axes, one style per provider), never
as pixels."""
import json
import math
import random
import warnings

import pytest
import torch

from fusedstab.bench import OPS, load_cases
from fusedstab.bench.case import Config
from fusedstab.bench.runner import SCHEMA, result

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fusedstab.bench import plots, providers, report  # noqa: E402

# Providers a GPU run has besides CPU's: every fusedstab backend, peers, torch's SDPA backends, and
# one name the harness has never heard of (a new peer still gets a colour and a legend entry).
EXTRA = {"layer_norm": ["fusedstab-triton", "fusedstab-cuda", "liger"], "rms_norm": ["fusedstab-cpu"],
         "attention": ["fusedstab-triton", "sdpa-flash", "sdpa-math", "flash-attn", "some-new-peer"],
         "clip_grad_norm": ["fusedstab-triton", "apex"]}


def fake_result(cfg: Config, ops=tuple(OPS), extra=EXTRA, seed=0) -> dict:
    """What ``runner.run`` returns, for the real cases of ``ops`` and random times (no timing)."""
    rng = random.Random(seed)
    cases = [c for op in ops for c in load_cases(op, cfg)]
    # compile as if it ran (building a torch.compile'd provider imports dynamo: seconds)
    plan = [(c, list(c.modes), ["eager", "compile", *(p for p in c.providers if p != "eager"), *extra.get(c.op, [])])
            for c in cases]
    rows = []
    for case, modes, names in plan:
        for mode in modes:
            for name in names:
                prov = case.providers.get(name)
                if prov is not None and prov.modes is not None and mode not in prov.modes:
                    continue
                ms = rng.uniform(0.05, 5.0)
                row = {"op": case.op, "case": case.label, "desc": case.desc, "mode": mode, "provider": name,
                       **case.params, "ms": ms, "bytes": case.bytes_moved[mode],
                       "max_rel_err": None if name == "eager" else 1e-7}
                if case.flops:
                    row["tflops"] = case.flops[mode] / ms / 1e9
                    row["pct_matmul"] = 100 * row["tflops"] / 0.1
                row["gbps"] = row["bytes"] / ms / 1e6
                row["pct_copy"] = 100 * row["gbps"] / 20.0
                rows.append(row)
    copy = {"gbps": 20.0, "ms": 1.0, "bytes": 1 << 20, "buffer_mib": 64}
    peak = {"tflops": 0.1, "ms": 20.0, "n": 1024, "dtype": "float32"}
    return result(cfg, cases, plan, rows, {}, copy, peak, elapsed_s=1.0, estimate_s={"warm": 60, "cold": 420})


@pytest.fixture(scope="module")
def quick():
    """The quick CPU set: every op, its cases categories (grouped bars) or two sizes."""
    return fake_result(Config("cpu", torch.float32, quick=True, compile=False))


@pytest.fixture(scope="module")
def sweep():
    """Sweeps (the norms over 8 hidden sizes, attention over 2 sequence lengths in 2 series): lines."""
    return fake_result(Config("cpu", torch.float32, quick=False, compile=False), ops=("layer_norm", "attention"))


def _check_figure(fig, res, op):
    rows = [r for r in res["rows"] if r["op"] == op]
    provs = {r["provider"] for r in rows}
    assert len(fig.legends) == 1, "one legend per figure"
    entries = {t.get_text() for t in fig.legends[0].get_texts()}
    assert provs <= entries, provs - entries
    assert any("copy bandwidth" in e or "matmul" in e for e in entries), entries  # the roofline is named
    for handle in fig.legends[0].legend_handles:
        label = handle.get_label()
        if label in plots.STYLE:
            assert handle.get_color() == plots.STYLE[label][0]  # one colour per provider, every figure
    assert fig.axes
    for ax in fig.axes:
        assert ax.has_data(), f"{op}: empty axes {ax.get_title()!r}"
        assert ax.get_title() and ax.get_xlabel(), ax
    # title and machine line above the axes, not inside one
    title = fig.get_suptitle()
    assert op in title and res["meta"]["device_name"] in title
    assert not any(op in ax.get_title() for ax in fig.axes)
    modes = {r["mode"] for r in rows}
    assert {ax.get_title().split(":")[0] for ax in fig.axes} == modes  # a row of panels per mode, no more
    assert any("speedup" in ax.get_title() for ax in fig.axes)


@pytest.mark.parametrize("op", list(OPS))
def test_figure_per_op(quick, op):
    fig = plots.figure(quick, op)
    try:
        _check_figure(fig, quick, op)
        if plots.numeric_series(quick, [r for r in quick["rows"] if r["op"] == op]) is None:
            # categories: grouped bars named in users' units, no lines joining them
            assert all(ax.patches for ax in fig.axes)
            assert not [l for ax in fig.axes for l in ax.lines if l.get_marker() not in (None, "None", "")]
            labels = {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}
            assert {r["desc"] for r in quick["rows"] if r["op"] == op} <= labels
    finally:
        plt.close(fig)


@pytest.mark.parametrize("op", ["layer_norm", "attention"])
def test_sweep_figures_are_lines(sweep, op):
    rows = [r for r in sweep["rows"] if r["op"] == op]
    series = plots.numeric_series(sweep, rows)
    assert series and all(len(cases) >= 2 for cases in series.values())
    fig = plots.figure(sweep, op)
    try:
        _check_figure(fig, sweep, op)
        lines = [l for ax in fig.axes for l in ax.lines if len(l.get_xdata()) >= 2]
        assert len(lines) >= len({r["provider"] for r in rows})
        colours = {}
        for ax in fig.axes:
            for l in ax.lines:
                if l.get_marker() not in (None, "None", ""):  # a provider's line, not a yardstick
                    colours.setdefault(l.get_color(), set()).add(l.get_marker())
        assert all(len(m) == 1 for m in colours.values())  # a colour always has the same marker
        if op == "attention":  # drawing takes a second: the figure with two series
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # e.g. constrained layout giving up: labels overlapping
                fig.canvas.draw()
    finally:
        plt.close(fig)


def test_style_is_fixed_and_distinct():
    assert plots.style("eager") == plots.STYLE["eager"]
    assert plots.style("some-new-peer") == plots.style("some-new-peer")  # stable for unknown names
    known = [c for c, _ in plots.STYLE.values()]
    assert len(set(known)) == len(known)


def test_write_files(tmp_path):
    ops = ("clip_grad_norm", "bias_leaky_relu")  # drawing takes a second a figure: one of them
    res = json.loads(json.dumps(fake_result(Config("cpu", torch.float32, quick=True, compile=False), ops)))
    res["rows"] = [r for r in res["rows"] if r["op"] == "clip_grad_norm" or r["provider"] == "eager"]
    paths = report.write(res, tmp_path, plot="svg", log=lambda s: None)
    names = {p.name for p in paths}
    base = report.stem(res)
    assert names == {f"{base}.json", f"{base}.txt", f"{base}.md"} | {f"{base}-{op}.svg" for op in ops}
    md = (tmp_path / f"{base}.md").read_text()
    for op in ops:
        assert f"![{op}]({base}-{op}.svg)" in md and f"## {op}" in md
    assert json.loads((tmp_path / f"{base}.json").read_text())["schema"] == SCHEMA
    assert report.write(res, tmp_path / "none", plot="none") == [tmp_path / "none" / f"{base}.{e}"
                                                                 for e in ("json", "txt", "md")]


def test_text_explains_itself(quick):
    out = report.text(quick)
    head = report.header(quick)
    listed = head.split("\nproviders:\n")[1].split("\ncolumns:")[0]
    for name in quick["providers"]:  # each provider named once, with what it is
        assert sum(line.split()[0:1] == [name] for line in listed.splitlines()) == 1, name
    assert "matmul" in quick["providers"] and "yardstick" in quick["providers"]["matmul"]
    assert "eager-loop" in quick["providers"] and "yardstick" in quick["providers"]["eager-loop"]
    for b in quick["backends"]:
        assert f"{'ran' if b['ran'] else 'not run':8}{b['name']}" in head
    # shapes in users' units: the op's heading and each case's description
    assert "tokens x hidden" in out and "N x C x H x W" in out and "params" in out
    assert "summary" in out and "x eager" in out


def test_summary_geomean():
    assert math.isclose(report.geomean([2.0, 8.0]), 4.0)
    assert report.geomean([None]) is None


def test_backends_say_why_not(monkeypatch):
    """On CPU without the interpreter the Triton backend cannot run: the table says why, and so for
    every backend that did not run, whatever fusedstab's backends are."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bs = {b["name"]: b for b in providers.backends("cpu", {"fusedstab-torch"}, {"fusedstab-torch"})}
    assert {"triton", "torch"} <= set(bs)  # and whatever else fusedstab has (cuda, cpu)
    assert bs["torch"]["ran"] and bs["torch"]["why"] is None
    assert not bs["triton"]["ran"] and "TRITON_INTERPRET=1" in bs["triton"]["why"]
    for b in bs.values():
        assert b["ran"] or b["why"], b
        assert b["what"] and b["provider"] == f"fusedstab-{b['name']}"
    assert sum(b["default"] for b in bs.values()) <= 1  # the automatic choice, where fusedstab says it
    only = providers.backends("cpu", {"fusedstab-torch"}, set(), only=["eager"])
    assert next(b for b in only if b["name"] == "torch")["why"] == "not selected (--providers)"
    failed = providers.backends("cpu", {"fusedstab-torch"}, set())
    assert next(b for b in failed if b["name"] == "torch")["why"] == "every call failed: see the notes"
