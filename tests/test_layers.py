"""The layers import downwards only: import-linter checks the contracts in pyproject.toml ([tool.importlinter]).

genco > sim > stream > learner | state > contract, nothing imports benchmarks/ or tests/, and the
two of those do not import each other. Imports inside functions and under TYPE_CHECKING count.
The second test breaks each rule in a copy of the source and checks the linter says so, so
the contracts cannot pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOT_PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]

pytest.importorskip("importlinter", reason="import-linter belongs in the [test] extra")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the source under ``root`` with its pyproject.toml (exit 0: every contract kept)."""
    run = ("import sys; from importlinter.cli import lint_imports; "
           "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", run], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
                               "NO_COLOR": "1", "COLUMNS": "200"})


def test_every_import_follows_the_layer_contracts():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 broken" in done.stdout, done.stdout


@pytest.mark.parametrize(("module", "imports"), [
    ("contract/events.py", "stream.kafka"),  # the contract imports nothing of genco
    ("contract/settings.py", "genco.cli"),
    ("state/kv.py", "learner.model"),  # state and learner are independent of each other
    ("learner/ops.py", "state.kv"),
    ("learner/features.py", "stream.metrics"),
    ("stream/kafka.py", "sim.world"),
    ("sim/world.py", "genco.status"),
    ("genco/status.py", "tests.kafka_helpers"),  # nothing imports tests/ or benchmarks/
    ("stream/join.py", "benchmarks.speed"),
    ("benchmarks/speed.py", "tests.conftest"),
])
def test_an_import_against_the_layers_breaks_a_contract(tmp_path, module, imports):
    for package in ROOT_PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / module).open("a") as source:
        source.write(f"\n\ndef _reaches_up():\n    import {imports}  # noqa: F401\n")  # lazy: still counts
    done = lint_imports(tmp_path)
    assert done.returncode != 0 and " 0 broken" not in done.stdout, done.stdout + done.stderr
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {imports}" in done.stdout, done.stdout
