"""Turn results into a table, a short summary, JSON and a PNG plot."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

COLS = ("op", "mode", "provider", "ms", "GB/s", "%copy", "x eager", "x compile", "err")
# Row fields that are no case parameter; the rest (M, N for norms; model, tensors, numel for clipping)
# become the shape columns of the table, one section per set of parameter names.
ROW_FIELDS = {"op", "case", "mode", "provider", "dtype", "ms", "bytes", "max_rel_err", "tflops", "gbps",
              "pct_copy", "speedup_vs_eager", "speedup_vs_compile", "launches", "syncs"}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def shape_keys(row: dict) -> tuple[str, ...]:
    return tuple(k for k in row if k not in ROW_FIELDS)


def table(res: dict) -> str:
    sections: dict = {}
    for r in res["rows"]:
        sections.setdefault(shape_keys(r), []).append(r)
    if not sections:
        return _render(COLS, [], _header(res))
    return "\n\n".join(_section(rows, keys, _header(res) if i == 0 else "")
                        for i, (keys, rows) in enumerate(sections.items()))


def _section(rows: list[dict], keys: tuple[str, ...], title: str) -> str:
    extra = [(name, key, spec) for name, key, spec in (("TFLOP/s", "tflops", ".2f"), ("launches", "launches", "d"),
                                                       ("syncs", "syncs", "d"))
             if any(r.get(key) is not None for r in rows)]  # compute-bound ops, CUDA launch counts
    lines, last = [], None
    for r in rows:
        group = (r["op"], r["mode"], *(r.get(k) for k in keys))
        if last is not None and group != last:
            lines.append(None)  # blank line between shapes
        last = group
        line = (r["op"], r["mode"], *(str(r.get(k, "")) for k in keys), r["provider"], _fmt(r["ms"], ".4f"),
                _fmt(r["gbps"], ".1f"), _fmt(r["pct_copy"], ".1f"), _fmt(r["speedup_vs_eager"], ".2f"),
                _fmt(r["speedup_vs_compile"], ".2f"), _fmt(r["max_rel_err"], ".1e"))
        lines.append(line + tuple(_fmt(r.get(key), spec) for _, key, spec in extra))
    cols = COLS[:2] + keys + COLS[2:] + tuple(name for name, _, _ in extra)
    return _render(cols, lines, title)


def summary(res: dict) -> str:
    """Per op and mode: geometric-mean speedup vs eager and median % of copy bandwidth per provider."""
    groups: dict = {}
    for r in res["rows"]:
        groups.setdefault((r["op"], r["mode"]), {}).setdefault(r["provider"], []).append(r)
    provs = list(dict.fromkeys(r["provider"] for r in res["rows"]))
    lines = []
    for (op, mode), by in groups.items():
        cells = []
        for p in provs:
            rs = by.get(p)
            if not rs:
                cells.append("-")
                continue
            sp = [r["speedup_vs_eager"] for r in rs if r["speedup_vs_eager"]]
            gm = math.exp(sum(map(math.log, sp)) / len(sp)) if sp else None
            pct = sorted(r["pct_copy"] for r in rs)[len(rs) // 2]
            cells.append(f"{_fmt(gm, '.2f')}x {pct:.0f}%")
        lines.append((op, mode, *cells))
    title = "summary: geomean speedup vs eager, median % of copy bandwidth, over the shapes of each op"
    return _render(("op", "mode", *provs), lines, title)


def _header(res: dict) -> str:
    m, c = res["meta"], res["copy_bandwidth"]
    return (f"{m['device_name']} | {m['dtype']} | torch {m['torch']} | triton {m['triton']} | {m['date']}\n"
            f"copy bandwidth {c['gbps']:.1f} GB/s (read + write); bytes = fewest bytes each mode must move")


def _render(cols, lines, title) -> str:
    rows = [l for l in lines if l is not None]
    w = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(s.rjust(w[i]) if i >= 2 else s.ljust(w[i]) for i, s in enumerate(r)).rstrip()
    out = ([title] if title else []) + [fmt(cols), fmt(["-" * x for x in w])]
    out += ["" if l is None else fmt(l) for l in lines]
    return "\n".join(out)


def notes(res: dict) -> str:
    return "\n".join(["notes:"] + [f"  - {n}" for n in res["notes"]]) if res["notes"] else ""


def stem(res: dict) -> str:
    m = res["meta"]
    name = re.sub(r"[^a-z0-9]+", "-", m["device_name"].lower()).strip("-")[:40]
    date = m["date"][:19].replace(":", "").replace("-", "").replace("T", "-")
    return f"{name}-{m['dtype']}-{date}" + ("-smoke" if m["smoke"] else "")


def write(res: dict, out_dir: Path) -> list[Path]:
    """JSON, the table as text, and the plot (if matplotlib is importable) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / stem(res)
    png = plot(res, base.with_suffix(".png"))  # first: a missing matplotlib becomes a note in the JSON
    paths = [base.with_suffix(".json"), base.with_suffix(".txt")]
    paths[0].write_text(json.dumps(res, indent=1) + "\n")
    paths[1].write_text("\n\n".join(filter(None, [table(res), summary(res), notes(res)])) + "\n")
    return paths + ([png] if png else [])


def plot(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        res["notes"].append("matplotlib not importable: no plot written")
        return None
    ops = list(dict.fromkeys(r["op"] for r in res["rows"]))
    modes = list(dict.fromkeys(r["mode"] for r in res["rows"]))
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(5 * len(modes), 3.6 * len(ops)), squeeze=False)
    copy = res["copy_bandwidth"]["gbps"]
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            rs = [r for r in res["rows"] if r["op"] == op and r["mode"] == mode]
            # compute-bound (matmul): TFLOP/s over the FLOPs of a call; the rest: GB/s over the size
            flops = any(r.get("tflops") is not None for r in rs)
            if flops:
                xkey, ykey, xlabel = "gflop", "tflops", "GFLOP per call"
                rs = [{**r, "gflop": r["tflops"] * r["ms"]} for r in rs if r.get("tflops") is not None]
            else:
                xkey = "N" if any("N" in r for r in rs) else "numel"  # norms: row length; else elements
                ykey = "gbps"
                xlabel = {"N": "N (row length)", "numel": "elements"}[xkey]
                if op == "clip_grad_norm":
                    xlabel = "elements in the parameter list"
            cases = list(dict.fromkeys(r["case"] for r in rs))
            tick = {r["case"]: " ".join(str(r[k]) for k in shape_keys(r) if k not in ("numel", "gflop")) for r in rs}
            xs = {}
            for r in rs:
                xs.setdefault(r.get(xkey), set()).add(r["case"])
            categorical = None in xs or any(len(c) > 1 for c in xs.values())  # shapes the size can't tell apart
            for p in dict.fromkeys(r["provider"] for r in rs):
                pts = sorted((cases.index(r["case"]) if categorical else r[xkey], r[ykey])
                             for r in rs if r["provider"] == p)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p, ls=":" if categorical else "-")
            if not flops:
                ax.axhline(copy, color="gray", ls="--", lw=1, label="copy")
            if categorical:
                ax.set_xticks(range(len(cases)), [tick[c] for c in cases], rotation=30, ha="right", fontsize=7)
                xlabel = "case"
            else:
                ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {mode}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("TFLOP/s" if flops else "GB/s")
            ax.grid(alpha=0.3)
    for row in axes:  # one legend per op: the op families have different providers
        row[0].legend(fontsize=8)
    m = res["meta"]
    fig.suptitle(f"{m['device_name']}, {m['dtype']}, {m['date'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
