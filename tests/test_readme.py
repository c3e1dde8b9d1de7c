"""The README as a user reads it: every ```python block runs as pasted, each on its own (a fresh
namespace, nothing defined by an earlier block), in a fresh process on CPU without the Triton
interpreter, as on a user's CPU machine; every `python -m fusedstab.bench ...` line in a ```bash
block parses with the harness's own argument parser."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

RUNNER = r'''
import json, sys, traceback
blocks = json.load(sys.stdin)
failed = []
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, f"README.md block at line {line}", "exec"), {"__name__": "__main__"})
    except Exception:
        failed.append(f"README.md block at line {line}:\n{traceback.format_exc()}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
'''


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block of ``lang``."""
    out = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", README, re.S | re.M):
        out.append((README.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


def test_python_snippets_run_as_pasted():
    import json

    code = blocks("python")
    assert len(code) >= 7  # the quick start, replace_modules and one per op family
    for line, src in code:
        assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in src, f"block at line {line}"
        assert ".cuda()" not in src, f"block at line {line}: use .to(device)"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDSTAB_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    p = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(code), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-5000:] + p.stderr[-3000:]


def test_bench_commands_parse():
    from fusedstab.bench.__main__ import parse

    cmds = [line.split("#")[0].strip() for _, src in blocks("bash") for line in src.splitlines()]
    cmds = [c.split("python -m fusedstab.bench", 1)[1] for c in cmds if "python -m fusedstab.bench" in c]
    assert len(cmds) >= 5
    for c in cmds:
        args = shlex.split(c)
        if args == ["--help"]:
            continue
        parse(args)  # argparse exits (SystemExit) on an option the harness does not have


@pytest.mark.parametrize("section", ["## Backends", "## Quick start", "### Reading the report"])
def test_sections_exist(section):
    assert f"\n{section}\n" in README  # linked from other sections, replaced as a whole by others
