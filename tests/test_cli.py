"""The command line: the engine-build script, `zimage-trt build` errors, `generate`."""

import subprocess
import sys
from pathlib import Path

import pytest

from zimage_trt.cli import main
from zimage_trt.tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_build_script_help():
    out = subprocess.run([sys.executable, str(ROOT / "build" / "build_engines.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "--resolution" in out.stdout and "--backend" in out.stdout and "--precision" in out.stdout


def test_bad_resolution_is_a_clear_error_and_exit_code_2(tmp_path, capsys):
    code = main(["build", "--model", str(tmp_path), "--resolution", "1000x1024", "--out", str(tmp_path / "e")])
    assert code == 2
    assert "not a multiple of 16" in capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    code = main(["build", "--model", str(tmp_path / "missing"), "--resolution", "256x256",
                 "--backend", "tensorrt-rtx", "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 2
    assert "missing" in capsys.readouterr().err


def test_generate_with_fallback_writes_an_image(tmp_path, capsys):
    model = save_tiny_pipeline(tmp_path / "tiny", seed=0)
    target = tmp_path / "out" / "fox.png"
    with pytest.warns(UserWarning, match="allow_fallback"):
        code = main(["generate", "--model", str(model), "--engines", str(tmp_path / "no-engines"), "--prompt", "a fox",
                     "--height", "256", "--width", "256", "--steps", "2", "--device", "cpu", "--allow-fallback",
                     "--output", str(target)])
    assert code == 0 and target.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
