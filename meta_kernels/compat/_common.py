"""What both compat layers share: where a model keeps its weights (Slots), its forward run with
other weights swapped into those places (ModelRunner, which also picks, by measurement once per
model, between the model's own layers and the task-batching engine's fused ops), the inner
update, and the copy of a module tree for code that reaches into a learner's modules.

Why swap rather than copy: learn2learn copies the whole module tree at every clone() and walks
it again at every update; a learner here is a list of weights, and the model's own modules run
with them for the length of a call (restored after, also on an exception)."""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from meta_kernels import ops
from meta_kernels.malloc_tuning import keep_freed_cpu_memory
from meta_kernels.meta.batching import BatchedModel, _TaskLinear
from meta_kernels.meta.factored import (FactoredWeight, _factored_linear, _Placeholder, entry_grads, factored_rank_limit,
                                         formed, placeholder)
from meta_kernels.meta.inner_common import NonFiniteLossError
from meta_kernels.meta.task_model import TaskModel


# ---- where the weights live ------------------------------------------------------------------

class Slots:
    """The model's parameters and buffers, deduplicated in model.parameters() / model.buffers()
    order, and every (module, key) place that holds one of them (a tied weight has several)."""

    def __init__(self, model: nn.Module):
        self.params, self.param_slots = _collect(model, "_parameters")
        self.buffers, self.buffer_slots = _collect(model, "_buffers")
        self.param_names = [name for name, _ in model.named_parameters()]
        self.buffer_names = [name for name, _ in model.named_buffers()]
        self.rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]

    def current(self) -> bool:
        """Whether the model still holds the tensors these slots were built from."""
        return all(m._parameters.get(k) is self.params[i] for m, k, i in self.param_slots) and \
            all(m._buffers.get(k) is self.buffers[i] for m, k, i in self.buffer_slots)

    def put(self, weights: Sequence[Tensor] | None, buffers: Sequence[Tensor] | None) -> None:
        """Writes weights / buffers (aligned with self.params / self.buffers) into the model."""
        if weights is not None:
            for m, k, i in self.param_slots:
                m._parameters[k] = weights[i]
        if buffers is not None:
            for m, k, i in self.buffer_slots:
                m._buffers[k] = buffers[i]
        for m in self.rnns:  # RNNs run from a list of their weights built at construction
            m._init_flat_weights()

    def call_with(self, weights: Sequence[Tensor] | None, buffers: Sequence[Tensor] | None, fn: Callable):
        """fn() with weights / buffers (None: the model's own) in the model's places, restored after."""
        if weights is None and buffers is None:
            return fn()
        self.put(weights, buffers)
        try:
            return fn()
        finally:
            self.put(self.params, self.buffers)


def _collect(model: nn.Module, attr: str):
    tensors, index, slots = [], {}, []
    for m in model.modules():
        for k, t in getattr(m, attr).items():
            if t is None:
                continue
            if id(t) not in index:
                index[id(t)] = len(tensors)
                tensors.append(t)
            slots.append((m, k, index[id(t)]))
    return tensors, slots


# ---- Linear weights adapted in factored form (meta/factored.py) ---------------------------------

def factorable_weights(model: nn.Module, slots: Slots) -> list[int]:
    """Indices (in slots.params) of Linear weights large enough for factored steps to pay: a rank
    limit of at least 32 (e.g. 64 x 64 and up; learn2learn's 5-way classifier heads are not)."""
    return sorted({i for m, k, i in slots.param_slots
                   if isinstance(m, nn.Linear) and k == "weight" and slots.params[i].dim() == 2
                   and slots.params[i].is_floating_point() and factored_rank_limit(*slots.params[i].shape) >= 32})


def engine_factorable(model: nn.Module, task_model: TaskModel) -> list[int]:
    """factorable_weights (indices in model.parameters() order) of the Linear layers that the
    task-batching engine runs as one batched product (not those under a per-layer fallback)."""
    if task_model.engine is None:
        return []
    batched = {id(original) for view, original in task_model.engine._pairs if isinstance(view, _TaskLinear)}
    runner = runner_for(model)  # its slots and factorable weights, found once per model
    return [i for i in runner.factorable
            if any(id(m) in batched for m, k, j in runner.slots.param_slots if j == i and k == "weight")]


