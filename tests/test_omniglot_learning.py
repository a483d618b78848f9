"""Each algorithm learns on real data: MAML, FOMAML and Reptile on the Omniglot "background small"
sets with a class-disjoint character split each reach >= 80% post-adaptation 5-way 1-shot accuracy
on held-out characters, from a pre-adaptation accuracy near chance, with step-0 / step-1 accuracy
and AUAC in the same ballpark. Sized for CI (300 outer steps each); bench/omniglot_runs.py
algorithms runs the longer version recorded in bench/RESULTS.md."""
import pytest

from meta_kernels import omniglot_suites
from tests.conftest_data import shared_data_dir


@pytest.fixture(scope="module")
def algorithm_runs(tmp_path_factory):
    data = shared_data_dir()
    if data is None:
        pytest.skip("real Omniglot not found: set META_KERNELS_DATA")
    mp = pytest.MonkeyPatch()
    mp.setenv("META_KERNELS_DATA", str(data))
    mp.setenv("META_KERNELS_CACHE", str(tmp_path_factory.mktemp("omniglot-cache")))
    out = tmp_path_factory.mktemp("algorithms")
    results = {name: omniglot_suites.run(name, overrides, 300, out, test_episodes=200)
               for name, overrides in omniglot_suites.SUITES["algorithms"].items()}
    mp.undo()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["MAML", "FOMAML", "Reptile"])
def test_each_algorithm_learns_held_out_characters(algorithm_runs, algo):
    test = algorithm_runs[algo]["test"]
    assert test["pre_adapt_acc"] < 0.3, test  # 5-way chance is 0.2
    assert test["accuracy"] >= 0.80, test
    assert algorithm_runs[algo]["nan_steps"] == 0


@pytest.mark.slow
def test_algorithms_adapt_in_the_same_ballpark(algorithm_runs):
    step0 = [r["test"]["curve_accuracy"][0] for r in algorithm_runs.values()]
    post = [r["test"]["accuracy"] for r in algorithm_runs.values()]
    auac = [r["test"]["auac"] for r in algorithm_runs.values()]
    assert max(step0) - min(step0) < 0.1
    assert max(post) - min(post) < 0.2
    assert min(auac) > 0.4  # none flat: every curve rises well above chance
