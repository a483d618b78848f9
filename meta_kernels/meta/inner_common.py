"""What the inner-loop engines (inner.py, higher_engine.py) and the algorithms built on them
share: the settings of an inner loop, what it returns, task batches, the per-task loss, the
rate table, and the query pass."""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import meta_kernels.ops as ops
from meta_kernels.config import BN_MODES, ENGINES, INNER_OPTIMIZERS, MAMLConfig
from meta_kernels.tensor_utils import compute_dtype, map_structure, structure_tensors

NONFINITE = ("raise", "skip")
# engine='auto': the fastest engine that gives the same meta-gradients (bench/RESULTS.md: custom is
# faster than torch_func on every model measured, up to 4x; tests/test_meta_gradients.py: equal).
AUTO_ENGINE = "custom"
LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class InnerOptimizer:
    """The inner update: 'sgd', 'momentum' (torch.optim.SGD's heavy ball, no dampening) or 'adam'
    (torch.optim.Adam), its state per task. The rate (inner lr, LSLR's or Meta-SGD's rates) scales
    the optimizer's step."""
    name: str = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.name!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (0 <= self.momentum < 1 and len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
                and 0 < self.eps < math.inf):
            raise ValueError(f"inner optimizer settings out of range: momentum {self.momentum} and betas "
                             f"{list(self.betas)} must be in [0, 1), eps {self.eps} > 0")

    @classmethod
    def of(cls, value: "str | InnerOptimizer") -> "InnerOptimizer":
        return value if isinstance(value, InnerOptimizer) else cls(value)

    @property
    def has_state(self) -> bool:
        return self.name != "sgd"

    def init_state(self, fast: list[Tensor]) -> list[list[Tensor]]:
        """Zero state per task: the momentum buffers, or Adam's two moments."""
        return [[torch.zeros_like(v, memory_format=torch.contiguous_format) for v in fast]
                for _ in range({"sgd": 0, "momentum": 1, "adam": 2}[self.name])]

    def step(self, fast: list[Tensor], grads: list[Tensor], state: list[list[Tensor]], lrs: Tensor,
             scale: Tensor | None, rates: list[Tensor] | None, step: int, in_place: bool):
        """One update of every task (step: 0-based). Returns (new weights, new state); in place
        (no graph) the given ones, updated."""
        if self.name == "momentum":
            args = (fast, grads, state[0], lrs, scale, rates)
            if in_place:
                ops.momentum_step_(*args, momentum=self.momentum)
                return fast, state
            new, bufs = ops.momentum_step(*args, momentum=self.momentum)
            return new, [bufs]
        args = (fast, grads, state[0], state[1], lrs, scale, rates)
        hyper = dict(beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, step=step + 1)
        if in_place:
            ops.adam_step_(*args, **hyper)
            return fast, state
        new, m, v = ops.adam_step(*args, **hyper)
        return new, [m, v]


    def directions(self, state: list[list[Tensor]], step: int, rates: list[Tensor] | None) -> list[Tensor]:
        """The step each weight took, before its rate: what the logs measure (no graph)."""
        with torch.no_grad():
            if self.name == "momentum":
                out = [b.detach() for b in state[0]]
            else:
                c1, c2 = 1 - self.betas[0] ** (step + 1), 1 - self.betas[1] ** (step + 1)
                out = [(m.detach() / c1) / ((v.detach() / c2).sqrt() + self.eps) for m, v in zip(*state)]
            return out if rates is None else [r.detach() * d for r, d in zip(rates, out)]


class NonFiniteLossError(FloatingPointError):
    """The inner loop produced a NaN/inf loss or gradient; the message names the step and tasks."""


