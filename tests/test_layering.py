"""The layers import downwards only: app -> worker -> model, and serving never loads the training loop."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_packages(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_model_imports_neither_app_nor_worker():
    assert not imported_top_level_packages("model") & {"app", "worker"}


def test_worker_does_not_import_app():
    assert "app" not in imported_top_level_packages("worker")


def test_the_api_process_does_not_load_the_training_code():
    code = "import sys, app.main; print(sorted(m for m in ('model.training', 'torchmetrics') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
