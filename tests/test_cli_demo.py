"""The no-download main job and the CLI surface."""
import json
import subprocess
import sys

from meta_kernels.cli import main
from meta_kernels.demo import run_demo


def test_demo_meta_trains_sinusoid(tmp_path):
    summary = run_demo(tmp_path, outer_steps=300, meta_batch_size=10, progress=False)
    after = summary["heldout_mse_by_inner_step_after_meta_training"]
    before = summary["heldout_mse_by_inner_step_before_meta_training"]
    assert after[1] < after[0] and after[10] < after[1]  # adaptation helps after meta-training
    assert after[10] < before[10]                         # and meta-training helped adaptation
    assert summary["train_query_mse_last_50"] < summary["train_query_mse_first_50"]
    for name in ("metrics.json", "metrics.jsonl", "sinusoid.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["outer_steps"] == 300


def test_demo_is_reproducible(tmp_path):
    a = run_demo(tmp_path / "a", outer_steps=20, meta_batch_size=4, progress=False)
    b = run_demo(tmp_path / "b", outer_steps=20, meta_batch_size=4, progress=False)
    assert a["heldout_mse_by_inner_step_after_meta_training"] == b["heldout_mse_by_inner_step_after_meta_training"]


def test_info_prints_backend_report(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["auto"]["cpu"] == "cpp"


def test_console_script_reports_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "meta_kernels.cli", "demo", "--steps", "zero"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "invalid int value" in out.stderr


def test_validate_runs_every_check(monkeypatch, tmp_path, capsys):
    from tests.conftest_data import shared_data_dir
    data = shared_data_dir()
    if data is None:
        import pytest
        pytest.skip("real Omniglot not found")
    monkeypatch.setenv("META_KERNELS_DATA", str(data))
    monkeypatch.setenv("META_KERNELS_CACHE", str(tmp_path / "cache"))
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    for check in ("ops on backend 'reference'", "ops on backend 'cpp'", "ops on backend 'triton'",
                  "MAML meta-gradient = hand-computed formula", "Conv4 CPU dev mode, one epoch"):
        assert f"PASS  {check}" in out, out