class _LinearForward:
    """An nn.Linear's forward with its factored weight (set as the instance's `forward`)."""
    __slots__ = ("module", "held")

    def __init__(self, module: nn.Module, held: _Placeholder):
        self.module, self.held = module, held

    def __call__(self, input: Tensor) -> Tensor:
        return _factored_linear(self.held, input, self.module.bias)


def stepped_entries(entries: Sequence, direct: dict, outer: dict, direction, rates) -> list:
    """The entries after an SGD step with the gradients of entry_grads: w - rates[i] *
    direction(i, grad). A factored entry takes its factored gradients as new factors (direction
    must then be the gradient itself: MAML, not MetaSGD's per-element rates)."""
    out = list(entries)
    moved = list(direct)
    formed = [entries[i].dense_ if isinstance(entries[i], FactoredWeight) else entries[i] for i in moved]
    for i, new in zip(moved, sgd_update(formed, [direction(i, direct[i]) for i in moved], [rates[i] for i in moved])):
        out[i] = FactoredWeight(new) if isinstance(entries[i], FactoredWeight) else new
    for i, pairs in outer.items():
        x = pairs[0][0] if len(pairs) == 1 else torch.cat([x for x, _ in pairs])
        g = pairs[0][1] if len(pairs) == 1 else torch.cat([g for _, g in pairs])
        out[i] = out[i].stepped(g * rates[i], x)
    return out


# ---- a forward with given weights, and the choice of path --------------------------------------

# The layers whose task-aware forms run on the fused ops (batch_norm, conv3x3_bn_pool_relu,
# max_pool2x2_relu): only models with one of them have an engine path worth measuring.
_FUSED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ROUNDS = 7