def checked_flag(value, name: str) -> bool:
    """A True / False switch (first_order, meta_sgd, ...): a bool, or the integers 0 / 1. A string
    is refused: 'False' is truthy and would silently mean True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1) or type(value).__name__ == "bool_":  # numpy's bool
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}"
                    + (" (a string: any non-empty string counts as True)" if isinstance(value, str) else ""))


def _check_loss_signature(loss_fn: Callable) -> None:
    """A loss callable is called as loss_fn(outputs, targets): refuse one that cannot take two
    arguments now rather than at the first step (builtins without a signature are let through)."""
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        fn = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        raise TypeError(f"loss_fn is called as loss_fn(outputs, targets) (one task's outputs and targets), but {fn}"
                        f"{signature} cannot take those two arguments ({exc}); write it as "
                        "lambda outputs, targets: ...") from None


def checked_clip(value, who: str = "inner_clip"):
    """An inner gradient clip: a finite number > 0, or None for no clipping."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{who} must be a number > 0 (the largest inner gradient norm) or None (no clipping), "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class InnerLoopSettings:
    """How an inner loop runs; built once (from a MAMLConfig with `from_config`, or from `adapt`'s
    arguments) and varied with `replace` (e.g. first order during derivative-order annealing).

    first_order: gradients without create_graph (FOMAML); no_graph: no graph at all, updates in
    place (Reptile, evaluation); recompute: keep only each step's starting weights and rebuild
    the second-order graph one step at a time in the backward (see inner.adapt_tasks).
    bn_mode: 'transductive' (statistics of the current set), 'per_step' (the same, with the BN
    affine row of the current step), 'frozen' (running statistics; BN affine not adapted).
    on_nonfinite: 'raise' on a NaN/inf inner loss, or 'skip' the task (it keeps the base weights).
    loss: 'cross_entropy', 'mse', or any callable loss_fn(outputs, targets) -> scalar, applied to
    each task's outputs and targets (soft or one-hot targets, regression, any output shape).
    adapt_params: which parameters the inner loop adapts -- None (every one that requires grad), a
    collection of names, or a predicate(name, tensor) (ANIL: the head; BOIL: the body). The others
    keep their base weights in every task, and still get the meta-gradient (frozen ones,
    requires_grad=False, never do). proximal: iMAML's lambda; the inner gradient then adds
    proximal * (fast - base), the gradient of proximal / 2 * |fast - base|^2 (no graph through it).
    optimizer: the inner update (InnerOptimizer, or its name)."""
    steps: int
    first_order: bool
    bn_mode: str = "transductive"
    inner_clip: float | None = None
    engine: str = "custom"
    backend: str | None = None  # None: the op backend in effect where the inner loop runs
    no_graph: bool = False
    on_nonfinite: str = "raise"
    loss: str | Callable = "cross_entropy"
    recompute: bool = False
    adapt_params: tuple[str, ...] | Callable[[str, Tensor], bool] | None = None
    proximal: float = 0.0  # iMAML: the inner loss adds proximal / 2 * |fast - base|^2
    optimizer: InnerOptimizer = InnerOptimizer()
    # Samples per inner step, each task's own, drawn without replacement from its examples in a
    # random order that cycles (Nichol et al.'s inner mini-batches); 0, or at least the examples
    # a task has: all of them every step. No graph only (Reptile).
    inner_batch: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        for flag in ("first_order", "no_graph", "recompute"):
            object.__setattr__(self, flag, checked_flag(getattr(self, flag), flag))
        checked_clip(self.inner_clip)
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine == "auto":
            object.__setattr__(self, "engine", AUTO_ENGINE)
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"unknown bn_mode {self.bn_mode!r}; choose one of {', '.join(BN_MODES)}")
        if self.on_nonfinite not in NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE}, got {self.on_nonfinite!r}")
        if not callable(self.loss) and self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)} or pass a callable "
                             "loss_fn(outputs, targets) -> scalar")
        if callable(self.loss):
            _check_loss_signature(self.loss)
        if isinstance(self.adapt_params, str):
            raise ValueError(f"adapt_params must be a collection of parameter names or a predicate(name, tensor), "
                             f"got the string {self.adapt_params!r}; write adapt_params=[{self.adapt_params!r}]")
        if self.adapt_params is not None and not callable(self.adapt_params):
            object.__setattr__(self, "adapt_params", tuple(self.adapt_params))
        object.__setattr__(self, "optimizer", InnerOptimizer.of(self.optimizer))
        if not isinstance(self.inner_batch, int) or self.inner_batch < 0:
            raise ValueError(f"inner_batch must be an integer >= 0 (0: every example each step), got {self.inner_batch!r}")
        if self.optimizer.has_state and self.recompute:
            raise ValueError(f"recompute rebuilds each inner step from its starting weights alone, which the "
                             f"{self.optimizer.name!r} inner optimizer (with state) does not allow; use 'sgd'")

    def adapted_names(self, params: dict[str, Tensor]) -> list[str]:
        """The parameters the inner loop adapts (see adapt_params), in the order of `params`."""
        rule = self.adapt_params
        if rule is not None and not callable(rule):
            unknown = sorted(set(rule) - set(params))
            if unknown:
                raise ValueError(f"adapt_params names {unknown}, which are not parameters of the model; "
                                 f"it has {list(params)[:8]}{' ...' if len(params) > 8 else ''}")
        # Weights that carry no graph at all (evaluation, detached copies) are all adaptable;
        # among ones that do, requires_grad=False marks the frozen.
        any_grad = any(v.requires_grad for v in params.values())
        chosen = [k for k, v in params.items() if (v.requires_grad or not any_grad) and
                  (rule is None or (rule(k, v) if callable(rule) else k in rule))]
        if not chosen:
            raise ValueError("no parameter is adapted: every parameter is frozen (requires_grad=False) or left out by "
                             "adapt_params; adapt at least one")
        return chosen

    @classmethod
    def from_config(cls, config: MAMLConfig, **changes) -> "InnerLoopSettings":
        """The inner loop a MAMLConfig describes (its algorithm's order), with `changes` on top."""
        settings = cls(steps=config.inner_steps, first_order=config.first_order, inner_clip=config.inner_clip,
                       engine=config.engine, backend=config.backend, loss=config.loss,
                       on_nonfinite="skip" if config.skip_nonfinite_tasks else "raise",
                       proximal=config.imaml_lambda if config.algo == "imaml" else 0.0,
                       inner_batch=config.inner_batch,
                       optimizer=InnerOptimizer(config.inner_optimizer, config.inner_momentum, config.inner_betas,
                                                config.inner_eps))
        return settings.replace(**changes)

    def replace(self, **changes) -> "InnerLoopSettings":
        return dataclasses.replace(self, **changes)


