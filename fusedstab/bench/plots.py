"""One matplotlib figure per op: throughput against size, and speedup vs eager, per mode.

Each figure has a row per mode (fwd, bwd, fwd+bwd; or norm, clip) and these panels in it:
- throughput: GB/s (memory-bound ops) or TFLOP/s (compute-bound ones) with the yardstick measured in
  the same run as the roofline (the copy bandwidth, or the matmul). Where the cases are points on a
  size axis (row length, sequence length) one line per provider, a panel per series (attention: head
  dim and causality); where they are categories (layouts, activations, model lists) grouped bars, a
  bar per provider, the cases named on the y axis in users' units.
- speedup vs eager: a bar per provider and case, log scale, 1x marked (a sweep with more than
  ``MAX_BARS`` bars: a bar per provider and series, the geomean over its sizes).
One colour and marker per provider in every figure (``STYLE``); one legend per figure; the title and
the machine line above the axes, the legend below them.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

from .report import by_op, compute_bound, geomean, providers_in

# Fixed per provider, so that a provider looks the same in every figure and every run.
STYLE = {
    "eager": ("#4d4d4d", "o"),
    "compile": ("#ff7f0e", "s"),
    "fusedstab-triton": ("#1f77b4", "D"),
    "fusedstab-cuda": ("#2ca02c", "P"),
    "fusedstab-cpu": ("#17becf", "X"),
    "fusedstab-torch": ("#9467bd", "v"),
    "eager-loop": ("#b0b0b0", "^"),
    "matmul": ("#8c564b", "*"),
    "liger": ("#e377c2", "<"),
    "apex": ("#bcbd22", ">"),
    "flash-attn": ("#d62728", "h"),
    "sdpa-flash": ("#ff9896", "p"),
    "sdpa-cudnn": ("#c49c94", "d"),
    "sdpa-efficient": ("#f7b6d2", "8"),
    "sdpa-math": ("#dbdb8d", "H"),
}
_SPARE = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#756bb1"]
ROOF = "#7f7f7f"
MAX_BARS = 60  # speedup bars in one panel; a sweep with more shows one group per series (geomean)


def style(provider: str) -> tuple[str, str]:
    """(colour, marker): fixed for known providers, else chosen by a stable hash of the name."""
    if provider in STYLE:
        return STYLE[provider]
    h = zlib.crc32(provider.encode())
    return _SPARE[h % len(_SPARE)], "ov^<>sDp*hH"[h % 11]


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(res: dict, out_dir: Path, base: str, fmt: str = "png", log=lambda s: None) -> dict[str, Path]:
    """Write ``<base>-<op>.<fmt>`` per op; {op: path}. Without matplotlib: a note, no figure."""
    try:
        plt = _mpl()
    except ImportError:
        res["notes"].append("matplotlib not importable: no figures written (pip install matplotlib)")
        return {}
    out = {}
    ops = by_op(res)
    for i, op in enumerate(ops, 1):
        log(f"plotting {op} ({i}/{len(ops)})")
        fig = figure(res, op)
        path = Path(out_dir) / f"{base}-{op}.{fmt}"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out[op] = path
    return out


def numeric_series(res: dict, rows: list[dict]) -> dict[str, list[str]] | None:
    """{series: case labels in size order} where every case has a size and each series has two or
    more distinct sizes; None: the cases are categories."""
    cases = res.get("cases", {})
    labels = list(dict.fromkeys(r["case"] for r in rows))
    info = [cases.get(c) or {} for c in labels]
    if not labels or any(i.get("x") is None for i in info):
        return None
    series: dict = {}
    for c, i in zip(labels, info):
        series.setdefault(i.get("series", ""), []).append((i["x"], c))
    for s, pts in series.items():
        xs = [x for x, _ in pts]
        if len(set(xs)) != len(xs) or len(xs) < 2:
            return None
        series[s] = [c for _, c in sorted(pts)]
    return series


def figure(res: dict, op: str):
    """The figure of ``op``: rows are modes; panels throughput (per series) and speedup vs eager."""
    plt = _mpl()
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    rows = by_op(res)[op]
    info = res.get("ops", {}).get(op, {})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    provs = providers_in(rows)
    labels = list(dict.fromkeys(r["case"] for r in rows))
    desc = {r["case"]: r.get("desc") or r["case"] for r in rows}
    flops = compute_bound(rows)
    ykey = "tflops" if flops else "gbps"
    unit = "TFLOP/s" if flops else "GB/s"
    if flops and res.get("matmul_peak"):
        mm = res["matmul_peak"]
        roof, roof_label = mm["tflops"], f"matmul {mm['n']}^3 {mm['dtype']}, this run: {mm['tflops']:.3g} TFLOP/s"
    elif flops:
        roof, roof_label = None, ""
    else:
        roof = res["copy_bandwidth"]["gbps"]
        roof_label = f"copy bandwidth, this run: {roof:.3g} GB/s"
    series = numeric_series(res, rows)
    sp_provs = [p for p in provs if p != "eager" and any(r["provider"] == p and r.get("speedup_vs_eager")
                                                         for r in rows)]

    n_thr = len(series) if series else 1
    n_cols = n_thr + (1 if sp_provs else 0)
    bar_rows = len(labels) * max(len(provs), 1)
    cat_h = min(9.0, max(2.4, 0.6 + 0.11 * bar_rows + 0.1 * len(labels)))
    # speedup bars: one group per case; a sweep with too many for that, one per series (geomean)
    sp_groups = [c for cs in series.values() for c in cs] if series else labels
    per_series = bool(series) and len(sp_groups) * len(sp_provs) > MAX_BARS
    if per_series:
        sp_groups = list(series)
        desc.update({name: name or "all sizes" for name in series})
    sp_h = min(9.0, max(2.4, 0.6 + 0.11 * len(sp_groups) * max(len(sp_provs), 1) + 0.1 * len(sp_groups)))
    row_h = max(3.0 if series else cat_h, sp_h if sp_provs else 0)
    label_w = 0.075 * max(len(d) for d in desc.values())  # inches of the y tick labels
    width = 5.2 * n_thr + (0 if series else label_w) + (4.6 if sp_provs else 0) + (label_w if series and sp_provs else 0)
    fig, axes = plt.subplots(len(modes), n_cols, figsize=(max(7.0, width), 1.6 + row_h * len(modes)),
                             squeeze=False, layout="constrained",
                             gridspec_kw={"width_ratios": [5.2] * n_thr + ([4.6] if sp_provs else [])})
    for i, mode in enumerate(modes):
        mrows = {(r["case"], r["provider"]): r for r in rows if r["mode"] == mode}
        if series:
            for j, (name, cases) in enumerate(series.items()):
                ax = axes[i][j]
                for p in provs:
                    pts = [(res["cases"][c]["x"], mrows[(c, p)][ykey]) for c in cases if (c, p) in mrows]
                    if pts:
                        color, marker = style(p)
                        ax.plot(*zip(*pts), color=color, marker=marker, lw=1.6, ms=5)
                if roof:
                    ax.axhline(roof, color=ROOF, ls="--", lw=1)
                xs = [res["cases"][c]["x"] for c in cases]
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [_size(x) for x in xs])
                ax.minorticks_off()
                ax.set_xlabel(info.get("x") or "size")
                ax.set_ylabel(unit)
                ax.set_ylim(bottom=0)
                ax.set_title(f"{mode}: {unit}" + (f", {name}" if name else "") + " (higher is better)", fontsize=10)
                ax.grid(alpha=0.3)
        else:
            ax = axes[i][0]
            _bars(ax, labels, [desc[c] for c in labels], provs, lambda c, p: (mrows.get((c, p)) or {}).get(ykey))
            if roof:
                ax.axvline(roof, color=ROOF, ls="--", lw=1)
            ax.set_xlabel(unit)
            ax.set_title(f"{mode}: {unit} (higher is better)", fontsize=10)
        if sp_provs:
            ax = axes[i][-1]
            if per_series:
                def speedup(group, p):
                    return geomean((mrows.get((c, p)) or {}).get("speedup_vs_eager") for c in series[group])
            else:
                def speedup(case, p):
                    return (mrows.get((case, p)) or {}).get("speedup_vs_eager")
            _bars(ax, sp_groups, [desc[g] for g in sp_groups], sp_provs, speedup,
                  show_labels=bool(series), annotate=True)
            ax.axvline(1.0, color=style("eager")[0], lw=1.2)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlim(*_limits([speedup(g, p) for g in sp_groups for p in sp_provs]))
            ax.set_xlabel("speedup vs eager (log; right of the line: faster)")
            ax.set_title(f"{mode}: speedup vs eager" + (", geomean over sizes" if per_series else ""), fontsize=10)
    for ax in fig.axes:  # a (series, mode) with no rows: no empty frame
        if not ax.has_data():
            fig.delaxes(ax)

    handles = [Line2D([], [], color=style(p)[0], marker=style(p)[1], lw=1.6, label=p) for p in provs]
    if roof:
        handles.append(Line2D([], [], color=ROOF, ls="--", lw=1, label=roof_label))
    if sp_provs:
        handles.append(Line2D([], [], color=style("eager")[0], lw=1.2, label="eager = 1x"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9, frameon=False)
    m = res["meta"]
    machine = (f"{m['device_name']}" + (f" ({m['torch_threads']} threads)" if m["device"] == "cpu" else "")
               + f" | {m['dtype']} | torch {m['torch']} | triton {m['triton']} | {m['date'][:10]}"
               + (" | --tiny: one cold call per bar, not a timing" if m.get("tiny") else ""))
    fig.suptitle(f"{op}: {info.get('what', '')}\n{machine}", fontsize=11)
    return fig


def _bars(ax, cases, names, provs, value, show_labels=True, annotate=False):
    """Horizontal grouped bars: a group per case (top to bottom), a bar per provider."""
    n = max(len(provs), 1)
    h = 0.8 / n
    vals = []
    for j, p in enumerate(provs):
        color, _ = style(p)
        ys, xs = [], []
        for i, c in enumerate(cases):
            v = value(c, p)
            if v is not None and v > 0:
                ys.append(i - 0.4 + h * (j + 0.5))
                xs.append(v)
        if xs:
            ax.barh(ys, xs, height=h * 0.92, color=color)
            vals += list(zip(ys, xs))
    ax.set_yticks(range(len(cases)), names if show_labels else [""] * len(cases), fontsize=8)
    ax.set_ylim(len(cases) - 0.5, -0.5)  # the first case on top
    ax.grid(axis="x", alpha=0.3)
    if annotate and len(vals) <= 60:
        for y, x in vals:
            ax.annotate(f"{x:.2g}x" if x < 0.1 else f"{x:.2f}x" if x < 10 else f"{x:.1f}x", (x, y), xytext=(2, 0), textcoords="offset points", va="center", fontsize=6)


def _limits(values) -> tuple[float, float]:
    """Log-axis limits that hold every value and 1x, with room for the value labels."""
    vs = [v for v in values if v] + [1.0]
    lo, hi = min(vs), max(vs)
    return 10 ** (math.floor(math.log10(lo) * 4) / 4 - 0.05), 10 ** (math.ceil(math.log10(hi) * 4) / 4 + 0.15)


def _size(x: float) -> str:
    x = int(x)
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if x >= div and x % div == 0:
            return f"{x // div}{unit}"
    return str(x)