class ModelRunner:
    """Runs a model's forward for one task with given weights and buffers (None: the model's own).

    Three paths: `plain`, the model's own modules with the weights swapped in; `factored`, the
    same with the larger Linear weights of a MAML learner kept in factored form (FactoredWeight);
    and `engine`, the task-batching engine's view with T = 1, whose convs and batch norms run on
    the fused ops. Which is faster depends on the model (the fused ops save memory passes but cost
    a custom-op call each: a win for a conv net with 64 channels, a loss for an MLP on 5 samples;
    factored steps pay for wide Linear layers on few samples). On a CPU with several threads each
    path is also tried on one thread: a task of a few samples makes
    ops too small to split, where a split's fork and join cost more than it saves (learn2learn's
    OmniglotFC: bench/RESULTS.md) while a conv net's larger maps gain from the threads. The
    first differentiated call times the candidates on its own inputs -- a MAML step: forward,
    inner gradient, forward with the adapted weights, the meta-loss's backward; a warm-up round,
    then seven alternating rounds, the median of each -- and keeps the fastest for that model
    (`plan` says which and why). The thread count chosen holds for the forward and the inner gradient
    (`threads()`, used by adapt() and diffopt.step()), for the calling thread while our call
    runs, restored after; the meta-loss's backward runs as the user set it. (It is
    torch.set_num_threads: a thread that starts using torch meanwhile starts on one thread, and
    oneDNN's primitive cache is dropped at each switch; META_KERNELS_COMPAT_ONE_THREAD=0 leaves the
    threads alone.) The timing leaves no trace: buffers (running statistics) and the RNG state are
    restored after it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.slots = Slots(model)
        self.choice: dict[tuple, tuple[str, int | None]] = {}
        self.unfactored_choice: dict[tuple, tuple[str, int | None]] = {}  # for learners that cannot factor
        self.factorable = factorable_weights(model, self.slots)
        # The nn.Linear modules (forward not overridden) holding a factorable weight.
        self._linears = [(m, i) for m, k, i in self.slots.param_slots
                         if k == "weight" and i in self.factorable and type(m).forward is nn.Linear.forward]
        self.plan = "plain (not yet measured: no differentiated call so far)"
        self._engine = None
        fused = {f"{prefix}.{name}" if prefix else name
                 for prefix, m in model.named_modules(remove_duplicate=False) if type(m) in _FUSED_LAYERS
                 for name, p in m._parameters.items() if p is not None}
        if fused:
            engine = BatchedModel(model)
            if not any(plan.how.startswith(("vmap", "loop")) for plan in engine.plans):
                self._engine, self._fused = engine, fused

    def refresh(self) -> None:
        """Rebuilds the slots when the model's weights were replaced since (model.fc = nn.Linear(...))."""
        if not self.slots.current():
            self.__init__(self.model)

    def _key(self, second_order: bool) -> tuple:
        return second_order, self.slots.params[0].device.type if self.slots.params else "cpu"

    def __call__(self, weights: Sequence[Tensor] | None, buffers: Sequence[Tensor] | None, args: tuple, kwargs: dict,
                 second_order: bool = True, fast: "FastModel | None" = None):
        """The forward; `fast` (whose entries are `weights`) lets a MAML learner's Linear weights be
        factored and records its factored forwards."""
        key = self._key(second_order)
        choice = self.choice.get(key)
        if choice is None:
            if torch.is_grad_enabled() and any(w.requires_grad for w in (weights or self.slots.params)):
                choice = self._choose(key, formed(weights) if weights is not None else None, buffers, args, kwargs,
                                      second_order)
            else:
                choice = ("plain", None)
        if choice[0] == "factored" and (fast is None or not fast.factorable):
            choice = self.unfactored_choice[key]
        path, threads = choice
        records = None
        if path == "factored":
            fast.factor(self.factorable)
            weights, records = fast.entries, fast.records
        with threads_set(threads):
            return self.run(path, weights, buffers, args, kwargs, records)

    def threads(self, second_order: bool):
        """A context holding the thread count chosen for this model's inner work (or none yet)."""
        choice = self.choice.get(self._key(second_order))
        return threads_set(None if choice is None else choice[1])

    def run(self, path: str, weights, buffers, args: tuple, kwargs: dict, records: list | None = None):
        if path == "factored":
            records = [] if records is None else records
            swapped = [placeholder(i, w, records) if isinstance(w, FactoredWeight) else w
                       for i, w in enumerate(weights)]
            # nn.Linear modules call the factored forward directly (a forward in the instance's
            # dict, removed after): the placeholder's __torch_function__ costs more per call.
            linears = [(m, swapped[i]) for m, i in self._linears
                       if isinstance(swapped[i], _Placeholder) and "forward" not in m.__dict__]
            for m, held in linears:
                m.__dict__["forward"] = _LinearForward(m, held)
            try:
                return self.slots.call_with(swapped, buffers, lambda: self.model(*args, **kwargs))
            finally:
                for m, _ in linears:
                    del m.__dict__["forward"]
        weights = None if weights is None else formed(weights)
        if path == "engine":
            # The buffers go into the model's places, which the engine's view shares (functional_call
            # would restore a module registered under two names to the wrong tensor).
            params = {name: w.unsqueeze(0) if name in self._fused else w
                      for name, w in zip(self.slots.param_names, self.slots.params if weights is None else weights)}
            return self.slots.call_with(None, buffers, lambda: self._engine.one_task(params, args, kwargs))
        return self.slots.call_with(weights, buffers, lambda: self.model(*args, **kwargs))

    def _choose(self, key, weights, buffers, args, kwargs, second_order: bool) -> tuple[str, int | None]:
        saved = [b.detach().clone() for b in (buffers if buffers is not None else self.slots.buffers)]
        rng = torch.get_rng_state()
        cuda = torch.cuda.is_available() and any(w.is_cuda for w in self.slots.params)
        paths = ["plain"] + (["factored"] if self.factorable else []) + (["engine"] if self._engine is not None else [])
        one_thread = (key[1] == "cpu" and torch.get_num_threads() > 1
                      and os.environ.get("META_KERNELS_COMPAT_ONE_THREAD", "1") != "0")
        thread_counts = [None] + ([1] if one_thread else [])
        times: dict[tuple, list[float]] = {(path, n): [] for path in paths for n in thread_counts}
        if len(times) == 1:  # nothing to choose between
            self.choice[key] = self.unfactored_choice[key] = ("plain", None)
            self.plan = "plain (no layer with a fused op, no other thread count to try)"
            return self.choice[key]
        failed = ""
        try:
            # Round 0 warms up, untimed: the first calls of a process pay one-time costs (allocator,
            # BLAS and thread-pool set-up) that made the first measured candidates look slower.
            for round_ in range(_ROUNDS + 1):
                for candidate in list(times):
                    if candidate not in times:  # its path failed in this round
                        continue
                    path, n = candidate
                    start = time.perf_counter()
                    try:
                        _exercise(self, path, weights if weights is not None else self.slots.params, buffers, args,
                                  kwargs, second_order, n)
                    except _StepFailed as exc:
                        if path == "plain":  # the model's own step fails: the user's loop will meet it
                            return self._unmeasured(key, exc.__cause__, second_order)
                        failed = _first_line(exc.__cause__)
                        times = {c: t for c, t in times.items() if c[0] != path}
                        continue
                    except Exception as exc:  # noqa: BLE001 - a path that cannot run this model is dropped
                        if path == "plain":  # the model's own forward fails on these inputs: as the user's would
                            raise
                        failed = _first_line(exc)
                        times = {c: t for c, t in times.items() if c[0] != path}
                        continue
                    if cuda:
                        torch.cuda.synchronize()
                    if round_:
                        times[candidate].append(time.perf_counter() - start)
        finally:
            with torch.no_grad():
                for b, s in zip(buffers if buffers is not None else self.slots.buffers, saved):
                    b.copy_(s)
            torch.set_rng_state(rng)
        # The median, not the fastest round: a step's time here is bimodal (the plain path's
        # weight-sized temporaries, bench/RESULTS.md), and the user's loop meets both modes.
        times = {c: statistics.median(t) for c, t in times.items()}
        choice = self.choice[key] = min(times, key=times.get)
        self.unfactored_choice[key] = min((c for c in times if c[0] != "factored"), key=times.get)
        self.plan = _plan_text(choice, self.unfactored_choice[key], times, second_order, failed,
                               self._engine is not None)
        return choice

    def _unmeasured(self, key, exc: BaseException, second_order: bool) -> tuple[str, int | None]:
        """The model's own layers, unmeasured, after a MAML step through them raised: the same step
        in the user's loop raises there (at adapt() or the meta-loss's backward), as with the
        original library -- not here, in a forward that the original runs without error."""
        self.choice[key] = self.unfactored_choice[key] = ("plain", None)
        order = "second" if second_order else "first"
        self.plan = f"plain (not measured: a {order}-order MAML step through this model raised {_first_line(exc)})"
        hint = ("; attention through torch's fused CPU kernels has no double backward: run the loop under "
                "torch.nn.attention.sdpa_kernel(SDPBackend.MATH), or use first_order=True"
                if "scaled_dot_product" in str(exc) else "")
        warnings.warn(f"meta_kernels.compat: a {order}-order MAML step through {type(self.model).__name__} raised "
                      f"{_first_line(exc)}; the learner runs the model's own layers, unmeasured, and the same step "
                      f"in your loop is expected to raise it there, as with the original library{hint}", stacklevel=2)
        return self.choice[key]


