"""`zimage-trt compare` on the tiny model (CPU): a real comparison of rendered images. Identical
settings give PSNR inf and SSIM 1 on every prompt; different ones (diffusers fp32 against our bf16;
with and without a LoRA) finite figures; the sheet and table are written, whole; bad input is refused
before anything is rendered."""

import json

import numpy as np
import pytest
from PIL import Image

from zimage_trt import cli

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def run_compare(tmp_path, *options):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red fox in snow\n\na bowl of ramen\n")
    out = tmp_path / "out"
    code = cli.main(["compare", "--tiny", "--size", "128x112", "--steps", "2", "--prompts", str(prompts), "--quiet",
                     "--out", str(out), "--tile", "64", *options])
    return code, out


def test_identical_settings_give_infinite_psnr_and_ssim_one(tmp_path, capsys):
    code, out = run_compare(tmp_path, "--a-pipeline", "ours", "--a-precision", "fp32", "--b-pipeline", "ours",
                            "--b-precision", "fp32")
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    assert [r["prompt"] for r in table["prompts"]] == ["a red fox in snow", "a bowl of ramen"]
    assert [r["seed"] for r in table["prompts"]] == [0, 1]
    assert all(r["psnr_db"] == float("inf") and r["ssim"] == 1.0 for r in table["prompts"])
    sheet = np.asarray(Image.open(out / "sheet.png"))
    assert sheet.shape[1] == 3 * 64 + 4 * 6 and sheet.shape[0] > 2 * 56  # two rows of three 64-wide tiles
    assert "inf" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["sheet.png", "table.json"]  # no temporary file left


def test_different_settings_give_finite_figures(tmp_path):
    code, out = run_compare(tmp_path, "--a-pipeline", "diffusers", "--a-precision", "fp32", "--b-pipeline", "ours",
                            "--b-precision", "bf16")
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    assert table["a"]["pipeline"] == "diffusers" and table["b"]["precision"] == "bf16"
    for row in table["prompts"]:
        assert 20 < row["psnr_db"] < 90 and 0.5 < row["ssim"] < 1.0  # bf16 rounding: close, not equal
    assert table["mean"]["psnr_db"] == pytest.approx(np.mean([r["psnr_db"] for r in table["prompts"]]))


def test_a_lora_on_one_side_changes_its_images(tmp_path):
    from diffusers import ZImagePipeline
    from test_lora import make_lora

    state, config = make_lora(1, rank=4, alpha=8)
    ZImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, weight_name="style.safetensors",
                                     transformer_lora_adapter_metadata=config.to_dict())
    code, out = run_compare(tmp_path, "--a-pipeline", "ours", "--a-precision", "fp32", "--b-pipeline", "ours",
                            "--b-precision", "fp32", "--b-lora", str(tmp_path / "style.safetensors"))
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    assert table["b"]["lora"].endswith("style.safetensors") and "lora=style.safetensors@1.0" in table["b"]["label"]
    assert all(r["psnr_db"] < 60 for r in table["prompts"])  # the adapter moved the pixels


def test_fp8_keep_builds_engines_for_the_size_asked_width_first(tmp_path, monkeypatch):
    """--size is WIDTHxHEIGHT; the FP8 engines of --b-fp8-keep are built for that size (128 wide, 112 tall),
    not its transpose (the build itself is a GPU job: here it records what it was asked and stops)."""
    from zimage_trt import compare

    asked = []

    def build(transformer, sizes, *args, **kwargs):
        asked.extend(sizes)
        raise RuntimeError("stop after the build's arguments")

    monkeypatch.setattr(compare, "build_engines", build)
    code, _ = run_compare(tmp_path, "--a-pipeline", "ours", "--a-precision", "fp32", "--b-pipeline", "ours",
                          "--b-precision", "fp8", "--b-fp8-keep", "none")
    assert code == 2 and asked == ["128x112"]


@pytest.mark.parametrize("options, message", [
    (["--size", "1000x1000"], "multiples of 16"),
    (["--size", "1024"], "WIDTHxHEIGHT"),
    (["--a-pipeline", "diffusers", "--a-precision", "fp8"], "diffusers' own ZImagePipeline"),
    (["--b-fp8-keep", "auto", "--b-precision", "bf16"], "needs --b-precision fp8"),
    (["--magnify", "0"], "--magnify must be positive"),
])
def test_bad_options_are_refused_before_rendering(tmp_path, capsys, options, message):
    code, out = run_compare(tmp_path, *options)
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_the_bench_sheet_renders_both_settings_from_the_same_weights(tmp_path):
    """bench/compare_sheet.py hands compare its own components (the full-size random model on the H200; the
    tiny one here): both settings get the same weights, so one precision on both sides compares equal."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare_sheet", Path(__file__).parents[1] / "bench" / "compare_sheet.py")
    sheet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sheet)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    common = ["--tiny-weights", "--device", "cpu", "--size", "64x48", "--steps", "2", "--prompts", str(prompts),
              "--quiet", "--tile", "32"]
    assert sheet.main([*common, "--out", str(tmp_path / "same"), "--a-pipeline", "ours", "--a-precision", "fp32",
                       "--b-precision", "fp32"]) == 0
    assert json.loads((tmp_path / "same" / "table.json").read_text())["prompts"][0]["psnr_db"] == float("inf")
    assert sheet.main([*common, "--out", str(tmp_path / "peer"), "--a-precision", "fp32", "--b-precision", "fp32"]) == 0
    table = json.loads((tmp_path / "peer" / "table.json").read_text())
    assert table["a"]["pipeline"] == "diffusers" and table["b"]["pipeline"] == "ours"
    assert table["prompts"][0]["psnr_db"] > 40  # diffusers' own maths: within 8-bit rounding (often equal)
