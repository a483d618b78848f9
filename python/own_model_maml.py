"""MAML on your own model in a few lines: a small CNN on synthetic 5-way tasks whose classes are
random prototype images plus noise (no download). Shows the learn2learn-style wrapper.

    python python/own_model_maml.py --steps 200
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import meta_kernels as mk


def synthetic_tasks(T, n_way=5, k=1, q=5, g=None):
    protos = torch.randn(T, n_way, 1, 16, 16, generator=g)
    def draw(n):
        x = protos.repeat_interleave(n, dim=1) + 0.5 * torch.randn(T, n_way * n, 1, 16, 16, generator=g)
        return x, torch.arange(n_way).repeat_interleave(n).repeat(T, 1)
    return (*draw(k), *draw(q))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 5))
    maml = mk.MAML(model, lr=0.4, first_order=False)           # second-order MAML
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        xs, ys, xq, yq = synthetic_tasks(8, g=g)                 # 8 tasks, adapted together
        adapted = maml.adapt(xs, ys, steps=1)
        logits = maml(xq, adapted)
        loss = F.cross_entropy(logits.reshape(-1, 5), yq.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == yq).float().mean()
            print(f"step {step}: query loss {loss.item():.3f}, post-adaptation accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