class _StepFailed(Exception):
    """_exercise's failure after the forward (the inner gradient, the meta-loss's backward); the cause is chained."""


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _plan_text(choice, unfactored, times: dict, second_order: bool, failed: str, has_engine: bool) -> str:
    """E.g. 'plain on one thread (second-order step measured: model's own layers 3.10 ms, fused
    ops 3.52 ms; on one thread: model's own layers 2.61 ms, fused ops 3.20 ms)'; a factored choice
    also names what learners that cannot factor (MetaSGD, higher) take."""
    labels = {"plain": "model's own layers", "factored": "factored Linear steps", "engine": "fused ops"}
    ms = lambda n: ", ".join(f"{labels[p]} {t * 1e3:.2f} ms" for (p, k), t in times.items() if k == n)
    measured = ms(None) + (f"; on one thread: {ms(1)}" if any(k == 1 for _, k in times) else "")
    reason = (f"a path cannot run this model: {failed}; " if failed else
              "" if has_engine else "no layer with a fused op; ")
    label = lambda c: c[0] + (" on one thread" if c[1] == 1 else "")
    name = label(choice) + (f" for MAML learners, {label(unfactored)} for others" if choice[0] == "factored" else "")
    return f"{name} ({reason}{'second' if second_order else 'first'}-order step measured: {measured})"