@dataclass
class StepLog:
    """One inner step, averaged over the tasks that were not skipped (per-task values in *_per_task)."""
    step: int
    loss: float
    accuracy: float
    grad_norm: float
    update_norm: float
    lr_mean: float
    lr_min: float
    lr_max: float
    clip_factor: float = 1.0
    loss_per_task: list[float] = field(default_factory=list)
    # Query loss/accuracy before this step's update (the adaptation curve), when a query set was given.
    query_loss: float | None = None
    query_accuracy: float | None = None


@dataclass
class AdaptResult:
    adapted: dict[str, Tensor]
    logs: list[StepLog]
    # Query loss and accuracy after 0..steps updates, averaged over the tasks not skipped (filled
    # when a query batch was given).
    curve_loss: list[float]
    curve_accuracy: list[float]
    task_ok: Tensor  # [T] bool, False for tasks skipped after a non-finite loss
    msl_loss_per_task: Tensor | None = None  # [T] sum_k w_k query loss after k+1 updates (MSL)
    # recompute=True: back-propagates d(objective)/d(adapted weights) ([T, *shape] per parameter,
    # in order) through the inner loop, rebuilding one step's second-order graph at a time.
    backward: Callable[[list[Tensor]], None] | None = None
    # The same curve per task: [T, steps + 1] (with a query batch).
    curve_loss_per_task: Tensor | None = None
    curve_accuracy_per_task: Tensor | None = None
    # The inner optimizer's final state, [T, *shape] per adapted weight for each of its kinds
    # (momentum: the buffers; Adam: the two moments); None for SGD.
    optimizer_state: list[list[Tensor]] | None = None


