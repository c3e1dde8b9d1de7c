"""Turn results into text (header, one table per op, summary, notes), JSON, and a Markdown page that
shows the plots (``plots.py``) beside the tables.

The header explains the report: the machine and versions, the two yardsticks, which fusedstab
backends ran and why the others did not, and what each provider is.
"""
from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

WIDTH = 100


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def compute_bound(rows: list[dict]) -> bool:
    return any(r.get("tflops") is not None for r in rows)


def by_op(res: dict) -> dict[str, list[dict]]:
    out: dict = {}
    for r in res["rows"]:
        out.setdefault(r["op"], []).append(r)
    return out


def providers_in(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["provider"] for r in rows))


def geomean(xs) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


# ----------------------------------------------------------------------------- text
def header(res: dict) -> str:
    m, c, mm = res["meta"], res["copy_bandwidth"], res.get("matmul_peak")
    threads = f" ({m['torch_threads']} threads)" if m["device"] == "cpu" else ""
    commit = f" | git {m['git_commit'][:9]}{'+dirty' if m.get('git_dirty') else ''}" if m.get("git_commit") else ""
    lines = [f"fusedstab benchmark: {m['device_name']}{threads} | {m['device']} | {m['dtype']} | torch {m['torch']}"
             f" | triton {m['triton']} | python {m['python']} | {m['date'].replace('T', ' ')}{commit}"]
    yard = f"yardsticks measured in this run: copy {c['gbps']:.1f} GB/s (read + write, {c['buffer_mib']} MiB)"
    if mm:
        yard += f"; matmul {mm['n']}^3 {mm['dtype']} {mm['tflops']:.3g} TFLOP/s"
    lines.append(yard)
    if res.get("backends"):
        lines.append(f"fusedstab backends on {m['device']} (fusedstab.available_backends(): "
                     f"{', '.join(b['name'] for b in res['backends'] if b['available']) or 'none'}):")
        for b in res["backends"]:
            text = b["what"] + (" (the default here)" if b.get("default") else "") + (f": {b['why']}" if b["why"] else "")
            lines += _wrapped(f"  {'ran' if b['ran'] else 'not run':8}{b['name']:8}", text)
    if res.get("providers"):
        lines.append("providers:")
        w = max(map(len, res["providers"])) + 2
        for name, what in res["providers"].items():
            lines += _wrapped(f"  {name:{w}}", what)
    lines += textwrap.wrap(
        "columns: ms = median time of one call; GB/s = the fewest bytes the op must move (each input read "
        "once, each output written once) / time; %copy = GB/s / the copy bandwidth, the ceiling for these "
        "memory-bound ops; TFLOP/s and %matmul (of the matmul above) for the compute-bound ones; "
        "x eager, x compile = speedup over that provider (above 1: faster); err = max relative error "
        "vs eager.", WIDTH, subsequent_indent="  ")
    return "\n".join(lines)


def _wrapped(head: str, text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=head, subsequent_indent=" " * len(head)) or [head]


def table(res: dict) -> str:
    """One section per op: its shape column in users' units, one block of rows per shape and mode."""
    sections = []
    for op, rows in by_op(res).items():
        info = res.get("ops", {}).get(op, {})
        flops = compute_bound(rows)
        cols = ["mode", info.get("shape", "shape"), "provider", "ms"]
        cols += ["TFLOP/s", "%matmul"] if flops else ["GB/s", "%copy"]
        cols += ["x eager", "x compile", "err"]
        extra = [k for k in ("launches", "syncs") if any(r.get(k) is not None for r in rows)]
        lines, last = [], None
        for r in rows:
            group = (r["case"], r["mode"])
            if last is not None and group != last:
                lines.append(None)  # blank line between shapes
            last = group
            rate = ([_fmt(r.get("tflops"), ".3g"), _fmt(r.get("pct_matmul"), ".1f")] if flops else
                    [_fmt(r["gbps"], ".1f"), _fmt(r["pct_copy"], ".1f")])
            lines.append([r["mode"], r.get("desc") or r["case"], r["provider"], _fmt(r["ms"], ".4f"), *rate,
                          _fmt(r["speedup_vs_eager"], ".2f"), _fmt(r["speedup_vs_compile"], ".2f"),
                          _fmt(r["max_rel_err"], ".1e"), *(_fmt(r.get(k), "d") for k in extra)])
        title = f"{op}: {info['what']}" if info.get("what") else op
        sections.append(_render(cols + extra, lines, title, left=3))
    return "\n\n".join(sections)


