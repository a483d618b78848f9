"""Every example program in python/ runs as written (for a few steps)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest_data import shared_data_dir

REPO = Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path, env=None):
    proc = subprocess.run([sys.executable, str(REPO / "python" / script), *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_own_model_example(tmp_path):
    out = _run("own_model_maml.py", "--steps", "3", tmp_path=tmp_path)
    assert "step 2: query loss" in out


def test_sinusoid_example(tmp_path):
    out = _run("sinusoid_demo.py", "--steps", "20", "--out", str(tmp_path / "demo"), tmp_path=tmp_path)
    assert "held-out MSE" in out and (tmp_path / "demo" / "sinusoid.png").is_file()


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_omniglot_example(tmp_path, algo):
    data = shared_data_dir()
    if data is None:
        pytest.skip("real Omniglot not found: set META_KERNELS_DATA")
    out = _run("omniglot_maml.py", "--algo", algo, "--steps", "2", "--test-episodes", "16", "--out", str(tmp_path / "o"),
               tmp_path=tmp_path,
               env={"META_KERNELS_DATA": str(data), "META_KERNELS_CACHE": str(tmp_path / "cache")})
    assert "test accuracy" in out


def test_mini_imagenet_example_explains_missing_images(tmp_path):
    """Only the split CSVs exist here, so the example must stop with the data error, not a traceback."""
    data = shared_data_dir()
    if data is None:
        pytest.skip("shared data not found")
    proc = subprocess.run([sys.executable, str(REPO / "python" / "mini_imagenet_maml.py"), "--steps", "1",
                           "--out", str(tmp_path / "m")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "META_KERNELS_DATA": str(data), "META_KERNELS_CACHE": str(tmp_path / "c")},
                          timeout=300)
    assert proc.returncode != 0
    assert "images" in proc.stderr.splitlines()[-1]


def test_hf_lora_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = _run("hf_lora_maml.py", "--steps", "3", "--tasks", "2", tmp_path=tmp_path)
    assert "step 2: query accuracy before adaptation" in out and "base weights still frozen: True" in out
