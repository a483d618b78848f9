"""Configuration dataclasses. Every config validates itself when built, so a bad value
fails at construction with the field named, not deep inside training."""
from __future__ import annotations

import dataclasses
import re
import math
import numbers
from dataclasses import dataclass

KNOWN_DATASETS = ("omniglot", "mini_imagenet", "custom", "sinusoid")
ALGORITHMS = ("maml", "fomaml", "reptile", "imaml")
INNER_STATES = ("per_task", "carried")
REPTILE_UPDATES = ("interpolate", "meta_optimizer")
ENGINES = ("auto", "custom", "torch_func", "higher")
OP_BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")
BN_MODES = ("transductive", "per_step", "frozen")
MSL_WEIGHTS = ("uniform", "linear_increase", "learned")
COSINE_OVER = ("epochs", "budget")
ARCHS = ("conv4", "vit")
SHARDING = ("none", "fsdp")
AUTOCAST = ("none", "bf16")
LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")  # run.loggers (meta_kernels.loggers)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


FLOAT32_MAX = 3.4028234663852886e38  # a learning rate above it is inf in the weights' precision


def _require(cond: bool, cls: str, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{cls}.{field}: {msg}")


_ALLOWED = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string",
            "list[str]": "a list of strings", "tuple[float, float]": "a pair of finite numbers, e.g. [0.9, 0.999]"}
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")


def _kinds(field: dataclasses.Field) -> set[str]:
    """The annotation's type names: 'float | None' -> {'float', 'None'} (annotations are strings here)."""
    return {part.strip() for part in str(field.type).split("|")}


def _typed(cls: str, field: str, kinds: set[str], value):
    """`value` as the field's type, or a ConfigError naming the field, the value and what is allowed.
    Strict on purpose: a bool is not a number, 1.5 is not an integer, 'banana' is not a bool, and
    inf / NaN are refused (they only fail later, inside training). A string counts as a number only
    if it spells one of the right kind: PyYAML reads 1e-4 as the string '1e-4'."""
    if value is None and "None" in kinds:
        return None
    kind = next(k for k in ("bool", "int", "float", "str", "list[str]", "tuple[float, float]") if k in kinds)
    if kind == "tuple[float, float]" and isinstance(value, (list, tuple)) and len(value) == 2:
        pair = [_parse_number(v) if isinstance(v, str) else v for v in value]
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(_as_float(v)) for v in pair):
            return (float(pair[0]), float(pair[1]))
    if kind == "list[str]" and isinstance(value, str):  # a single name: run.loggers=csv
        value = [value]
    if kind == "list[str]" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind == "bool" and isinstance(value, bool) or kind == "str" and isinstance(value, str):
        return value
    if kind in ("int", "float") and not isinstance(value, bool):
        number = _parse_number(value) if isinstance(value, str) else value
        if kind == "int" and isinstance(number, float) and number.is_integer():  # 1e3, 2.0: a whole number
            number = int(number)
        if kind == "int" and isinstance(number, numbers.Integral):
            return int(number)
        if kind == "float" and isinstance(number, numbers.Real) and math.isfinite(_as_float(number)):
            return float(number)
    nullable = " or null" if "None" in kinds else ""
    raise ConfigError(f"{cls}.{field}: must be {_ALLOWED[kind]}{nullable}, got {value!r}")


