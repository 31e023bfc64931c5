#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb (what `nbdev-readme` does, without Quarto, which is not installable offline).

Usage: `python tools/readme.py` writes README.md; `python tools/readme.py --check` exits 1 when README.md is stale.
Cells marked `#| hide` are left out, directive lines are dropped, code cells become fenced Python followed by
their saved outputs (markdown as is, plain text fenced). Image links relative to `nbs/` (`images/...`, right for the
docs site) are rewritten relative to the repository root, and so are links to the notebooks (`01_data.ipynb`, which
Quarto turns into the page's address on the site and GitHub opens as `nbs/01_data.ipynb`).
"""
import argparse, difflib, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n"


def _src(cell): return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]

def _directives(src):
    lines = src.splitlines()
    dirs = {l[3:].strip().split(":")[0].split()[0] for l in lines if l.startswith("#| ") and l[3:].strip()}
    return dirs, "\n".join(l for l in lines if not l.startswith("#|")).strip()

def _output(o):
    data = o.get("data", {})
    if o["output_type"] == "stream": return f"```\n{''.join(o['text']).rstrip()}\n```"
    if "text/markdown" in data: return "".join(data["text/markdown"]).strip()
    if "text/plain" in data: return f"```\n{''.join(data['text/plain']).rstrip()}\n```"
    return ""

def _from_root(md:str)->str:
    "Links relative to `nbs/` (images, other notebooks) made relative to the repository root"
    return re.sub(r"\]\((?!https?:|#|/)([\w./-]+\.ipynb(?:#[\w-]*)?)\)", r"](nbs/\1)", md.replace("](images/", "](nbs/images/"))

def render(nb_path:Path)->str:
    "The README text for the notebook at `nb_path`"
    parts = []
    for cell in json.loads(nb_path.read_text(encoding="utf-8"))["cells"]:
        dirs, body = _directives(_src(cell))
        if "hide" in dirs or not body: continue
        if cell["cell_type"] == "markdown": parts.append(_from_root(body)); continue
        if cell["cell_type"] != "code": continue
        if "hide_input" not in dirs: parts.append(f"```python\n{body}\n```")
        if "hide_output" not in dirs: parts += [s for s in map(_output, cell.get("outputs", [])) if s]
    return HEADER + "\n\n".join(parts) + "\n"

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail when README.md differs from the notebook")
    a = p.parse_args()
    want, readme = render(ROOT/"nbs"/"index.ipynb"), ROOT/"README.md"
    if not a.check: readme.write_text(want, encoding="utf-8"); return
    have = readme.read_text(encoding="utf-8") if readme.exists() else ""
    if have != want:
        sys.stdout.writelines(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "README.md", "index.ipynb"))
        sys.exit("README.md is stale: run `python tools/readme.py` and commit it")

if __name__ == "__main__": main()
