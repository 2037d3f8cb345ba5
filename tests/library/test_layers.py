"""The dependency rule between the package's two layers: the library (``vocabsem_fast`` and its
backends, the Triton kernels) never imports the application (``vocabsem_fast.app``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vocabsem_fast

PACKAGE = Path(vocabsem_fast.__file__).parent
REPO = PACKAGE.parent


def _library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts]


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def test_library_files_are_found():
    names = {p.name for p in _library_files()}
    assert {"ops.py", "reference.py", "chunked.py", "similarity.py"} <= names
    assert "cli.py" not in names


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_the_application(path):
    bad = [name for name in _imported_modules(path) if name.split(".")[:2] == ["vocabsem_fast", "app"]]
    assert not bad, f"{path.relative_to(REPO)} imports the application layer: {bad}"


def test_the_resolver_sees_relative_imports():
    # a check that cannot fail would prove nothing: the resolver must map ``..app`` into the application
    names = _imported_modules(PACKAGE / "app" / "cli.py")
    assert any(name.startswith("vocabsem_fast.app.") for name in names)
    assert "vocabsem_fast.bases.SemanticBasis" in names


def test_importing_the_library_loads_no_application_module():
    code = (
        "import sys, vocabsem_fast, vocabsem_fast.hf, vocabsem_fast.distributed, vocabsem_fast.kmeans;"
        "print(sorted(m for m in sys.modules if m.startswith('vocabsem_fast.app')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_repository_root_holds_no_package_but_vocabsem_fast():
    """Tests and ``python -m`` put the repository root on sys.path: a package folder there would
    shadow an installed module of the same name (a root ``kernels/`` hid the Hugging Face
    ``kernels`` library, which transformers imports, and broke every model load)."""
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["vocabsem_fast"]