def threads_set(n: int | None):
    """A context running torch's intra-op work on n threads in the calling thread (None: as it is)."""
    return contextlib.nullcontext() if n is None or n == torch.get_num_threads() else _ThreadCount(n)


class _ThreadCount:
    """threads_set's context (a class, not @contextmanager: it is entered several times per task)."""
    __slots__ = ("n", "before")

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
        return False


def _exercise(runner: ModelRunner, path: str, weights: Sequence[Tensor], buffers, args: tuple, kwargs: dict,
              second_order: bool, threads: int | None) -> None:
    """A MAML step on the call's inputs along `path`: the forward, the inner gradient and the
    forward with the adapted weights on `threads` (as adapt() and the learner run them), then the
    meta-loss's backward on the threads as set (as the user's backward runs)."""
    entries = [FactoredWeight(w) if path == "factored" and i in runner.factorable else w for i, w in enumerate(weights)]
    index = [i for i, w in enumerate(weights) if w.requires_grad]
    records: list = []
    with threads_set(threads):
        loss = _square_mean(runner.run(path, entries, buffers, args, kwargs, records))
        if loss is None or not index:
            return
        try:
            direct, outer = entry_grads(entries, index, records, loss, second_order)
            adapted = stepped_entries(entries, direct, outer, lambda i, g: g, [1e-3] * len(entries))
            meta_loss = _square_mean(runner.run(path, adapted, buffers, args, kwargs, []))
        except Exception as exc:  # noqa: BLE001 - told apart from a failing first forward
            raise _StepFailed() from exc
    if meta_loss is not None and meta_loss.requires_grad:
        try:
            torch.autograd.grad(meta_loss, [weights[i] for i in index], allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            raise _StepFailed() from exc


def _square_mean(out) -> Tensor | None:
    leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, Tensor) and v.requires_grad]
    return sum(v.float().square().mean() for v in leaves) if leaves else None


_RUNNERS: "weakref.WeakKeyDictionary[nn.Module, ModelRunner]" = weakref.WeakKeyDictionary()


def runner_for(model: nn.Module) -> ModelRunner:
    """The model's runner, shared by every learner of that model (so the path is measured once)."""
    runner = _RUNNERS.get(model)
    if runner is None:
        runner = _RUNNERS[model] = ModelRunner(model)
    else:
        runner.refresh()
    return runner


