"""The package works installed, away from the source checkout (as a wheel puts it in site-packages)."""

import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "zimage_trt"


def test_bench_help_runs_from_an_installed_copy(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "zimage_trt", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    where = subprocess.run([sys.executable, "-c", "import zimage_trt; print(zimage_trt.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # the copy, not the checkout
    out = subprocess.run([sys.executable, "-m", "zimage_trt.cli", "bench", "--help"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for option in ("--engine-dir", "--images", "--precision", "--skip-peers", "--tiny", "--json"):
        assert option in out.stdout
    assert "(default: 20)" in out.stdout  # every option shows its default
