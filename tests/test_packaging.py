"""The wheel: one top-level package, ``gram_pyro``, holding the model programs, guides, experiments and
configs that sit at the top of the repository (pyproject's ``package-dir``)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOVED = {"models": "gram_pyro/models", "guides": "gram_pyro/guides", "experiments": "gram_pyro/experiments"}
"""Repository folder -> where its files sit in the wheel."""


def test_the_wheel_installs_gram_pyro_alone_with_every_module_and_config(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("gram_pyro", *MOVED):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"gram_pyro"}
    expected = {f"gram_pyro/{path.relative_to(ROOT / 'gram_pyro').as_posix()}"
                for path in (ROOT / "gram_pyro").rglob("*.py")}
    for folder, installed in MOVED.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                expected.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    assert "gram_pyro/experiments/configs/train.yaml" in expected
    assert expected <= names, sorted(expected - names)[:5]