@dataclass
class CarriedState:
    """An inner optimizer's state for the next inner loop to start from instead of zeros (Reptile
    with one Adam across tasks, MAMLConfig.inner_state='carried'): for each of its kinds, one
    tensor per adapted weight, shared by all tasks; `steps`: the updates it has seen, which Adam's
    bias correction counts on."""
    state: list[list[Tensor]]
    steps: int


def map_inputs(fn: Callable[[Tensor], Tensor], x):
    """fn on every tensor of a model input: one tensor, or a tuple / list / dict of them (several
    inputs, keyword inputs), each [T, N, ...]."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_inputs(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: map_inputs(fn, v) for k, v in x.items()}
    return x


def compute_inputs(x, dtype: torch.dtype):
    """Floating-point model inputs in `dtype`, the dtype of the weights they meet (the inner loop's
    and the query pass's compute dtype: half, bfloat16 and float64 images meet float32 weights);
    integer inputs (token ids, class indices) unchanged."""
    return map_inputs(lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t, x)


def lead_tensor(x) -> Tensor:
    """The first tensor of a model input (its task and sample dims are those of every other)."""
    if isinstance(x, Tensor):
        return x
    for v in (x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()):
        try:
            return lead_tensor(v)
        except ValueError:
            continue
    raise ValueError(f"the model inputs hold no tensor (got {type(x).__name__}); pass a tensor, or a tuple or dict of "
                     "tensors, each [T, N, ...]")


def batch_parts(task_batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_support, y_support, x_query, y_query) of a TaskBatch or a 4-tuple."""
    if hasattr(task_batch, "x_support"):
        return task_batch.x_support, task_batch.y_support, task_batch.x_query, task_batch.y_query
    if isinstance(task_batch, (tuple, list)) and len(task_batch) == 4:
        return tuple(task_batch)
    got = f"a {type(task_batch).__name__}" + (f" of {len(task_batch)}" if isinstance(task_batch, (tuple, list)) else "")
    raise ValueError(f"task_batch must be a TaskBatch or a tuple (x_support, y_support, x_query, y_query), got {got}")


def support_parts(support_batch, name: str = "support_batch") -> tuple:
    """(x, y) of a support (or query) batch given as a pair."""
    if isinstance(support_batch, (tuple, list)) and len(support_batch) == 2:
        return tuple(support_batch)
    got = f"a {type(support_batch).__name__}" + (f" of {len(support_batch)}" if isinstance(support_batch, (tuple, list))
                                                 else f" of shape {list(support_batch.shape)}"
                                                 if isinstance(support_batch, Tensor) else "")
    raise ValueError(f"{name} must be a pair (x, y): inputs [T, N, ...] and targets [T, N], got {got}")


def check_same_samples(xs, xq) -> None:
    """Support and query inputs must describe samples of the same shape (after [T, N])."""
    shapes = lambda x: [tuple(t.shape[2:]) for t in structure_tensors(x)]
    if shapes(xs) != shapes(xq):
        raise ValueError(f"support samples have shape {shapes(xs)} but query samples {shapes(xq)} (after [T, N]); the "
                         "model sees both, so they must match")


def as_task_batch(x: Tensor, y: Tensor, name: str, loss: str | Callable = "cross_entropy") -> tuple[Tensor, Tensor]:
    """Adds the task dim to a single classification task; checks shapes and label types.

    cross_entropy: x [T, N, ...], y [T, N] integer classes (or one task: x [N, ...], y [N]).
    mse and a loss callable: x [T, N, ...], y [T, N, ...] targets. x may be several inputs (a
    tuple or dict of tensors, each [T, N, ...]); every one must hold the same T and N.
    cross_entropy also takes soft / one-hot targets: float y [T, N, C], C the model's outputs."""
    check_tensors(x, y, name)
    if not isinstance(x, Tensor):
        lead = lead_tensor(x)
        shapes = []
        map_inputs(lambda t: shapes.append(tuple(t.shape[:2])), x)
        if any(s != tuple(lead.shape[:2]) for s in shapes):
            raise ValueError(f"{name}: every input must share the task and sample dims [T, N]; got {shapes}")
        if lead.dim() == y.dim() + 1 - (0 if loss == "cross_entropy" else 1) and y.dim() == 1:
            raise ValueError(f"{name}: several inputs need the task dim: each [T, N, ...] with y [T, N]")
        _, y = as_task_batch(lead, y, name, loss)
        return x, y
    if x.dim() >= 1 and x.shape[0] == 0:
        raise ValueError(f"{name}: the batch holds 0 tasks (x of shape {list(x.shape)}); give at least one task")
    if callable(loss):
        if y.dim() < 2 or x.dim() < 2 or x.shape[:2] != y.shape[:2]:
            raise ValueError(f"{name}: x must be [T, N, ...] and y [T, N, ...]; got x {list(x.shape)} and y {list(y.shape)}")
        if y.shape[1] == 0:
            raise ValueError(f"{name} set is empty: it needs at least one example per task")
        return x, y
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "cross_entropy" and y.dim() == 1:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    soft = loss == "cross_entropy" and y.dim() == 3 and y.is_floating_point()  # soft / one-hot targets [T, N, C]
    if y.dim() < 2 or x.dim() < 2 or x.shape[:2] != y.shape[:2] or (loss == "cross_entropy" and y.dim() != 2
                                                                    and not soft):
        want = "y [T, N] (or soft targets [T, N, C])" if loss == "cross_entropy" else "y [T, N, ...]"
        raise ValueError(f"{name}: x must be [T, N, ...] and {want}; got x {list(x.shape)} and y {list(y.shape)}")
    if y.shape[1] == 0:
        raise ValueError(f"{name} set is empty: it needs at least one example per task")
    if loss == "cross_entropy" and not soft:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{name} labels must be integer class indices for cross_entropy, got {y.dtype}")
        y = y.long()  # cross_entropy takes int64 targets only; any integer width is accepted here
    return x, y


def check_tensors(x, y, name: str) -> None:
    """x and y of a support / query set must be torch tensors (x may be a tuple or dict of them)."""
    for what, v in (("x (the inputs)", x), ("y (the targets)", y)):
        if type(v).__module__ == "numpy":
            raise TypeError(f"{name}: {what} must be a torch tensor, got numpy.{type(v).__name__}; convert it with "
                            "torch.from_numpy(...)")
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: y (the targets) must be a tensor: class indices [T, N] (or [N] for one task), or "
                        f"[T, N, ...] targets; got {type(y).__name__}")


