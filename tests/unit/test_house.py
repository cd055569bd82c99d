"""The house rules that keep the package easy to walk, checked over the source tree.

The package root holds only the entry points and the foundations (at most 8 modules beside the
subpackages); no file is over 400 lines and no function over 80; no comment or docstring cites a
design document that is not in the repository (docs/ is where design knowledge lives); the README
stays a user's page of at most 12 KB and its links into docs/ resolve.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "alchemist_sgl"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
OUTSIDE_DOCS = re.compile(r"\b(MISSION|PLATFORM|INTERFACES|STYLE)\.md\b")


def _sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_package_root_keeps_at_most_eight_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 8, modules
    assert {"cli.py", "errors.py", "log.py", "runtime.py"} <= set(modules)
    assert (PACKAGE / "config.py").exists() or (PACKAGE / "config" / "__init__.py").exists()


def test_no_file_over_400_lines_and_no_function_over_80() -> None:
    too_long: list[str] = []
    for path in _sources("alchemist_sgl"):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = (node.end_lineno or node.lineno) - node.lineno + 1
                if span > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {span} lines")
    assert not too_long, "\n".join(too_long)


def test_no_source_cites_a_document_outside_the_repository() -> None:
    citing = [f"{p.relative_to(ROOT)}:{n}" for p in _sources("alchemist_sgl", "eval", "tests")
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if OUTSIDE_DOCS.search(line) and p.name != "test_house.py"]
    for extra in ("pyproject.toml", "Makefile", ".importlinter", "mypy.ini"):
        text = (ROOT / extra).read_text()
        citing += [f"{extra}:{n}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE_DOCS.search(line)]
    assert not citing, "\n".join(citing)


def test_readme_is_a_users_page_and_its_docs_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert links, "the README links into docs/"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing
    assert "make run" in readme and "make test" in readme


DATA_PATH = ("online", "train", "store", "feedback", "record")


def _mentions_any(annotation: ast.expr | None) -> bool:
    return annotation is not None and any(
        (isinstance(n, ast.Name) and n.id == "Any") or (isinstance(n, ast.Attribute) and n.attr == "Any")
        or (isinstance(n, ast.Constant) and isinstance(n.value, str) and re.search(r"\bAny\b", n.value))
        for n in ast.walk(annotation))


def test_data_path_constructors_take_no_any() -> None:
    """Constructors (``__init__`` parameters and dataclass fields) of the data-path packages are typed."""
    offenders: list[str] = []
    for path in _sources(*(f"alchemist_sgl/{pkg}" for pkg in DATA_PATH)):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for item in cls.body:
                if isinstance(item, ast.AnnAssign) and _mentions_any(item.annotation):
                    offenders.append(f"{path.relative_to(ROOT)}:{item.lineno} {cls.name} field")
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args.args + item.args.kwonlyargs
                    offenders += [f"{path.relative_to(ROOT)}:{item.lineno} {cls.name}({a.arg})"
                                  for a in args if _mentions_any(a.annotation)]
    assert not offenders, "\n".join(offenders)
