"""Runs a model on T tasks at once, each with its own parameters (every tensor [T, *shape])."""
from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import Tensor, nn
import torch.utils._pytree as pytree
from torch.func import functional_call

from meta_kernels.meta.batching import (BatchedModel, DirectWeightRead, ModelForwardError, engine_pass,
                                        stack_structures)
from meta_kernels.models.conv4 import StepBatchNorm

TASK_BATCHING = ("auto", "native", "batched", "vmap", "loop")


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, StepBatchNorm)) for m in model.modules())


class TaskModel:
    """Task-batched functional view of an nn.Module.

    - native: the model's own `forward_tasks(params, x)` (the sinusoid MLP);
    - batched (the default for every other model, Conv4 included): the task-batching engine (meta/batching.py) runs
      the model's own forward on the tasks folded into one batch, its convs, linears and norms
      task-aware and on the fused ops, any layer it does not know under vmap or a loop alone;
    - vmap: torch.func.vmap over `functional_call` of the whole model (wrong second-order
      gradients through F.batch_norm on torch 2.13: for models without BatchNorm);
    - loop: a Python loop over tasks, the "batching off" baseline of the benchmarks."""

    # Weights added to every call (see with_fixed): those the inner loop does not adapt.
    fixed: dict[str, Tensor] = {}

    def __init__(self, model: nn.Module, task_batching: str = "auto", compile: bool | str = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module (your network), got {type(model).__name__}")
        if task_batching not in TASK_BATCHING:
            raise ValueError(f"unknown task_batching {task_batching!r}; choose one of {', '.join(TASK_BATCHING)}")
        if task_batching == "auto":
            task_batching = "native" if hasattr(type(model), "forward_tasks") else "batched"
        if task_batching == "native" and not hasattr(type(model), "forward_tasks"):
            raise ValueError(f"task_batching='native' needs {type(model).__name__}.forward_tasks(params, x)")
        self.model, self._mode = model, [task_batching]  # shared by the with_fixed views
        # forward_tasks may take double_backward (a grouped conv double backward); user models need not.
        self.takes_double_backward = (task_batching == "native" and "double_backward" in
                                      inspect.signature(type(model).forward_tasks).parameters)
        self.buffers = dict(model.named_buffers())
        self.engine = BatchedModel(model) if task_batching == "batched" else None
        # torch.compile'd forward for every pass that is differentiated at most once (query passes,
        # first-order inner steps): AOTAutograd cannot double-backward, so MAML's inner steps
        # stay eager. `compile` may name a torch.compile backend. The engine's per-layer fallbacks
        # (vmap, loops) may split the graph, so it is not traced as one.
        self.compiled = None
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.compiled = torch.compile(self.forward, backend=backend, fullgraph=self.mode not in ("loop", "batched"),
                                          dynamic=False)

    @property
    def mode(self) -> str:
        return self._mode[0]

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode[0] = value

    def explain(self) -> list[str]:
        """What each layer does in this model's passes now (see explain)."""
        if self.mode == "loop":
            return ["(model): every layer in a per-task loop (task_batching='loop', or the model's own code reads a "
                    "layer's weight)"]
        if self.mode == "vmap":
            return ["(model): torch.func.vmap over the tasks (task_batching='vmap')"]
        if self.mode == "native":
            return [f"(model): {type(self.model).__name__}.forward_tasks (its own batched form)"]
        return [str(plan) for plan in self.engine.explain()]

    def with_fixed(self, fixed: dict[str, Tensor]) -> "TaskModel":
        """This view with `fixed` (weights the inner loop does not adapt, [T, *shape]) added to the
        weights of every call."""
        view = copy.copy(self)
        view.fixed = fixed
        return view

    def parameters(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    def __call__(self, params: dict[str, Tensor], x: Tensor, *, double_backward: bool = False, step: int = 0,
                 bn_mode: str = "transductive", update_stats: bool = False) -> Tensor:
        """Outputs [T, N, ...] for inputs x [T, N, ...]; `double_backward` marks a pass whose
        gradient is itself differentiated (it then never runs compiled). step / bn_mode /
        update_stats reach models with per-step BatchNorm (Conv4)."""
        if self.fixed:
            params = {**self.fixed, **params}
        try:
            if self.compiled is not None and not double_backward and not update_stats:
                return self.compiled(params, x, step, bn_mode)
            return self.forward(params, x, step, bn_mode, update_stats, double_backward)
        except RuntimeError as exc:
            raise ModelForwardError.of(self.model, x, exc) from exc

    def forward(self, params: dict[str, Tensor], x: Tensor, step: int = 0, bn_mode: str = "transductive",
                update_stats: bool = False, double_backward: bool = False) -> Tensor:
        if self.fixed:
            params = {**self.fixed, **params}
        if self.mode == "native":
            if not isinstance(x, Tensor):
                raise ValueError(f"{type(self.model).__name__}.forward_tasks takes one input tensor, got {type(x).__name__}")
            extra = {"double_backward": double_backward} if self.takes_double_backward else {}
            return type(self.model).forward_tasks(params, x, step=step, bn_mode=bn_mode, buffers=self.buffers,
                                                  update_stats=update_stats, **extra)
        args, kwargs = model_inputs(x)
        if self.mode == "batched":
            try:
                return self.engine(params, args, kwargs, double_backward=double_backward, step=step, bn_mode=bn_mode,
                                   update_stats=update_stats)
            except DirectWeightRead as read:
                if bn_mode != "transductive":
                    raise ValueError(f"{type(self.model).__name__}'s forward reads {read} itself; call the layer "
                                     "instead (bn_mode other than 'transductive' needs the batched engine)") from read
                warnings.warn(f"{type(self.model).__name__}'s forward reads {read} itself (not by calling the layer), "
                              "which holds one weight per task in the batched engine; this model runs its tasks in a "
                              "loop from now on (correct, slower). To batch it, call the layer (e.g. self.head(x)) "
                              "instead of reading its weight", stacklevel=4)
                self.mode = "loop"
        if bn_mode != "transductive":
            raise ValueError(f"bn_mode {bn_mode!r} needs the task-batching engine (task_batching='batched') and "
                             "StepBatchNorm layers (meta_kernels.models.Conv4)")
        with engine_pass(double_backward):
            if self.mode == "vmap":
                call = lambda p, a, kw: functional_call(self.model, (p, self.buffers), a, kw)
                return torch.func.vmap(call)(params, args, kwargs)
            T = next(iter(params.values())).shape[0]
            pick = lambda t: pytree.tree_map(lambda v: v[t] if isinstance(v, Tensor) else v, (args, kwargs))
            outs = [functional_call(self.model, ({k: v[t] for k, v in params.items()}, self.buffers), *pick(t))
                    for t in range(T)]
            return stack_structures(outs)


def explain(model: nn.Module, inputs=None, config=None, task_batching: str = "auto") -> str:
    """What a step does with `model`, layer by layer: batched, on a fused op, under vmap, or in a
    per-task loop (for this layer, or the whole model). With example `inputs` ([T, N, ...] as a
    task batch's, T >= 1) one forward of them runs first (no graph, eval mode), so that the layers
    whose per-task form could not run show as they will run, as a step would find; with `config`
    (a MAMLConfig) the inner loop's engine, clipping and loss come first."""
    task_model = TaskModel(model, task_batching)
    lines = []
    if config is not None:
        from meta_kernels.meta.algorithms import checked_config
        from meta_kernels.meta.inner_common import InnerLoopSettings
        config = checked_config(config, "explain")
        engine = InnerLoopSettings.from_config(config).engine
        clip = ("off" if config.inner_clip is None else
                f"{config.inner_clip} (each task's inner gradient scaled to norm <= {config.inner_clip}; "
                "the peers and the papers do not clip: inner_clip=None)")
        lines += [f"inner loop: {config.algo}, {config.inner_steps} step(s) of lr {config.inner_lr}, engine "
                  f"{engine}{' (auto)' if config.engine == 'auto' else ''}, inner_clip {clip}",
                  f"loss: {config.loss}" + ("" if callable(config.loss) else
                                            " on the output's logits (its 'logits' key or attribute, else its first tensor)")]
    if inputs is not None:
        args, kwargs = model_inputs(inputs)
        lead = next(v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, Tensor))
        T = lead.shape[0]
        params = {k: v.detach().expand(T, *v.shape) for k, v in model.named_parameters()}
        modes = [m.training for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the warnings a step would give are for the step
                task_model(params, inputs)
        finally:
            for m, mode in zip(model.modules(), modes):
                m.training = mode
    lines += task_model.explain()
    return "\n".join(lines)


def model_inputs(x) -> tuple[tuple, dict]:
    """(args, kwargs) of the model from a task batch's inputs: one tensor, a tuple of positional
    inputs, a dict of keyword inputs, or a pair (tuple, dict) of both."""
    if isinstance(x, Tensor):
        return (x,), {}
    if isinstance(x, dict):
        return (), x
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], (tuple, list)) and isinstance(x[1], dict):
        return tuple(x[0]), x[1]
    return tuple(x), {}


def as_task_model(model) -> TaskModel:
    """`model` itself when it is already a TaskModel, else its task-batched view."""
    return model if isinstance(model, TaskModel) else TaskModel(model)