def check_devices(x, y: Tensor, device: torch.device, name: str) -> None:
    """The inputs, the targets and the model's weights must be on one device."""
    lead = lead_tensor(x)
    for what, t in (("inputs", lead), ("labels / targets", y)):
        if t.device != device:
            raise ValueError(f"{name} {what} are on {t.device}, but the model's weights on {device}: move them to one "
                             f"device (e.g. x.to({str(device)!r}))")


def _check_labels(y: Tensor, n_out: int, name: str) -> None:
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_out:
        raise ValueError(f"{name} labels must lie in [0, {n_out}) for a {n_out}-way output, got labels in [{lo}, {hi}]; "
                         "remap labels to 0..n_way-1 per episode")


def lr_table(lrs, steps: int, names: list[str], device, dtype=torch.float32) -> Tensor:
    """[steps, n_params] learning rates from a float, a per-parameter vector, or a full table
    (a float becomes a tensor of the params' precision, so float64 runs keep exact rates)."""
    if isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
        if not 0 < lrs < math.inf:
            raise ValueError(f"inner lr must be > 0 and finite, got {lrs}")
        return torch.full((steps, len(names)), float(lrs), device=device, dtype=dtype)
    if not isinstance(lrs, (Tensor, list, tuple)) or isinstance(lrs, Tensor) and lrs.is_complex():
        raise ValueError(f"lrs (the inner learning rate) must be a float > 0, a [{len(names)}] tensor (one per "
                         f"parameter), a [steps, {len(names)}] table or a dict of per-element rates, got "
                         f"{type(lrs).__name__} {lrs!r}"[:400])
    try:
        lrs = torch.as_tensor(lrs, device=device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"lrs (the inner learning rate) must be numbers: a float, one per parameter or a "
                         f"[steps, {len(names)}] table, got {lrs!r} ({exc})"[:400]) from None
    if lrs.dim() == 0:  # a 0-d tensor is one rate for every parameter and step (it keeps its graph)
        lrs = lrs.reshape(1).expand(len(names))
    if not lrs.is_floating_point():  # integer rates: a list of ints, or an integer tensor
        lrs = lrs.to(dtype)
    if lrs.dim() == 1 and lrs.numel() == len(names):
        table = lrs.unsqueeze(0).expand(steps, -1)
    elif lrs.dim() == 2 and tuple(lrs.shape) == (steps, len(names)):
        table = lrs
    else:
        raise ValueError(f"lrs must be a float, [{len(names)}] (one per parameter) or [{steps}, {len(names)}] "
                         f"(per step and parameter), got shape {list(lrs.shape)}")
    check_rates(lrs, "lrs", allow_negative=False)
    return table


