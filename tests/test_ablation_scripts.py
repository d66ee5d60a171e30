"""Every kept script of the densify ablation (experiments/ablation, experiments/README.md) runs end
to end in its smallest real form, so none can rot: the bundled nuclei example, one seed, a few CPU
seconds. The figures they print are the docs' business; here each must finish and print them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a fresh interpreter and a short run per script: minutes in all (`make test-slow`)


def run_script(name: str, *arguments) -> str:
    """`python -m experiments.ablation.NAME ARGUMENTS` from the repository root: its standard output."""
    done = subprocess.run([sys.executable, "-m", f"experiments.ablation.{name}", *map(str, arguments)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_run_prints_the_ablation_table(tmp_path):
    output = run_script("run", "--quick", "--variants", "default", "--budget", "4", "--results", tmp_path / "runs.jsonl")
    assert "| nuclei_tiny |" in output and (tmp_path / "runs.jsonl").read_text().count("\n") >= 1


def test_curve_draws_the_figure(tmp_path):
    run_script("curve", "--budgets", "4", "--seeds", "0", "--output", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_profile_step_times_a_step():
    assert "CPU s/step" in run_script("profile_step", "--steps", "1")


def test_input_features_scores_the_network_with_the_filter_bank():
    result = last_json(run_script("input_features", "nuclei_tiny", "1,1,1", "features_small", "0", "6"))
    assert 0.0 <= result["mean_iou"] <= 1.0 and result["iterations"] >= 1


def test_forest_blend_saves_maps_that_blend_rules_scores(tmp_path):
    saved = tmp_path / "nuclei_tiny_1,1,1_s0.npz"
    result = last_json(run_script("forest_blend", "nuclei_tiny", "1,1,1", "0", "8", "notta", "trees=10",
                                  f"save={saved}"))
    assert set(result["fg_iou"]) >= {"forest", "unet"} and saved.exists()
    assert "nuclei_tiny" in run_script("blend_rules", saved)


def test_held_out_blend_scores_the_maps_densify_benchmark_saves(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.bench_densify", "--quick", "--save", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    (saved,) = tmp_path.glob("*.npz")
    assert "nuclei_tiny" in run_script("held_out_blend", saved)


def test_pretrained_pretrains_on_synthetic_walls_and_fine_tunes(tmp_path):
    model = tmp_path / "walls.safetensors"
    assert last_json(run_script("pretrained", "pretrain", "synthetic_walls", model, "4", "0", "volumes=1"))["iterations"] >= 1
    result = last_json(run_script("pretrained", "finetune", model, "nuclei_tiny", "1,1,1", "0", "8"))
    assert result["init"] == str(model)


def test_synthetic_walls_writes_volumes_to_look_at(tmp_path):
    run_script("synthetic_walls", "show", tmp_path, "1", "0")
    assert sorted(p.name for p in tmp_path.glob("*.tif")) == ["synthetic_00_image.tif", "synthetic_00_labels.tif"]


@pytest.mark.parametrize("name", ["blend_rules", "held_out_blend", "forest_blend", "input_features"])
def test_a_script_without_arguments_prints_its_usage(name):
    done = subprocess.run([sys.executable, "-m", f"experiments.ablation.{name}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Usage" in done.stderr + done.stdout
