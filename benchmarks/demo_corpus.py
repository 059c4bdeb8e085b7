"""Build the demo's training and held-out corpus: copies of permissively licensed Python source, one folder per package.

Usage: python benchmarks/demo_corpus.py OUT_DIR
Writes OUT_DIR/train/<package>/..., OUT_DIR/held_out/<package>/..., OUT_DIR/LICENSES/<package>.txt and
OUT_DIR/manifest.json. Leaves out tests, vendored code, generated tables and long data strings, and the
licence comment block at the top of each file (thousands of identical headers teach nothing).

In the training split, most function and class docstrings are left out (:func:`thin_docstrings`; one in
twenty kept): an 8M-parameter model that sees a docstring open after most signatures writes one
after every signature, and greedy decoding then loops inside its prose instead of writing the body.
Module docstrings, comments and the few kept still teach the prose; the held-out packages stay verbatim.
"""

import ast
import hashlib
import json
import re
import sys
import sysconfig
from pathlib import Path

SITE = Path(sysconfig.get_paths()["purelib"])
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SKIP_DIRS = {
    "test",
    "tests",
    "testing",
    "idle_test",
    "_vendor",
    "vendor",
    "vendored",
    "_distutils",
    "encodings",
    "pydoc_data",
    "__pycache__",
    "site-packages",
    "benchmarks",
    "_antlr",
    "data",
    "models",
}
# package -> (root, licence files relative to site-packages, SPDX, byte budget or None, extra skip regex)
PACKAGES = {
    "cpython-stdlib": (STDLIB, None, "PSF-2.0", None, r"^(lib2to3|idlelib|turtledemo|ensurepip|config-3)"),
    "sympy": (SITE / "sympy", "sympy-*.dist-info/licenses/LICENSE", "BSD-3-Clause", 9_000_000, None),
    "torch": (SITE / "torch", "torch-*.dist-info/licenses/LICENSE", "BSD-3-Clause", 9_000_000, r"^(_C|include|share|lib|bin)/"),
    "transformers": (SITE / "transformers", "transformers-*.dist-info/licenses/LICENSE", "Apache-2.0", 6_000_000, None),
    "numpy": (SITE / "numpy", "numpy-*.dist-info/licenses/LICENSE.txt", "BSD-3-Clause", None, r"^(f2py/|_core/include)"),
    "networkx": (SITE / "networkx", "networkx-*.dist-info/licenses/LICENSE.txt", "BSD-3-Clause", None, None),
    "pip": (SITE / "pip", "pip-*.dist-info/LICENSE.txt", "MIT", None, None),
    "setuptools": (SITE / "setuptools", "setuptools-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "huggingface_hub": (SITE / "huggingface_hub", "huggingface_hub-*.dist-info/licenses/LICENSE", "Apache-2.0", None, None),
    "pydantic": (SITE / "pydantic", "pydantic-2*.dist-info/licenses/LICENSE", "MIT", None, None),
    "rich": (SITE / "rich", "rich-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "pytest": (SITE / "_pytest", "pytest-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "pygments": (
        SITE / "pygments",
        "pygments-*.dist-info/licenses/LICENSE",
        "BSD-2-Clause",
        None,
        r"(_mapping|_builtins|_data|_tables)",
    ),
    "anyio": (SITE / "anyio", "anyio-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "packaging": (SITE / "packaging", "packaging-*.dist-info/licenses/LICENSE.BSD", "BSD-2-Clause", None, None),
    "fsspec": (SITE / "fsspec", "fsspec-*.dist-info/licenses/LICENSE", "BSD-3-Clause", None, None),
    "tomlkit": (SITE / "tomlkit", "tomlkit-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "markdown_it": (SITE / "markdown_it", "markdown_it_py-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "yaml": (SITE / "yaml", "pyyaml-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "filelock": (SITE / "filelock", "filelock-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "sortedcontainers": (SITE / "sortedcontainers", "sortedcontainers-*.dist-info/LICENSE", "Apache-2.0", None, None),
    "mpmath": (SITE / "mpmath", "mpmath-*.dist-info/LICENSE", "BSD-3-Clause", None, None),
    "typer": (SITE / "typer", "typer-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "httpx2": (SITE / "httpx2", "httpx2-*.dist-info/licenses/LICENSE.md", "BSD-3-Clause", None, None),
    "httpcore2": (SITE / "httpcore2", "httpcore2-*.dist-info/licenses/LICENSE.md", "BSD-3-Clause", None, None),
    "pluggy": (SITE / "pluggy", "pluggy-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "annotated_types": (SITE / "annotated_types", "annotated_types-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "shellingham": (SITE / "shellingham", "shellingham-*.dist-info/LICENSE", "ISC", None, None),
    "iniconfig": (SITE / "iniconfig", "iniconfig-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "mdurl": (SITE / "mdurl", "mdurl-*.dist-info/LICENSE", "MIT", None, None),
}
# Whole packages never trained on: the held-out evaluation.
HELD_OUT = {
    "click": (SITE / "click", "click-*.dist-info/licenses/LICENSE.txt", "BSD-3-Clause", None, None),
    "jinja2": (SITE / "jinja2", "jinja2-*.dist-info/licenses/LICENSE.txt", "BSD-3-Clause", None, None),
    "h11": (SITE / "h11", "h11-*.dist-info/licenses/LICENSE.txt", "MIT", None, None),
    "tabulate": (SITE / "tabulate", "tabulate-*.dist-info/licenses/LICENSE", "MIT", None, None),
    "markupsafe": (SITE / "markupsafe", "markupsafe-*.dist-info/licenses/LICENSE.txt", "BSD-3-Clause", None, None),
}
MAX_BYTES, MAX_LINE, MAX_DIGITS = 200_000, 300, 0.15
GENERATED = re.compile(r"(auto-?generated|generated by|do not edit)", re.IGNORECASE)


def strip_header(text: str) -> str:
    """Drop the leading comment block (licence and copyright lines), keeping the rest verbatim."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        i += 1
    return "".join(lines[i:])


# The fraction of function and class docstrings kept in the training split (chosen per docstring by hash).
KEEP_DOCSTRINGS = 0.05


def thin_docstrings(text: str, key: str, keep: float = KEEP_DOCSTRINGS) -> str:
    """``text`` without the docstrings of most of its functions and classes (whole lines removed).

    A docstring stays when it is its body's only statement, shares a line with other code, or its hash
    (of ``key`` and its line) falls in the kept fraction; text that does not parse is returned unchanged.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text
    drop: list[tuple[int, int]] = []  # 0-based line ranges [start, end)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or len(node.body) < 2:
            continue
        first, second = node.body[0], node.body[1]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)):
            continue
        if first.end_lineno is None or second.lineno <= first.end_lineno:
            continue
        digest = hashlib.sha1(f"{key}:{first.lineno}".encode()).digest()
        if digest[0] / 256 < keep:
            continue
        drop.append((first.lineno - 1, first.end_lineno))
    lines = text.splitlines(keepends=True)
    if not drop or any(not lines[start].lstrip().startswith(("'", '"', "r", "u", "b", "f")) for start, _ in drop):
        return text  # a docstring that does not start its own line: leave the file alone
    dropped = set()
    for start, end in drop:
        dropped.update(range(start, end))
    thinned = "".join(line for i, line in enumerate(lines) if i not in dropped)
    try:
        ast.parse(thinned)
    except (SyntaxError, ValueError):
        return text
    return thinned


def usable(text: str) -> bool:
    if not text.strip() or len(text) > MAX_BYTES or GENERATED.search(text[:2000]):
        return False
    if max(len(line) for line in text.splitlines()) > MAX_LINE:
        return False
    return sum(c.isdigit() for c in text) / len(text) <= MAX_DIGITS


def collect(name, root, budget, skip):
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        if skip and re.search(skip, rel.as_posix()):
            continue
        try:
            text = strip_header(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if usable(text):
            files.append((rel, text))
    if budget is not None:  # a deterministic spread of the package's files up to the budget
        files.sort(key=lambda f: hashlib.sha1(f"{name}/{f[0]}".encode()).hexdigest())
        kept, size = [], 0
        for rel, text in files:
            if size + len(text) <= budget:
                kept.append((rel, text))
                size += len(text)
        files = kept
    return files


def main(out: Path) -> None:
    manifest = {}
    (out / "LICENSES").mkdir(parents=True, exist_ok=True)
    for split, table in (("train", PACKAGES), ("held_out", HELD_OUT)):
        for name, (root, licence, spdx, budget, skip) in table.items():
            files = collect(name, root, budget, skip)
            if split == "train":
                files = [(rel, thin_docstrings(text, f"{name}/{rel}")) for rel, text in files]
            for rel, text in files:
                dest = out / split / name / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text, encoding="utf-8")
            if licence is None:
                lic = STDLIB / "LICENSE.txt"
            else:
                lic = next(SITE.glob(licence))
            (out / "LICENSES" / f"{name}.txt").write_text(lic.read_text(encoding="utf-8"), encoding="utf-8")
            version = (
                sys.version.split()[0]
                if name == "cpython-stdlib"
                else next(SITE.glob(licence.split("/")[0])).name.removesuffix(".dist-info").split("-")[1]
            )
            manifest[name] = {
                "split": split,
                "version": version,
                "license": spdx,
                "files": len(files),
                "bytes": sum(len(t.encode()) for _, t in files),
            }
            print(f"{split:8} {name:18} {version:12} {spdx:14} {len(files):5} files {manifest[name]['bytes']:>10,} bytes")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