def check_rates(rates: Tensor, name: str, *, allow_negative: bool) -> None:
    """Refuses NaN / inf rates (and negative ones unless allowed), as a float rate is refused: once
    per adapt call, on the values only (learned rates keep their graph), with one host sync."""
    r = rates.detach()
    bad = ~torch.isfinite(r) if allow_negative else ~torch.isfinite(r) | (r < 0)
    if bool(bad.any()):
        allowed = "finite" if allow_negative else "finite and >= 0"
        raise ValueError(f"{name} must be {allowed}, got {r[bad].flatten()[:4].tolist()} among them "
                         f"(shape {list(r.shape)}): check the rates, or lower the outer lr if they are learned")


def prediction(outputs):
    """The tensor the built-in losses and the accuracy read from a model's output: the output
    itself, else its `logits` (a dict key or attribute, as Hugging Face models give them), else
    its first tensor (a tuple, dict, dataclass)."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    leaves = structure_tensors(outputs)
    if not leaves:
        raise ValueError(f"the model returned {type(outputs).__name__} holding no tensor; return the logits (or a "
                         "tuple / dict whose 'logits' or first entry they are)")
    return leaves[0]


def per_task_loss(outputs, y: Tensor, loss: str | Callable = "cross_entropy", name: str = "support"):
    """(loss [T], accuracy [T]) of each task; accuracy is NaN for regression. A callable loss gets
    the outputs as the model returned them (any structure); the built-in ones read prediction()."""
    T, N = y.shape[:2]
    if callable(loss):
        return _callable_loss(loss, outputs, y, name), _accuracy(prediction(outputs), y)
    outputs = prediction(outputs)
    if loss == "mse":
        if outputs.shape != y.shape:
            raise ValueError(f"{name}: model outputs {list(outputs.shape)} do not match targets {list(y.shape)}")
        per = (outputs - y.to(outputs.dtype)).pow(2).reshape(T, -1).mean(1)
        return per, torch.full((T,), math.nan, device=y.device)
    if y.is_floating_point():  # soft / one-hot targets [T, N, C] (as_task_batch let only those through)
        if outputs.shape != y.shape:
            raise ValueError(f"{name}: soft targets {list(y.shape)} do not match the model's outputs "
                             f"{list(outputs.shape)}: give one probability per output class ([T, N, C])")
        per = F.cross_entropy(outputs.reshape(T * N, -1), y.to(outputs.dtype).reshape(T * N, -1),
                              reduction="none").view(T, N).mean(1)
        return per, _accuracy(outputs, y)
    _check_labels(y, outputs.shape[-1], name)
    per = F.cross_entropy(outputs.reshape(T * N, -1), y.reshape(-1), reduction="none").view(T, N).mean(1)
    return per, (outputs.detach().argmax(-1) == y).float().mean(1)


def _callable_loss(loss_fn: Callable, outputs, y: Tensor, name: str) -> Tensor:
    """loss_fn on each task's outputs (as the model returned them) and targets: one batched call
    under vmap, or a loop over the tasks when the callable cannot run under vmap."""
    T = y.shape[0]
    try:
        per = torch.func.vmap(loss_fn)(outputs, y)
    except Exception:  # noqa: BLE001 - e.g. .item() or data-dependent control flow inside loss_fn
        of_task = lambda t: map_structure(lambda v: v[t], outputs)
        try:
            values = [loss_fn(of_task(t), y[t]) for t in range(T)]
        except Exception as exc:  # targets whose last dim differs from the outputs' (one-hot of another width)
            out = prediction(outputs)
            if y.is_floating_point() and y.dim() == out.dim() >= 3 and y.shape[:-1] == out.shape[:-1] and \
                    y.shape[-1] != out.shape[-1]:
                raise ValueError(f"{name}: targets {list(y.shape)} do not match the model's outputs {list(out.shape)} "
                                 f"(loss_fn raised {type(exc).__name__}: {str(exc).splitlines()[0][:120]}); give "
                                 f"targets with {out.shape[-1]} classes, or a model with {y.shape[-1]} outputs") from exc
            raise
        bad = [v for v in values if not isinstance(v, Tensor)]
        if bad:
            bad = bad[0]
            raise TypeError(f"{name}: loss_fn returned {type(bad).__name__} ({bad!r}), not a tensor; compute the loss "
                            "from the outputs with torch operations (a Python number carries no gradient)")
        per = torch.stack(values)
    shape = list(prediction(outputs).shape[1:])
    if not isinstance(per, Tensor) or per.shape != (T,):
        got = list(per.shape[1:]) if isinstance(per, Tensor) else type(per).__name__
        raise ValueError(f"{name}: loss_fn(outputs, targets) must return a scalar for one task's outputs "
                         f"{shape} and targets {list(y.shape[1:])}, i.e. shape [], got {got}; reduce it (e.g. .mean())")
    if not per.is_floating_point():
        raise TypeError(f"{name}: loss_fn returned a {per.dtype} value; a loss must be floating point (a count or an "
                        "argmax has no gradient): e.g. F.cross_entropy(outputs, targets)")
    if not per.requires_grad and any(v.requires_grad for v in structure_tensors(outputs)):
        raise ValueError(f"{name}: loss_fn returned a value that does not depend on the outputs (it has no gradient): "
                         "compute it from `outputs` with differentiable torch operations, not .item(), float() or "
                         "torch.tensor(...)")
    return per


def _accuracy(outputs: Tensor, y: Tensor) -> Tensor:
    """Per-task accuracy for class scores [T, N, K] against class indices [T, N] or soft / one-hot
    targets [T, N, K]; NaN for anything else (regression)."""
    with torch.no_grad():
        if outputs.dim() == 3 and y.dim() == 2 and not y.is_floating_point():
            return (outputs.argmax(-1) == y).float().mean(1)
        if outputs.dim() == 3 and y.shape == outputs.shape and y.is_floating_point():
            return (outputs.argmax(-1) == y.argmax(-1)).float().mean(1)
        return torch.full((outputs.shape[0],), math.nan, device=outputs.device)


def query_pass(task_model, weights: dict[str, Tensor], xq: Tensor, yq: Tensor, *, step: int,
               settings: InnerLoopSettings, update_stats: bool = False) -> tuple[Tensor, Tensor]:
    """Per-task query loss and accuracy ([T] each) under `weights`, the weights after `step` inner
    updates: the points of the adaptation curve, the multi-step loss terms and the meta-objective
    all come from here. update_stats folds the pass's BN statistics into the running ones."""
    # The inner loop's input conversion: half inputs meet the weights in their compute dtype.
    xq = compute_inputs(xq, compute_dtype(next(iter(weights.values())).dtype))
    out = task_model(weights, xq, step=step, bn_mode=settings.bn_mode, update_stats=update_stats)
    return per_task_loss(out, yq, settings.loss, "query")


def masked_mean(v: Tensor, ok: Tensor) -> float:
    """Mean of v over the tasks that are ok (NaN when none is)."""
    return float(v[ok].mean()) if bool(ok.any()) else math.nan