def _parse_number(text: str):
    """'3' -> 3, '1e-4' -> 0.0001; anything else stays the string (and is refused)."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _as_float(number) -> float:
    try:
        return float(number)
    except OverflowError:  # an integer too large for a float
        return math.inf


def _check_types(config) -> None:
    """Convert or refuse every field of a config section, before its range checks run."""
    for field in dataclasses.fields(config):
        setattr(config, field.name, _typed(type(config).__name__, field.name, _kinds(field), getattr(config, field.name)))


def _one_line(exc: Exception) -> str:
    """A YAML / JSON parse error in one line (PyYAML's own message spans several)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(exc).split())
    context = f"{exc.context}: " if getattr(exc, "context", None) else ""
    return f"{context}{problem} at line {mark.line + 1}, column {mark.column + 1}"


def check_cli_count(flag: str, value: int | None, minimum: int = 1) -> int | None:
    """A count given on the command line (--max-steps, --episodes, --steps): unset (None) or an
    integer >= minimum. Checked when the arguments are parsed: 0 or a negative count would
    otherwise run nothing, fall back to a default, or divide by zero at the end of a run."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ConfigError(f"{flag}: must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass
class EpisodeConfig:
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    episodes_per_epoch: int = 600
    dataset: str = "omniglot"

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        for field in ("n_way", "k_shot", "q_query", "episodes_per_epoch"):
            value = getattr(self, field)
            _require(isinstance(value, int) and not isinstance(value, bool), name, field,
                     f"must be an integer, got {value!r}")
            _require(value >= 1, name, field, f"must be >= 1, got {value}")
        _require(self.n_way >= 2, name, "n_way", f"must be >= 2 for a classification episode, got {self.n_way}")
        _require(self.dataset in KNOWN_DATASETS, name, "dataset",
                 f"unknown dataset {self.dataset!r}; choose one of {', '.join(KNOWN_DATASETS)}")

    def replace(self, **changes) -> "EpisodeConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class DataConfig:
    """How image datasets are decoded (None: as the dataset gives). image_size: every image resized
    to this square size; channels: 1 (grayscale) or 3 (RGB); class_depth: for folder datasets
    (custom), the depth of the class folders under the root (2: root/alphabet/character/*.png,
    the class named 'alphabet/character')."""
    image_size: int | None = None
    channels: int | None = None
    class_depth: int = 1

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        _require(self.image_size is None or self.image_size >= 1, name, "image_size",
                 f"must be >= 1 or null (the dataset's size), got {self.image_size}")
        _require(self.channels in (None, 1, 3), name, "channels", f"must be 1, 3 or null, got {self.channels}")
        _require(self.class_depth >= 1, name, "class_depth", f"must be >= 1, got {self.class_depth}")


@dataclass
class MAMLConfig:
    """The inner loop and the outer update. `second_order` follows `algo` (MAML: True; FOMAML and
    Reptile: False); setting it against the algorithm is an error, never silently overridden."""
    algo: str = "maml"
    inner_steps: int = 5
    inner_lr: float = 0.01
    inner_clip: float | None = 10.0
    # The inner update: "sgd", "momentum" (torch.optim.SGD's heavy ball, inner_momentum) or "adam"
    # (torch.optim.Adam: inner_betas, inner_eps), with state per task, fused (ops.momentum_step,
    # ops.adam_step) and differentiable for second-order MAML. inner_lr (or LSLR's / Meta-SGD's
    # rates) scales the optimizer's step.
    inner_optimizer: str = "sgd"
    inner_momentum: float = 0.9
    inner_betas: tuple[float, float] = (0.9, 0.999)
    inner_eps: float = 1e-8
    # Where each task's inner optimizer state starts: "per_task" from zero (MAML differentiates
    # through it), or "carried" (Reptile only) from the mean of the previous outer step's final
    # states, step count included, as Nichol et al.'s Reptile keeps one Adam across all tasks.
    inner_state: str = "per_task"
    # Reptile: samples per inner step, each task's own, drawn without replacement from its examples
    # and cycling (Nichol et al. take 10 of a task's 50 per step); 0: all of them every step.
    inner_batch: int = 0
    second_order: bool | None = None
    backend: str = "auto"
    engine: str = "auto"
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"  # or "sgd"
    meta_batch_size: int = 4
    reptile_epsilon: float = 1.0
    reptile_decay_steps: int = 0  # linear decay of epsilon to 0 over this many outer steps (0: none)
    # Reptile's outer update: "interpolate" (theta += epsilon * (mean adapted - theta)), or
    # "meta_optimizer": theta - mean adapted is the gradient of the meta-optimizer (meta_optimizer,
    # meta_lr), the adaptive variant Nichol et al. 2018 suggest.
    reptile_update: str = "interpolate"
    task_chunk: int = 0  # tasks adapted together per chunk in a training step (0: the whole meta-batch)
    # Tasks per query pass in a MAML / FOMAML training step: each such pass is back-propagated to
    # the adapted weights and freed before the one backward through the inner loop (0: all at once).
    query_chunk: int = 8
    # MAML: keep only each inner step's starting weights and rebuild one step's second-order graph
    # at a time in the backward (memory of one step instead of all, for one more first-order pass).
    recompute_inner: bool = False
    skip_nonfinite_tasks: bool = False  # skip (and count) a task whose inner loss is NaN/inf instead of raising
    loss: str = "cross_entropy"  # or "mse" (regression, e.g. the sinusoid demo)
    # iMAML (algo="imaml", Rajeswaran et al. 2019): the inner loop minimises the task loss plus
    # imaml_lambda / 2 * |phi - theta|^2 without a graph; the meta-gradient solves
    # (I + H / (imaml_lambda + imaml_damping)) v = grad L_query(phi) with imaml_cg_steps of conjugate
    # gradient. The damping keeps that system positive definite: a conv net's support-set Hessian
    # has eigenvalues near -100 early on (1-shot Omniglot), far below -lambda, and undamped iMAML
    # does not learn there (bench/RESULTS.md). 22 is the official implementation's system,
    # 2 v + H v / (lambda + 10), at lambda = 2, up to its factor 2; 0 is the paper's exact formula.
    imaml_lambda: float = 2.0
    imaml_cg_steps: int = 5
    imaml_damping: float = 22.0

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        _require(self.algo in ALGORITHMS, name, "algo", f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        implied = self.algo == "maml"
        if self.second_order is None:
            self.second_order = implied
        _require(self.second_order == implied, name, "second_order",
                 f"{self.second_order} conflicts with algo={self.algo!r} (which is {'second' if implied else 'first'} order); "
                 "leave second_order unset or choose the matching algorithm")
        _require(isinstance(self.inner_steps, int) and self.inner_steps >= 1, name, "inner_steps",
                 f"must be an integer >= 1, got {self.inner_steps!r}")
        _require(0 < self.inner_lr <= FLOAT32_MAX, name, "inner_lr", f"must be > 0 and at most {FLOAT32_MAX:.3g} (it "
                 f"multiplies float32 weights), got {self.inner_lr}")
        _require(self.inner_clip is None or self.inner_clip > 0, name, "inner_clip",
                 f"must be > 0 or None (no clipping), got {self.inner_clip}")
        _require(self.inner_optimizer in INNER_OPTIMIZERS, name, "inner_optimizer",
                 f"unknown inner optimizer {self.inner_optimizer!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
        _require(0 <= self.inner_momentum < 1, name, "inner_momentum", f"must be in [0, 1), got {self.inner_momentum}")
        _require(all(0 <= b < 1 for b in self.inner_betas), name, "inner_betas",
                 f"must be two numbers in [0, 1) (beta1, beta2), got {list(self.inner_betas)}")
        _require(0 < self.inner_eps <= FLOAT32_MAX, name, "inner_eps", f"must be > 0, got {self.inner_eps}")
        _require(self.inner_batch >= 0, name, "inner_batch", f"must be >= 0 (0: every example each step), got "
                 f"{self.inner_batch}")
        _require(self.inner_batch == 0 or self.algo == "reptile", name, "inner_batch",
                 f"draws each inner step's samples, for Reptile (no graph through the inner loop); algo={self.algo!r} "
                 "adapts on the whole support set: use 0")
        _require(self.inner_state in INNER_STATES, name, "inner_state",
                 f"must be one of {', '.join(INNER_STATES)}, got {self.inner_state!r}")
        _require(self.inner_state == "per_task" or (self.algo == "reptile" and self.inner_optimizer != "sgd"), name,
                 "inner_state", f"'carried' keeps an inner optimizer's state from one outer step to the next, for "
                 f"Reptile with inner_optimizer='momentum' or 'adam' (here algo={self.algo!r}, inner_optimizer="
                 f"{self.inner_optimizer!r}); MAML-style algorithms start every task's state from zero: use 'per_task'")
        _require(self.backend in OP_BACKENDS, name, "backend", f"unknown backend {self.backend!r}; choose one of {', '.join(OP_BACKENDS)}")
        _require(self.engine in ENGINES, name, "engine", f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        _require(0 < self.meta_lr <= FLOAT32_MAX, name, "meta_lr", f"must be > 0 and at most {FLOAT32_MAX:.3g} (it "
                 f"multiplies float32 weights), got {self.meta_lr}")
        _require(self.meta_optimizer in ("adam", "sgd"), name, "meta_optimizer",
                 f"must be 'adam' or 'sgd', got {self.meta_optimizer!r}")
        _require(self.meta_batch_size >= 1, name, "meta_batch_size", f"must be >= 1, got {self.meta_batch_size}")
        _require(0 < self.reptile_epsilon <= 1, name, "reptile_epsilon", f"must be in (0, 1], got {self.reptile_epsilon}")
        _require(self.reptile_decay_steps >= 0, name, "reptile_decay_steps", f"must be >= 0, got {self.reptile_decay_steps}")
        _require(self.reptile_update in REPTILE_UPDATES, name, "reptile_update",
                 f"must be one of {', '.join(REPTILE_UPDATES)}, got {self.reptile_update!r}")
        _require(self.reptile_update == "interpolate" or (self.algo == "reptile" and self.reptile_decay_steps == 0),
                 name, "reptile_update", f"'meta_optimizer' is Reptile's outer update (algo={self.algo!r}) and steps "
                 "with meta_lr, not epsilon: leave reptile_decay_steps at 0 (mamlpp.cosine_meta_lr decays meta_lr)")
        _require(self.task_chunk >= 0, name, "task_chunk", f"must be >= 0, got {self.task_chunk}")
        _require(self.query_chunk >= 0, name, "query_chunk", f"must be >= 0, got {self.query_chunk}")
        _require(not self.recompute_inner or self.algo == "maml", name, "recompute_inner",
                 f"rebuilds MAML's second-order graph; {self.algo} keeps none: leave it False")
        _require(not self.recompute_inner or self.inner_optimizer == "sgd", name, "recompute_inner",
                 f"rebuilds each step from its starting weights alone, which inner_optimizer="
                 f"{self.inner_optimizer!r} (with state) does not allow: use inner_optimizer='sgd', or iMAML "
                 "(algo='imaml') for memory that does not grow with the inner steps")
        _require(self.loss in ("cross_entropy", "mse"), name, "loss", f"must be 'cross_entropy' or 'mse', got {self.loss!r}")
        _require(0 < self.imaml_lambda <= FLOAT32_MAX, name, "imaml_lambda",
                 f"must be > 0 (the proximal term's weight), got {self.imaml_lambda}")
        _require(self.imaml_cg_steps >= 1, name, "imaml_cg_steps", f"must be >= 1, got {self.imaml_cg_steps}")
        _require(0 <= self.imaml_damping <= FLOAT32_MAX, name, "imaml_damping",
                 f"must be >= 0 (0: the exact implicit gradient), got {self.imaml_damping}")

    @property
    def first_order(self) -> bool:
        return not self.second_order

    def replace(self, **changes) -> "MAMLConfig":
        if "algo" in changes and "second_order" not in changes:
            changes["second_order"] = None
        return dataclasses.replace(self, **changes)


@dataclass
class MAMLPlusPlusConfig:
    """MAML++ (Antoniou et al. 2019): learned per-layer-per-step inner rates (LSLR, clamped to
    [1e-6, 1]), multi-step loss (MSL) with uniform (and the paper's schedule over
    msl_decay_epochs, the last step's loss alone after them), linearly increasing or learned
    weights, derivative-order annealing (first order before annealing_start_epoch), and the
    BatchNorm mode of the inner loop."""
    use_lslr: bool = False
    # The meta learning rate of the LSLR table (None: maml.meta_lr, one group with the weights);
    # its initial value is maml.inner_lr.
    lslr_meta_lr: float | None = None
    use_msl: bool = False
    msl_weights: str = "uniform"
    use_annealing: bool = False
    annealing_start_epoch: int = 0
    bn_mode: str = "per_step"  # MAML only: FOMAML and Reptile cannot train it (bn_mode_error)
    msl_decay_epochs: int = 10
    cosine_meta_lr: bool = False  # cosine annealing of the outer learning rate over the run
    # What the cosine schedule spans: the run's epochs (steps, reproducible), or run.max_minutes of
    # training time, so that it ends with the budget whatever the machine's speed.
    cosine_over: str = "epochs"

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        _require(self.msl_weights in MSL_WEIGHTS, name, "msl_weights",
                 f"unknown weighting {self.msl_weights!r}; choose one of {', '.join(MSL_WEIGHTS)}")
        _require(self.cosine_over in COSINE_OVER, name, "cosine_over",
                 f"unknown value {self.cosine_over!r}; choose one of {', '.join(COSINE_OVER)}")
        _require(self.bn_mode in BN_MODES, name, "bn_mode", f"unknown bn_mode {self.bn_mode!r}; choose one of {', '.join(BN_MODES)}")
        _require(isinstance(self.annealing_start_epoch, int) and self.annealing_start_epoch >= 0, name,
                 "annealing_start_epoch", f"must be an integer >= 0, got {self.annealing_start_epoch!r}")
        _require(self.msl_decay_epochs >= 1, name, "msl_decay_epochs", f"must be >= 1, got {self.msl_decay_epochs}")
        _require(self.lslr_meta_lr is None or (self.use_lslr and 0 < self.lslr_meta_lr <= FLOAT32_MAX), name,
                 "lslr_meta_lr", f"is the LSLR table's meta learning rate: a number > 0 with use_lslr=true, got "
                 f"{self.lslr_meta_lr} (use_lslr={self.use_lslr})")


def bn_mode_error(bn_mode: str, maml: MAMLConfig) -> str | None:
    """Why `bn_mode` cannot train under `maml`'s algorithm, or None. Per-step BN's rows for the inner
    steps reach the query loss only through the inner updates, so a first-order meta-gradient never
    trains them: they would stay at their initial values while the query's row learns."""
    if bn_mode == "per_step" and maml.first_order:
        return (f"'per_step' learns a BatchNorm row per inner step through the second-order meta-gradient; under "
                f"{maml.algo} (first order) the inner steps' rows get no meta-gradient and stay untrained. Use "
                "bn_mode 'transductive' (or 'frozen'), or algo 'maml'")
    return None


@dataclass
class MetaCheckpointConfig:
    save_inner_lrs: bool = True
    save_msl_weights: bool = True
    save_rng_state: bool = True
    save_sampler_config: bool = True
    keep_last: int = 3
    every_steps: int = 100

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        _require(self.keep_last >= 1, name, "keep_last", f"must be >= 1, got {self.keep_last}")
        _require(self.every_steps >= 1, name, "every_steps", f"must be >= 1, got {self.every_steps}")


@dataclass
class ModelConfig:
    """The network: Conv4 (`filters` per layer), a ViT (`dim`, `depth`, `heads`, `patch_size`,
    `mlp_ratio`: the backbone of the production presets), or the user's own model: `factory`
    names a function 'package.module:function' called as function(n_way, image_shape) that
    returns an nn.Module (it then replaces `arch`; resume rebuilds the model from it)."""
    arch: str = "conv4"
    factory: str | None = None
    filters: int = 64
    dim: int = 192
    depth: int = 6
    heads: int = 3
    patch_size: int = 7
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        _require(self.arch in ARCHS, name, "arch", f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for field in ("filters", "dim", "depth", "heads", "patch_size", "mlp_ratio"):
            _require(getattr(self, field) >= 1, name, field, f"must be >= 1, got {getattr(self, field)}")
        _require(self.dim % self.heads == 0, name, "heads", f"dim {self.dim} must be divisible by heads {self.heads}")
        if self.factory is not None:
            module, _, attr = str(self.factory).partition(":")
            _require(isinstance(self.factory, str) and module and attr and " " not in self.factory, name, "factory",
                     f"must be 'package.module:function', got {self.factory!r}")


@dataclass
class RunConfig:
    """Everything about a run that is not the algorithm or the episodes."""
    seed: int = 0
    epochs: int = 1
    # Wall-clock budget of one fit() call, validations included: training stops at the first step
    # boundary past it (and saves that step), even before `epochs` end. None: no budget.
    max_minutes: float | None = None
    data_root: str | None = None  # None: $META_KERNELS_DATA/<dataset>
    omniglot_variant: str = "small"  # 'full' (background/evaluation zips) or 'small' (the two small zips)
    # 'default': background / evaluation alphabets (full), seeded by character (small); 'vinyals':
    # the papers' 1200 / 423-character split of the full set (meta_kernels.data.omniglot).
    omniglot_split: str = "default"
    val_every: int = 50  # outer steps between validations
    val_episodes: int = 100
    test_episodes: int = 600
    num_threads: int = 0  # 0: torch's default
    device: str = "cpu"
    dist_timeout_s: int = 120  # a rank waiting longer than this on its peers fails instead of hanging
    # 'none': every rank holds the whole model and adapts its share of the meta-batch;
    # 'fsdp': parameters sharded across ranks, all ranks adapt each task together (first order only).
    sharding: str = "none"
    autocast: str = "none"  # 'bf16': outer (query) passes under bf16 autocast; the inner loop stays fp32
    # On the CPU, let glibc reuse the memory of large freed tensors (meta_kernels.malloc_tuning): a
    # faster step; the process keeps its peak memory. Process-wide, so opt-in: null (unset) is off
    # in a Trainer a library user embeds and on in `meta-kernels train`; true / false decide for both.
    keep_freed_cpu_memory: bool | None = None
    # Where a run's records go (meta_kernels.loggers): any of LOGGERS; [] for none.
    loggers: list[str] = dataclasses.field(default_factory=lambda: ["jsonl"])
    # Also log each inner step's support loss, accuracy, gradient norm, ... with every train step.
    log_inner_steps: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        name = type(self).__name__
        for field in ("epochs", "val_every", "val_episodes", "test_episodes"):
            _require(getattr(self, field) >= 1, name, field, f"must be >= 1, got {getattr(self, field)}")
        _require(self.seed >= 0, name, "seed", f"must be >= 0, got {self.seed}")
        _require(self.max_minutes is None or (math.isfinite(self.max_minutes) and self.max_minutes > 0), name,
                 "max_minutes", f"must be > 0 (minutes) or null for no budget, got {self.max_minutes}")
        _require(self.omniglot_variant in ("full", "small"), name, "omniglot_variant",
                 f"must be 'full' or 'small', got {self.omniglot_variant!r}")
        _require(self.omniglot_split in ("default", "vinyals"), name, "omniglot_split",
                 f"must be 'default' or 'vinyals', got {self.omniglot_split!r}")
        _require(self.omniglot_split == "default" or self.omniglot_variant == "full", name, "omniglot_split",
                 "'vinyals' splits the 1623 characters of the full set: set run.omniglot_variant=full")
        _require(self.num_threads >= 0, name, "num_threads", f"must be >= 0, got {self.num_threads}")
        _require(self.dist_timeout_s >= 1, name, "dist_timeout_s", f"must be >= 1, got {self.dist_timeout_s}")
        _require(self.sharding in SHARDING, name, "sharding", f"must be one of {', '.join(SHARDING)}, got {self.sharding!r}")
        _require(self.autocast in AUTOCAST, name, "autocast", f"must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}")
        unknown = [n for n in self.loggers if n not in LOGGERS]
        _require(not unknown, name, "loggers", f"unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)}")
        _require(len(set(self.loggers)) == len(self.loggers), name, "loggers", f"lists a logger twice: {self.loggers}")
        _require(re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device) is not None, name, "device",
                 f"unknown device {self.device!r}; use cpu or cuda[:N] (cuda, cuda:0, cuda:1, ...)")


SECTIONS = {"maml": MAMLConfig, "mamlpp": MAMLPlusPlusConfig, "episodes": EpisodeConfig, "data": DataConfig,
            "checkpoint": MetaCheckpointConfig, "model": ModelConfig, "run": RunConfig}
_FIELDS = {section: {f.name: f for f in dataclasses.fields(klass)} for section, klass in SECTIONS.items()}


# The accuracy presets (issue 19): 30 minutes of training on a 2-core CPU with the Omniglot
# "background small" sets, tested on held-out characters (bench/accuracy_runs.py, bench/RESULTS.md).
OMNIGLOT_SMALL_BASE = ("episodes.dataset=omniglot", "run.omniglot_variant=small", "episodes.k_shot=1",
                       "episodes.q_query=5", "maml.engine=custom", "maml.inner_clip=null", "maml.meta_lr=0.001",
                       "model.filters=64", "mamlpp.bn_mode=transductive", "run.max_minutes=30", "run.val_every=100",
                       "run.val_episodes=200", "run.test_episodes=600", "checkpoint.every_steps=500")
# Each has a 30-minute budget. Where a schedule follows the epochs or steps (the multi-step loss
# and cosine meta-lr, Reptile's decay) the epochs are sized to end near the budget on the 2-core
# CPU, so that it completes; the 5-way MAML preset's 2000 steps outlast the budget on the slower
# VMs measured and end at 24.5 minutes on the fastest; the MAML++ presets have more epochs than fit.
# Per-step BatchNorm (MAML++'s largest gain, bench/RESULTS.md) is the BN mode of the MAML presets;
# FOMAML and Reptile cannot train it (bn_mode_error) and keep the base's transductive BN.
# The MAML++ presets run the multi-step loss (a query pass per inner step, 1.7x a plain step) in a
# short first epoch only, then the plain steps of the rest fill the budget. They keep the meta-lr
# constant: 30 minutes leave Conv4 far from converged, and a cosine decay stalled the 5-way run at
# 97.53 while MAML's constant rate kept climbing (issue 32's ablation, bench/RESULTS.md).
_MAMLPP = ("mamlpp.use_lslr=true", "mamlpp.use_msl=true", "mamlpp.msl_decay_epochs=1")
_5W = ("episodes.n_way=5", "maml.meta_batch_size=16", "run.epochs=4")
_20W = ("episodes.n_way=20", "maml.meta_batch_size=8", "run.epochs=4", "mamlpp.bn_mode=per_step",
        "maml.algo=maml", "maml.inner_steps=3", "maml.inner_lr=0.2")
OMNIGLOT_SMALL_PRESETS = {
    "omniglot_5w1s": (*_5W, "maml.algo=maml", "maml.inner_steps=3", "maml.inner_lr=0.4", "mamlpp.bn_mode=per_step",
                      "episodes.episodes_per_epoch=8000"),
    "omniglot_5w1s_mamlpp": (*_5W, "maml.algo=maml", "maml.inner_steps=3", "maml.inner_lr=0.4",
                             "mamlpp.bn_mode=per_step", *_MAMLPP, "episodes.episodes_per_epoch=1600",
                             "run.epochs=40"),
    # FOMAML: one step of lr 0.1 already reaches the adapted accuracy, so 2 inner steps (cheaper
    # outer steps) and a cosine schedule over the 3200 steps that fit in the budget.
    "omniglot_5w1s_fomaml": (*_5W, "maml.algo=fomaml", "maml.inner_steps=2", "maml.inner_lr=0.1",
                             "mamlpp.cosine_meta_lr=true", "episodes.episodes_per_epoch=12800"),
    # Reptile as Nichol et al.: Adam inside (beta1 0, lr 3e-3 from 3-minute trials), one Adam across
    # tasks (its state carried), 10 train shots a class (support + query: 1 + 9) taken 10 images an
    # inner step. Epsilon decays over the ~4000 steps that fit (bench/RESULTS.md).
    "omniglot_5w1s_reptile": (*_5W, "maml.algo=reptile", "maml.inner_steps=5", "maml.inner_optimizer=adam",
                              "maml.inner_betas=[0,0.999]", "maml.inner_lr=0.003", "maml.inner_state=carried",
                              "maml.inner_batch=10", "episodes.q_query=9", "maml.reptile_decay_steps=4000",
                              "episodes.episodes_per_epoch=16000"),
    # iMAML: a proximal inner loop of 5 first-order steps (lambda 2, as the paper's Omniglot runs) and
    # 5 CG steps for the implicit meta-gradient; the budget ends the run.
    "omniglot_5w1s_imaml": (*_5W, "maml.algo=imaml", "maml.inner_steps=5", "maml.inner_lr=0.1",
                            "maml.imaml_lambda=2.0", "maml.imaml_cg_steps=5", "mamlpp.bn_mode=transductive",
                            "mamlpp.cosine_meta_lr=true", "episodes.episodes_per_epoch=8000"),
    "omniglot_20w1s": (*_20W, "episodes.episodes_per_epoch=1600"),
    "omniglot_20w1s_mamlpp": (*_20W, *_MAMLPP, "episodes.episodes_per_epoch=400", "run.epochs=40"),
}


@dataclass
class MetaLearningFullConfig:
    maml: MAMLConfig = dataclasses.field(default_factory=MAMLConfig)
    mamlpp: MAMLPlusPlusConfig = dataclasses.field(default_factory=MAMLPlusPlusConfig)
    episodes: EpisodeConfig = dataclasses.field(default_factory=EpisodeConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: MetaCheckpointConfig = dataclasses.field(default_factory=MetaCheckpointConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """Checks across sections: combinations the trainer cannot run."""
        name = type(self).__name__
        if self.model.arch == "vit":
            _require(self.mamlpp.bn_mode == "transductive", name, "mamlpp.bn_mode",
                     f"{self.mamlpp.bn_mode!r} needs a model with BatchNorm (conv4); set mamlpp.bn_mode=transductive "
                     "for the ViT (it has LayerNorm, with no statistics to keep)")
        if self.run.sharding == "fsdp":
            _require(self.model.arch == "vit", name, "run.sharding",
                     "'fsdp' needs model.arch=vit: Conv4's BatchNorm would see only each rank's slice of a task")
            _require(self.maml.algo in ("fomaml", "reptile"), name, "run.sharding",
                     f"'fsdp' supports first-order algorithms (fomaml, reptile), not {self.maml.algo!r}")
            p = self.mamlpp
            _require(not (p.use_lslr or p.use_msl or p.use_annealing), name, "run.sharding",
                     "'fsdp' does not support the MAML++ options use_lslr / use_msl / use_annealing; switch them off")
            _require(not self.run.log_inner_steps, name, "run.log_inner_steps",
                     "is not supported with run.sharding=fsdp; set it to false")
        bn_problem = bn_mode_error(self.mamlpp.bn_mode, self.maml)
        _require(bn_problem is None, name, "mamlpp.bn_mode", bn_problem or "")
        if self.mamlpp.cosine_meta_lr and self.mamlpp.cosine_over == "budget":
            _require(self.run.max_minutes is not None, name, "mamlpp.cosine_over",
                     "'budget' spans run.max_minutes, which is unset; set run.max_minutes or cosine_over=epochs")
        _require(self.data.class_depth == 1 or self.episodes.dataset == "custom", name, "data.class_depth",
                 f"nested class folders are for folder datasets (episodes.dataset=custom), not "
                 f"{self.episodes.dataset!r}; leave data.class_depth=1")
        if self.run.autocast != "none":
            _require(self.run.sharding == "fsdp", name, "run.autocast",
                     "bf16 autocast of the outer passes is built for run.sharding=fsdp; set run.autocast=none")

    # ---- presets -----------------------------------------------------------------------------
    @classmethod
    def minimal(cls) -> "MetaLearningFullConfig":
        """Seconds on a CPU: a smoke test of the whole pipeline."""
        return cls(maml=MAMLConfig(inner_steps=1, inner_lr=0.4, meta_batch_size=2, engine="custom"),
                   episodes=EpisodeConfig(n_way=5, k_shot=1, q_query=5, episodes_per_epoch=8),
                   checkpoint=MetaCheckpointConfig(every_steps=2), model=ModelConfig(filters=16),
                   run=RunConfig(val_every=2, val_episodes=10, test_episodes=20))

    @classmethod
    def dev(cls) -> "MetaLearningFullConfig":
        """CPU dev mode: Conv4, 50 episodes, 3 inner steps, one epoch (`meta-kernels validate` trains it)."""
        return cls(maml=MAMLConfig(inner_steps=3, inner_lr=0.4, meta_batch_size=5, engine="custom"),
                   episodes=EpisodeConfig(n_way=5, k_shot=1, q_query=5, episodes_per_epoch=50),
                   checkpoint=MetaCheckpointConfig(every_steps=5), model=ModelConfig(filters=64),
                   run=RunConfig(val_every=5, val_episodes=20, test_episodes=100))

    @classmethod
    def _production(cls, dim: int, depth: int, heads: int) -> "MetaLearningFullConfig":
        """FOMAML of a ViT on mini-ImageNet 5-way 5-shot across a GPU cluster (torchrun): parameters
        sharded with FSDP, bf16 autocast outside the fp32 inner loop. README: memory per GPU."""
        return cls(maml=MAMLConfig(algo="fomaml", inner_steps=5, inner_lr=0.01, inner_clip=1.0, meta_lr=1e-4,
                                   meta_batch_size=16, engine="custom"),
                   mamlpp=MAMLPlusPlusConfig(bn_mode="transductive"),
                   episodes=EpisodeConfig(n_way=5, k_shot=5, q_query=15, episodes_per_epoch=16_000,
                                          dataset="mini_imagenet"),
                   checkpoint=MetaCheckpointConfig(every_steps=100, keep_last=2),
                   model=ModelConfig(arch="vit", dim=dim, depth=depth, heads=heads, patch_size=14, mlp_ratio=4),
                   run=RunConfig(epochs=10, device="cuda", sharding="fsdp", autocast="bf16", val_every=500,
                                 val_episodes=200, dist_timeout_s=1800))

    @classmethod
    def production_1b(cls) -> "MetaLearningFullConfig":
        return cls._production(dim=2048, depth=20, heads=16)

    @classmethod
    def production_3b(cls) -> "MetaLearningFullConfig":
        return cls._production(dim=2560, depth=38, heads=20)

    @classmethod
    def production_7b(cls) -> "MetaLearningFullConfig":
        return cls._production(dim=4096, depth=35, heads=32)

    PRESETS = ("minimal", "dev", "production_1b", "production_3b", "production_7b", *OMNIGLOT_SMALL_PRESETS)

    @classmethod
    def preset(cls, name: str) -> "MetaLearningFullConfig":
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        if name in OMNIGLOT_SMALL_PRESETS:
            return cls().with_overrides([*OMNIGLOT_SMALL_BASE, *OMNIGLOT_SMALL_PRESETS[name]])
        return getattr(cls, name)()

    # ---- files and overrides -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MetaLearningFullConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping of sections ({', '.join(SECTIONS)}), got {data!r}")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown, key=str)}; sections are {', '.join(SECTIONS)}")
        for section, values in data.items():  # `maml: 3` would otherwise fail as a TypeError inside dict()
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping of key: value, got {values!r}")
        if "model_filters" in (data.get("run") or {}):  # configs written before the model section existed
            data = {**data, "run": dict(data["run"]), "model": dict(data.get("model") or {})}
            data["model"].setdefault("filters", data["run"].pop("model_filters"))
        built = {}
        for section, klass in SECTIONS.items():
            values = dict(data.get(section) or {})  # an empty YAML section reads as null
            fields = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - fields
            if bad:
                raise ConfigError(f"unknown key(s) {sorted(bad, key=str)} in section {section!r}; known: {', '.join(sorted(fields))}")
            built[section] = klass(**values)
        return cls(**built)

    def save(self, path) -> None:
        import json
        from pathlib import Path
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else _yaml().safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)

    @classmethod
    def load(cls, path) -> "MetaLearningFullConfig":
        import json
        from pathlib import Path
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else _yaml().safe_load(text)
        except (ValueError, _yaml().YAMLError) as exc:  # JSON and decoding errors are ValueErrors
            raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{_one_line(exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        return cls.from_dict(data)

    def with_overrides(self, overrides: list[str]) -> "MetaLearningFullConfig":
        """Apply 'section.key=value' overrides (values parsed as YAML: 0.4, true, null, 'text')."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, field = key.partition(".")
            if not sep or not dot:
                raise ConfigError(f"override {item!r} must look like section.key=value (e.g. maml.inner_lr=0.4)")
            if section not in data:
                raise ConfigError(f"unknown config section {section!r} in override {item!r}; sections are {', '.join(SECTIONS)}")
            if field not in data[section]:
                raise ConfigError(f"unknown key {field!r} in section {section!r}; known: {', '.join(sorted(data[section]))}")
            try:
                value = _yaml().safe_load(raw)
            except _yaml().YAMLError as exc:
                raise ConfigError(f"override {item!r}: the value is not valid YAML: {_one_line(exc)}") from None
            if "str" in _kinds(_FIELDS[section][field]) and not isinstance(value, str) and value is not None:
                value = raw  # a text field keeps the text as written: run.data_root=2024 is the folder '2024'
            data[section][field] = value
        if "algo" in {o.partition("=")[0].partition(".")[2] for o in overrides} and not any(
                o.startswith("maml.second_order=") for o in overrides):
            data["maml"]["second_order"] = None  # follows the new algorithm
        return MetaLearningFullConfig.from_dict(data)


def _yaml():
    import yaml
    return yaml