def summary(res: dict) -> str:
    """Per op and mode: geometric-mean speedup vs eager and the median % of the yardstick per provider."""
    lines = []
    provs = providers_in(res["rows"])
    for op, rows in by_op(res).items():
        key = "pct_matmul" if compute_bound(rows) else "pct_copy"
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cells = []
            for p in provs:
                rs = [r for r in rows if r["mode"] == mode and r["provider"] == p]
                pcts = sorted(r[key] for r in rs if r.get(key) is not None)
                if not rs:
                    cells.append("")
                    continue
                pct = f"{pcts[len(pcts) // 2]:4.0f}%" if pcts else "    -"
                cells.append(f"{_fmt(geomean(r['speedup_vs_eager'] for r in rs), '.2f')}x {pct}")
            lines.append([op, mode, *cells])
    heavy = [op for op, rows in by_op(res).items() if compute_bound(rows)]
    title = ("summary over the shapes of each op: geomean speedup vs eager, then the median % of the copy "
             "bandwidth" + (f" (of the matmul for {', '.join(heavy)})" if heavy else ""))
    return _render(["op", "mode", *provs], lines, title, left=2)


def _render(cols, lines, title, left=2) -> str:
    rows = [l for l in lines if l is not None]
    w = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(s.ljust(w[i]) if i < left else s.rjust(w[i]) for i, s in enumerate(r)).rstrip()
    out = ([title] if title else []) + [fmt(cols), fmt(["-" * x for x in w])]
    out += ["" if l is None else fmt(l) for l in lines]
    return "\n".join(out)


def notes(res: dict) -> str:
    return "\n".join(["notes:"] + [f"  - {n}" for n in res["notes"]]) if res["notes"] else ""


def text(res: dict) -> str:
    return "\n\n".join(filter(None, [header(res), table(res), summary(res), notes(res)]))


# ----------------------------------------------------------------------------- Markdown
def markdown(res: dict, figures: dict[str, str]) -> str:
    """The report as a page: header, summary, then per op its figure and a table of every case."""
    m = res["meta"]
    out = [f"# fusedstab benchmark: {m['device_name']}, {m['dtype']}, {m['date'][:10]}", "",
           "```", header(res), "```", "", "## Summary", "", "```", summary(res), "```", ""]
    for op, rows in by_op(res).items():
        info = res.get("ops", {}).get(op, {})
        out += [f"## {op}", ""]
        if info.get("what"):
            out += [f"Timed: `{info['what']}`." + (f" fusedstab's kernel fuses {info['fuses']}." if info.get("fuses") else ""), ""]
        if op in figures:
            out += [f"![{op}]({figures[op]})", ""]
        provs = providers_in(rows)
        flops = compute_bound(rows)
        out += ["ms per call (speedup vs eager" + (", TFLOP/s" if flops else "") + "):", ""]
        out.append("| " + " | ".join([info.get("shape", "shape"), "mode", *provs]) + " |")
        out.append("|" + "---|" * (len(provs) + 2))
        for case in dict.fromkeys(r["case"] for r in rows):
            for mode in dict.fromkeys(r["mode"] for r in rows if r["case"] == case):
                by = {r["provider"]: r for r in rows if r["case"] == case and r["mode"] == mode}
                cells = []
                for p in provs:
                    r = by.get(p)
                    if r is None:
                        cells.append("")
                        continue
                    cell = f"{r['ms']:.3g}"
                    if p != "eager" and r["speedup_vs_eager"]:
                        cell += f" ({r['speedup_vs_eager']:.2f}x)"
                    if flops and r.get("tflops") is not None:
                        cell += f", {r['tflops']:.3g} TFLOP/s"
                    cells.append(cell)
                desc = next(iter(by.values())).get("desc") or case
                out.append("| " + " | ".join([desc, mode, *cells]) + " |")
        out.append("")
    if res["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files
def stem(res: dict) -> str:
    m = res["meta"]
    name = re.sub(r"[^a-z0-9]+", "-", m["device_name"].lower()).strip("-")[:40]
    date = m["date"][:19].replace(":", "").replace("-", "").replace("T", "-")
    return f"{name}-{m['dtype']}-{date}" + ("-tiny" if m.get("tiny") else "")


def write(res: dict, out_dir: Path, plot: str = "png", log=lambda s: None) -> list[Path]:
    """Under ``out_dir``: ``<stem>.json``, ``<stem>.txt`` (the printed report), ``<stem>.md`` (the page)
    and one figure per op, ``<stem>-<op>.png`` (or .svg; ``plot="none"``: no figures)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = stem(res)
    figures = {}
    if plot != "none":  # first: a missing matplotlib becomes a note in the JSON
        from .plots import plot_all

        figures = plot_all(res, out_dir, base, fmt=plot, log=log)
    names = {op: p.name for op, p in figures.items()}
    paths = [out_dir / f"{base}.json", out_dir / f"{base}.txt", out_dir / f"{base}.md"]
    paths[0].write_text(json.dumps(res, indent=1) + "\n")
    paths[1].write_text(text(res) + "\n")
    paths[2].write_text(markdown(res, names))
    return paths + list(figures.values())
