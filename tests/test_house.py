"""The entry point and the documentation's references: `python -m compress` runs, and every bench/... or docs/...
path that README.md, CHANGELOG.md, docs/ and bench/README.md name exists in the checkout."""
import itertools
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATH = re.compile(r"(?<![\w./-])((?:bench|docs)/[\w./{},*-]+)")


def _expand(p: str) -> list[str]:
    """`a_{x,y}.json` -> [a_x.json, a_y.json] (the docs name file families this way)."""
    parts = re.split(r"\{([^{}]*)\}", p)
    choices = [[s] if i % 2 == 0 else s.split(",") for i, s in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_python_dash_m_compress_prints_the_cli_help():
    out = subprocess.run([sys.executable, "-m", "compress", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: compress" in out.stdout and "COMMAND" in out.stdout


def test_every_bench_and_docs_path_named_in_the_docs_exists():
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text()
        for m in PATH.finditer(text):
            raw = m.group(1).rstrip(".,)")
            if text[max(0, m.start() - 6):m.start()].endswith("--out ") or text[m.end():m.end() + 1] == "<":
                continue  # an output a command is told to write, or a name pattern
            if raw.endswith("/"):
                raw = raw.rstrip("/")
            for p in _expand(raw):
                hits = list(ROOT.glob(p)) if "*" in p else [ROOT / p]
                if not hits or not all(h.exists() for h in hits):
                    missing.append(f"{page.relative_to(ROOT)}: {p}")
    assert not missing, "\n".join(missing)


def test_markdown_links_between_pages_resolve():
    missing = []
    for page in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith("http"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, "\n".join(missing)