class FastModel:
    """A model run with a learner's own weights (aligned with runner.slots.params) and buffers
    (None: the model's own). `entries` holds each weight as a tensor or, for a MAML learner
    (`factorable`) on the runner's factored path, a FactoredWeight; `weights` gives them all as
    tensors. Code that reaches into the learner's modules (`learner.module.fc`, `learner.eval()`)
    gets a copy of the tree holding these tensors (`tree()`); from then on this learner runs that
    copy, kept in step with every update."""
    __slots__ = ("runner", "entries", "buffers", "factorable", "records", "_tree", "_tree_slots")

    def __init__(self, runner: ModelRunner, weights: Sequence, buffers: Sequence[Tensor] | None = None,
                 factorable: bool = False):
        self.runner, self.entries, self.buffers, self.factorable = runner, list(weights), buffers, factorable
        self.records: list = []  # (entry index, layer input, layer output) of the factored forwards since the last step
        self._tree = self._tree_slots = None

    @property
    def weights(self) -> list[Tensor]:
        return formed(self.entries)

    def __call__(self, args: tuple, kwargs: dict, second_order: bool):
        if self._tree is not None:
            return self._tree(*args, **kwargs)
        return self.runner(self.entries, self.buffers, args, kwargs, second_order, fast=self)

    def factor(self, index: Sequence[int]) -> None:
        """Holds the weights at `index` (Linear weights) as FactoredWeights from now on."""
        for i in index:
            if isinstance(self.entries[i], Tensor) and self.entries[i].requires_grad:
                self.entries[i] = FactoredWeight(self.entries[i])

    def set_weights(self, entries: Sequence) -> None:
        self.entries, self.records = list(entries), []
        if self._tree is not None:
            self._tree_slots.put(self.weights, None)

    def tree(self) -> nn.Module:
        if self._tree is None:
            slots = self.runner.slots
            weight_of = {id(p): w for p, w in zip(slots.params, self.weights)}
            buffer_of = {} if self.buffers is None else {id(b): c for b, c in zip(slots.buffers, self.buffers)}
            self._tree = clone_tree(self.runner.model, weight=lambda p: weight_of[id(p)],
                                    buffer=lambda b: buffer_of.get(id(b), b))
            self._tree_slots = Slots(self._tree)  # the same order as runner.slots: clone_tree keeps it
        return self._tree


_TASK_MODELS: "weakref.WeakKeyDictionary[nn.Module, TaskModel]" = weakref.WeakKeyDictionary()


def task_model_for(model: nn.Module) -> TaskModel:
    """The model's task-batched view (the batched forms' engine), built once per model. On the
    CPU this also turns on the reuse of freed memory (keep_freed_cpu_memory), once per process and
    said once: the batched forms hold every task's tensors at once, tens of MB each, which glibc
    would otherwise map and unmap at every allocation (1.4-1.7x slower steps measured:
    bench/RESULTS.md). META_KERNELS_KEEP_FREED_MEMORY=0 leaves malloc as it is."""
    engine = _TASK_MODELS.get(model)
    if engine is None:
        engine = _TASK_MODELS[model] = TaskModel(model)
        if not any(p.is_cuda for p in model.parameters()):
            _keep_freed_memory_once()
    return engine


def _keep_freed_memory_once() -> None:
    global _MALLOC_SAID
    if _MALLOC_SAID or os.environ.get("META_KERNELS_KEEP_FREED_MEMORY", "1") == "0":
        return
    _MALLOC_SAID = True
    if keep_freed_cpu_memory():
        warnings.warn("meta_kernels.compat: the batched form holds every task's tensors at once; glibc now keeps "
                      "freed memory for reuse in this process (meta_kernels.keep_freed_cpu_memory(): faster steps, "
                      "the process keeps its peak memory). Set META_KERNELS_KEEP_FREED_MEMORY=0 to leave malloc as "
                      "it is", stacklevel=5)


_MALLOC_SAID = False


# ---- argument checks shared by the learners ----------------------------------------------------

def check_loss(loss, who: str) -> None:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{who} takes the loss tensor computed from the learner's outputs, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"{who} takes a scalar loss, got one of shape {list(loss.shape)}; reduce it first, e.g. "
                         "loss.mean() (torch's loss functions do with their default reduction='mean')")
    if not loss.is_floating_point() and not loss.is_complex():
        raise TypeError(f"{who} takes a floating-point loss, got {loss.dtype}")


def check_finite(loss: Tensor, step: int, who: str, allow: bool) -> None:
    """Refuses a NaN / inf inner loss (learn2learn and higher go on with NaN weights), unless allowed."""
    if not allow and not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(f"{who}: the inner loss at step {step} is {loss.detach().item()}; the update would make "
                                 "every weight NaN. Lower the inner learning rate or check the data; "
                                 "allow_nonfinite=True keeps learn2learn's / higher's behaviour (NaN weights)")


