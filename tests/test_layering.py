"""Which rooms may import which, and what each layer keeps out.

nvae_platform's rooms stand in levels, and an import only points down a level or stays in its room:
the shared files at its top (preflight, defaults, the Ray a command runs on, ...) import no room;
train/ imports only those; record/ also train/; evaluate/ also record/; study/ anything below it.
nvae_core imports no platform. Beside the rule (read from the source, no import run): nvae_core
never loads Ray or MLflow; declaring a study and building a report never Ray; a study's trial
process (its plan and trial function) never MLflow, Optuna or scikit-learn, each a second or so of
every trial process's start (checked in a fresh interpreter).
"""
import ast
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LEVELS = {"shared": 0, "train": 1, "record": 2, "evaluate": 3, "study": 4}


def _room(module):
    """The room of a module name under nvae_platform ('shared' for the files at its top), else None."""
    parts = module.split(".")
    if parts[0] != "nvae_platform":
        return None
    return parts[1] if len(parts) > 2 and parts[1] in LEVELS else "shared"


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # nvae_core's own relative imports; the platform's rooms import by absolute name
                assert "nvae_platform" not in path.parts, f"{path}: a relative import"
                continue
            if node.module == "nvae_platform" or node.module.startswith("nvae_platform.") and \
                    node.module.count(".") == 1 and node.module.split(".")[1] in LEVELS:
                yield from (f"{node.module}.{alias.name}" for alias in node.names)  # from nvae_platform.train import x
            else:
                yield node.module


def _platform_files():
    return sorted((REPO / "nvae_platform").rglob("*.py"))


def test_every_platform_file_sits_in_a_known_room():
    rooms = {p.parent.name for p in _platform_files()} - {"nvae_platform"}
    assert rooms == set(LEVELS) - {"shared"}, f"a new room needs its level in LEVELS: {rooms}"


@pytest.mark.parametrize("path", _platform_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down_or_stay_in_their_room(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    here = _room(module + ".x") if path.name == "__init__.py" else _room(module)
    upward = [name for name in _imports(path) if (room := _room(name)) is not None and room != here
              and LEVELS[room] >= LEVELS[here]]
    assert not upward, f"{module} ({here}) imports {upward}: an import may only point to a room below its own"


def test_nvae_core_imports_no_platform():
    found = [(p.name, name) for p in (REPO / "nvae_core").rglob("*.py") for name in _imports(p)
             if name.split(".")[0] in ("nvae_platform", "reports", "ray", "mlflow")]
    assert not found


@pytest.mark.parametrize("modules, absent", [
    ("nvae_core, nvae_core.datasets, nvae_core.evaluation", ("ray", "mlflow")),
    (("nvae_platform.study, nvae_platform.study.declaration, nvae_platform.train.scales, "
      "nvae_platform.train.run_options, nvae_platform.defaults, nvae_platform.study.progress_view"), ("ray",)),
    ("reports, reports.__main__, reports.build", ("ray",)),
    ("nvae_platform.study.plan, nvae_platform.study.trial, nvae_platform.train.worker_loop",
     ("mlflow", "optuna", "sklearn")),
])
def test_layer_imports_stay_out(modules, absent):
    code = f"import sys; import {modules}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {modules} loaded {out.stdout.strip()}"
