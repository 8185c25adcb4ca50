"""The distribution installs under one name: everything lives in the `gauntlet` namespace.

Generic top-level names (`db`, `workers`, ...) in site-packages would collide with any
other distribution that ships a module of the same name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("cluster", "db", "scheduler", "workers")


def test_the_wheel_holds_only_the_gauntlet_namespace(tmp_path):
    had_build = (ROOT / "build").exists()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    if not had_build:  # setuptools stages the wheel in the source tree
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("gauntlet_eval-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not n.startswith(("gauntlet/", "gauntlet_eval-"))]
    assert outside == []
    # Every repository folder is in it, with its subpackages and data files.
    for folder in FOLDERS:
        assert f"gauntlet/{folder}/__init__.py" in names
    assert "gauntlet/workers/attacks/pgd.py" in names
    assert "gauntlet/scheduler/suites/quick.yaml" in names
    assert "gauntlet/db/migrations/versions/0001_initial.py" in names
    # No `gauntlet/__init__.py`: the namespace has no folder of its own.
    assert "gauntlet/__init__.py" not in names


def test_no_generic_top_level_module_is_importable(tmp_path):
    # From a directory outside the repository, as an installed user would run it.
    code = (
        "import importlib.util as u, json;"
        f"print(json.dumps({{m: u.find_spec(m) is not None for m in {list(FOLDERS)!r}}}));"
        "import gauntlet.workers.attacks, gauntlet.scheduler.cli, gauntlet.db, gauntlet.cluster;"
        "print(gauntlet.workers.attacks.__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout.splitlines()
    assert out[0] == '{"cluster": false, "db": false, "scheduler": false, "workers": false}'
    assert out[1] == "gauntlet.workers.attacks"
