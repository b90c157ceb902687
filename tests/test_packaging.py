"""The distribution: one import package, `bitstrace`, built from the repository's folders."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from tests.support import REPO

ROOT = REPO
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Each import package of the distribution and the folder it is built from."""
    roots = {"bitstrace": ROOT / "bitstrace"}
    roots.update({name: ROOT / folder for name, folder in SETUPTOOLS["package-dir"].items()})
    found = {}
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found[".".join((name, *relative))] = init.parent
    return found


def test_every_package_folder_is_in_the_distribution() -> None:
    assert sorted(SETUPTOOLS["packages"]) == sorted(package_folders())


def test_no_module_imports_the_folders_by_their_own_names() -> None:
    """`import analyzer` would load a second copy of a module beside bitstrace.analyzer's."""
    offenders = []
    for folder in package_folders().values():
        for source in folder.glob("*.py"):
            for node in ast.walk(ast.parse(source.read_text(), str(source))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{source.relative_to(ROOT)}: {n}" for n in names
                              if n.split(".")[0] in ("analyzer", "replay")]
    assert offenders == []


def test_analyzer_never_imports_replay() -> None:
    offenders = [str(source.relative_to(ROOT)) for source in (ROOT / "analyzer").rglob("*.py")
                 if "bitstrace.replay" in source.read_text() or "bitstrace.cli" in source.read_text()]
    assert offenders == []


@pytest.mark.slow
def test_wheel_holds_one_top_level_package_and_the_schema(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("bitstrace-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"bitstrace"}
    assert "bitstrace/analyzer/report/schema.md" in names and "bitstrace/py.typed" in names
    assert "bitstrace/analyzer/http.py" in names and "bitstrace/replay/server/__init__.py" in names
    assert "License-Expression: MIT" in metadata
    from bitstrace import __version__
    assert f"\nVersion: {__version__}\n" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [line for line in requires if "extra ==" not in line]
    assert not any("scapy" in line or "pyshark" in line or "hypothesis" in line for line in runtime)


def test_schema_option_prints_the_shipped_document() -> None:
    run = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--schema"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0
    assert run.stdout == (ROOT / "analyzer/report/schema.md").read_text(encoding="utf-8")
