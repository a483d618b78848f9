"""The peers' example training loops (copies with their structure, see each file) and the random
Omniglot-shaped data they run on here, for tests/test_compat_examples.py and bench/bench_compat.py.

load(name, source=None, **names) runs a copy's source (or a patched one) as a fresh module, with
`names` rebinding module globals: l2l=<the original learn2learn> or higher=<the real higher> runs
the same loop on the original library."""
from __future__ import annotations

import re
import subprocess
import tempfile
import types
from collections import namedtuple
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXAMPLES = {"l2l": HERE / "l2l_maml_omniglot.py", "higher": HERE / "higher_maml_omniglot.py"}


def load(name: str, source: str | None = None, **names) -> types.ModuleType:
    path = EXAMPLES[name]
    module = types.ModuleType(f"peer_example_{name}")
    module.__file__ = str(path)
    exec(compile(source if source is not None else path.read_text(), str(path), "exec"), module.__dict__)
    module.__dict__.update(names)
    return module


class RandomTaskset:
    """learn2learn's TaskDataset.sample() shape: one task of `ways` classes x `samples` each, a
    class's samples next to each other, labels 0..ways-1; the n-th call gives the same task on
    every run."""

    def __init__(self, ways: int, samples: int, seed: int, dtype=torch.float32):
        self.ways, self.samples, self.seed, self.dtype, self.calls = ways, samples, seed, dtype, 0

    def sample(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.calls)
        self.calls += 1
        data = torch.rand(self.ways * self.samples, 1, 28, 28, generator=g, dtype=self.dtype)
        labels = torch.arange(self.ways).repeat_interleave(self.samples)
        return data, labels


Tasksets = namedtuple("Tasksets", ("train", "validation", "test"))


def random_tasksets(ways: int = 5, shots: int = 1, dtype=torch.float32) -> Tasksets:
    """As l2l.vision.benchmarks.get_tasksets('omniglot', train_samples=2*shots, ...) gives them."""
    return Tasksets(*(RandomTaskset(ways, 2 * shots, seed, dtype) for seed in (1, 2, 3)))


class RandomNShot:
    """higher's OmniglotNShot.next() shape: x_spt [batchsz, n_way * k_shot, 1, 28, 28], y_spt,
    x_qry [batchsz, n_way * k_query, ...], y_qry; `iterations` batches per epoch."""

    def __init__(self, batchsz: int = 32, n_way: int = 5, k_shot: int = 5, k_query: int = 15, iterations: int = 1,
                 dtype=torch.float32, seed: int = 0, device="cpu"):
        self.batchsz, self.n_way, self.k_shot, self.k_query, self.dtype = batchsz, n_way, k_shot, k_query, dtype
        self.device = device  # as OmniglotNShot, which gives its batches on the example's device
        self.x_train = torch.empty(batchsz * iterations, 0)  # only its length is read
        self.seed, self.calls = seed, 0

    def next(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.calls)
        self.calls += 1
        T, n = self.batchsz, self.n_way
        x = lambda k: torch.rand(T, n * k, 1, 28, 28, generator=g, dtype=self.dtype)
        y = lambda k: torch.stack([torch.randperm(n, generator=g).repeat_interleave(k) for _ in range(T)])
        batch = x(self.k_shot), y(self.k_shot), x(self.k_query), y(self.k_query)
        return tuple(t.to(self.device) for t in batch)


# ---- the README's batched diffs ------------------------------------------------------------------

README = HERE.parents[1] / "README.md"
FILE_NAMES = {"l2l": "maml_omniglot.py", "higher": "maml-omniglot.py"}  # the examples' own file names


def readme_diff(name: str, readme: Path = README) -> str:
    """The README's ```diff block for the example (the one whose header names its file)."""
    for block in re.findall(r"```diff\n(.*?)```", readme.read_text(), re.S):
        if block.startswith(f"--- {FILE_NAMES[name]}\n"):
            return block
    raise LookupError(f"README.md has no ```diff block starting with '--- {FILE_NAMES[name]}'")


def patched_source(name: str) -> str:
    """The example's copy with the README's batched diff applied by `patch` (no fuzz allowed)."""
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / FILE_NAMES[name]
        target.write_text(EXAMPLES[name].read_text())
        done = subprocess.run(["patch", "--fuzz=0", "--no-backup-if-mismatch", str(target)], input=readme_diff(name),
                              text=True, capture_output=True, cwd=folder)
        if done.returncode != 0:
            raise RuntimeError(f"the README's diff for {FILE_NAMES[name]} does not apply: {done.stdout}{done.stderr}")
        return target.read_text()