def checked_rate(lr, who: str, name: str):
    """A learning rate: a finite number > 0, or a one-element tensor (a learned rate)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{who}: {name} must be a number or a one-element float tensor, got a {lr.dtype} tensor "
                             f"of shape {list(lr.shape)}")
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
        raise TypeError(f"{who}: {name} must be a finite number (the inner learning rate, e.g. {name}=0.4), "
                        f"got {lr!r}")
    if lr <= 0:  # 0 adapts nothing, a negative rate ascends the loss (torch.optim refuses both too)
        raise ValueError(f"{who}: {name} must be > 0 (the inner learning rate, e.g. {name}=0.4), got {lr!r}")
    return float(lr)


def checked_tasks(tasks, task_dim) -> tuple[int | None, int]:
    if tasks is not None and (not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 1):
        raise ValueError(f"tasks must be a positive int (the number of tasks adapted at once), got {tasks!r}")
    if task_dim not in (0, 1) or isinstance(task_dim, bool):
        raise ValueError(f"task_dim must be 0 (inputs [T, N, ...]) or 1 ([N, T, ...]), got {task_dim!r}")
    return tasks, task_dim


# ---- the inner update --------------------------------------------------------------------------

def sgd_update(params: Sequence[Tensor], directions: Sequence[Tensor], rates: Sequence[float | Tensor]) -> list[Tensor]:
    """params[i] - rates[i] * directions[i] for every i, differentiable in all three.

    Rates that are numbers: torch's multi-tensor add, one call per distinct rate (C++ autograd;
    bench/RESULTS.md: at learn2learn's example sizes it costs half of our sgd_step op, whose
    autograd runs in Python). Rates that are tensors (learned rates): one sgd_step launch per
    dtype and device, differentiable in the rates."""
    out: list[Tensor | None] = [None] * len(params)
    numeric: dict[tuple, list[int]] = {}
    learned: dict[tuple, list[int]] = {}
    for i, (p, r) in enumerate(zip(params, rates)):
        if isinstance(r, Tensor):
            learned.setdefault((p.dtype, p.device), []).append(i)
        else:
            numeric.setdefault((float(r), p.dtype, p.device), []).append(i)
    for (rate, _, _), idx in numeric.items():
        for i, new in zip(idx, torch._foreach_add([params[i] for i in idx], [directions[i] for i in idx], alpha=-rate)):
            out[i] = new
    for (dtype, device), idx in learned.items():
        rate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rate_vec = torch.stack([torch.as_tensor(rates[i], dtype=rate_dtype, device=device).reshape(()) for i in idx])
        for i, new in zip(idx, ops.sgd_step([params[i] for i in idx], [directions[i] for i in idx], rate_vec)):
            out[i] = new
    return out


# ---- a copy of the module tree -------------------------------------------------------------------

def clone_tree(module: nn.Module, weight: Callable[[Tensor], Tensor], buffer: Callable[[Tensor], Tensor],
               memo: dict | None = None) -> nn.Module:
    """A copy of the module tree (new module objects, the same attributes) whose weights are
    `weight(p)` and buffers `buffer(b)`; a tensor or module shared by several modules stays shared."""
    memo = {} if memo is None else memo
    if not isinstance(module, nn.Module):
        return module
    if id(module) in memo:
        return memo[id(module)]
    clone = memo[id(module)] = module.__new__(type(module))
    clone.__dict__ = module.__dict__.copy()
    clone._parameters = {k: None if p is None else _memo(memo, p, weight) for k, p in module._parameters.items()}
    clone._buffers = {k: None if b is None else _memo(memo, b, buffer) for k, b in module._buffers.items()}
    clone._modules = {k: clone_tree(m, weight, buffer, memo) for k, m in module._modules.items()}
    if isinstance(clone, nn.RNNBase):
        clone._init_flat_weights()
    return clone


def _memo(memo: dict, t: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
    if id(t) not in memo:
        memo[id(t)] = make(t)
    return memo[id(t)]
