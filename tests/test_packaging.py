"""A non-editable install works on its own: the wheel holds every module and the shipped models, and `crystal
generate` / `crystal refine` run from another directory with no -m, using the models inside the package.

The wheel is built from this checkout's files and installed into a scratch environment that reuses this
venv's dependencies through a .pth line (so nothing is downloaded and llama.cpp is not rebuilt); the base
conversion and the model's GGUF export are reused from the test cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import REPO


def _run(args: list, cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _project_copy(target: Path) -> Path:
    """The project's files as a clone holds them (tracked, plus untracked ones git does not ignore)."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO)
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_wheel_installs_and_generates_with_its_shipped_models(tmp_path):
    source = _project_copy(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", tmp_path / "dist"],
         source)
    (wheel,) = (tmp_path / "dist").glob("crystal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "crystal_cli").rglob("*.py")}
    assert modules <= names, f"missing from the wheel (pyproject.toml packages): {sorted(modules - names)}"
    shipped = {f"crystal_cli/shipped/{p.relative_to(REPO / 'models').as_posix()}"
               for p in (REPO / "models").rglob("*") if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)

    env_dir = tmp_path / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], tmp_path)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    (purelib / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # reuse this venv's packages
    _run([sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python", "install", "-q", "--no-deps", wheel], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CRYSTAL_MODELS")}
    env.update(HF_HUB_OFFLINE="1", CRYSTAL_CACHE=os.environ["CRYSTAL_CACHE"])
    where = _run([env_dir / "bin" / "python", "-c",
                  "import crystal_cli.models as m; print(m.__file__); print(m.shipped_dir())"], elsewhere, env).split()
    assert where[0].startswith(str(purelib)) and where[1] == str(purelib / "crystal_cli" / "shipped")

    crystal = env_dir / "bin" / "crystal"
    # one thread: the test host is shared, and llama.cpp's threads spin-wait for a busy core
    _run([crystal, "generate", "--formula", "LiFePO4", "-n", "2", "--parallel", "2", "--threads", "1", "-o", "s.cif"],
         elsewhere, env)
    rows = [json.loads(line) for line in (elsewhere / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert {r["model"] for r in rows} == {str(purelib / "crystal_cli" / "shipped" / "default")}
    _run([crystal, "refine", "s.jsonl", "-o", "r.cif", "--steps", "3"], elsewhere, env)
    assert (elsewhere / "r.cif").read_text().count("data_") == 2
