"""The `meta-kernels` command line."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    import meta_kernels as mk
    print(json.dumps(mk.backend_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from meta_kernels.demo import run_demo
    s = run_demo(args.out, outer_steps=args.steps, meta_batch_size=args.meta_batch, seed=args.seed)
    b, a = s["heldout_mse_by_inner_step_before_meta_training"], s["heldout_mse_by_inner_step_after_meta_training"]
    print(f"sinusoid MAML: {s['outer_steps']} outer steps x {s['meta_batch_size']} tasks in {s['train_seconds']} s")
    print(f"held-out query MSE (100 tasks, {s['k_shot']}-shot):")
    print(f"  before meta-training: {b[0]:.3f} -> {b[1]:.3f} after 1 step -> {b[10]:.3f} after 10 steps")
    print(f"  after  meta-training: {a[0]:.3f} -> {a[1]:.3f} after 1 step -> {a[10]:.3f} after 10 steps")
    print(f"wrote {args.out}/metrics.json, metrics.jsonl and sinusoid.png")
    return 0


def _load_config(args):
    from meta_kernels.config import ConfigError, MetaLearningFullConfig
    if args.config and args.preset:
        raise ConfigError(f"--config {args.config} and --preset {args.preset} exclude each other: the config file is the "
                          "starting config; pass one of them (and --set for changes)")
    config = MetaLearningFullConfig.load(args.config) if args.config else MetaLearningFullConfig.preset(
        args.preset or args.default_preset)
    overrides = list(args.set or [])
    if args.data_root:
        overrides.append(f"run.data_root={args.data_root}")
    if getattr(args, "model", None):
        overrides.append(f"model.factory={args.model}")
    return config.with_overrides(overrides) if overrides else config


def _cmd_train(args) -> int:
    from meta_kernels.train import Trainer
    import os
    config = _load_config(args)
    if args.resume and config.model.factory is not None and args.model is None:
        raise ValueError(f"--resume: the config names the model factory {config.model.factory!r} but the command line "
                         "does not; a resumed run imports a factory only when --model names it (its config file may "
                         f"come with the run folder): pass --model {config.model.factory}")
    if config.run.keep_freed_cpu_memory is None:  # unset: on for the command (a library Trainer leaves it off)
        config = config.with_overrides(["run.keep_freed_cpu_memory=true"])
    # After a torchrun restart (--max-restarts), continue from the last checkpoint when there is one.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    ckpts = Path(args.out) / "checkpoints"
    resume = args.resume or (restarted and (any(ckpts.glob("*.pt")) or any(ckpts.glob("step-*.dcp"))))
    preempt = None if args.preempt_signal == "none" else signal.Signals["SIG" + args.preempt_signal.upper()]
    trainer = Trainer(config, args.out, resume=resume, overwrite=args.overwrite, progress=not args.no_progress,
                      preempt_signal=preempt)
    if trainer.rank == 0:
        config.save(trainer.out / "config.yaml")
    try:
        return _fit_and_test(trainer, args)
    finally:
        trainer.close()  # the loggers: TensorBoard's writer, the W&B run


def _fit_and_test(trainer, args) -> int:
    from meta_kernels.train import TrainingInterrupted, evaluate_checkpoint
    try:
        summary = trainer.fit(max_steps=args.max_steps)
    except TrainingInterrupted as stopped:
        print(f"meta-kernels train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    print(json.dumps(summary, indent=2))
    best = trainer.checkpoint_path("best.pt")  # best.dcp/ for a sharded run
    if args.test and trainer.rank == 0 and not best.exists():
        print(f"meta-kernels train: --test: no {best} (no validation ran: see run.val_every); not evaluated",
              file=sys.stderr)
    elif args.test and trainer.rank == 0:  # the result goes to the run's loggers too, as a 'test' record
        result = evaluate_checkpoint(best, trainer.out / "test", split="test", loggers=trainer.loggers,
                                     factory=trainer.config.model.factory)  # named by --model already
        print(f"test: {result['accuracy']:.4f} +- {result['ci95']:.4f} over {result['episodes']} episodes; "
              f"adaptation curve {[round(a, 3) for a in result['curve_accuracy']]}")
    return 0


def _cmd_eval(args) -> int:
    from meta_kernels.train import evaluate_checkpoint
    result = evaluate_checkpoint(args.checkpoint, args.out, episodes=args.episodes, split=args.split,
                                 inner_steps=args.inner_steps, q_query=args.query, factory=args.model)
    p = result["protocol"]
    print(f"{result['split']}: {p['n_way']}-way {p['k_shot']}-shot, {p['q_query']} query, {p['inner_steps']} inner "
          f"steps: accuracy {result['accuracy']:.4f} +- {result['ci95']:.4f} (95% CI) over "
          f"{result['episodes']} episodes; AUAC {result['auac']:.4f}; curve "
          f"{[round(a, 3) for a in result['curve_accuracy']]}; wrote {args.out}/eval.json and adaptation_curve.png")
    return 0


def _cmd_memory(args) -> int:
    from meta_kernels.fsdp_memory import sharded_memory_per_gpu
    config = _load_config(args)
    for gpus in args.gpus:
        p = sharded_memory_per_gpu(config, gpus)
        print(f"{gpus} GPU(s), {p['parameters'] / 1e9:.2f} B parameters: " + ", ".join(
            f"{k} {v / 1e9:.2f} GB" for k, v in p.items() if k != "parameters"))
    return 0


def _cmd_validate(args) -> int:
    from meta_kernels.selfcheck import run_selfcheck
    return run_selfcheck()


def build_parser() -> argparse.ArgumentParser:
    from meta_kernels.config import MetaLearningFullConfig
    parser = argparse.ArgumentParser(prog="meta-kernels", description="Meta-learning on fused inner-loop kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what was built and which backend runs where")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="meta-train sinusoid regression (no download, about a minute on a CPU)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--steps", type=int, default=4000, help="outer steps (default 4000)")
    demo.add_argument("--meta-batch", type=int, default=25, help="tasks per outer step (default 25)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train", help="meta-train on Omniglot, mini-ImageNet or a class-folder dataset")
    train.add_argument("--preset", help=f"starting config: one of {', '.join(MetaLearningFullConfig.PRESETS)} "
                       "(default dev; omniglot_*: the 30-minute CPU accuracy presets, README)")
    train.add_argument("--config", help="a YAML/JSON config file (instead of --preset)")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
    train.add_argument("--data-root", help="dataset folder (default $META_KERNELS_DATA/<dataset>)")
    train.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                       help="your own model: FACTORY(n_way, image_shape) returns an nn.Module (sets model.factory)")
    train.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT's newest intact checkpoint (last.pt, else the newest step-*.pt; "
                            "a sharded run's newest intact step-*.dcp folder)")
    train.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    train.add_argument("--max-steps", type=int, help="stop at this global step (counting the steps before a resume) "
                       "and save it")
    train.add_argument("--preempt-signal", default="usr1", choices=("usr1", "usr2", "hup", "none"),
                       help="besides SIGTERM and SIGINT, the signal that saves the current step and stops "
                            "(default usr1, as SLURM sends); exit code 128 + the signal's number")
    train.add_argument("--test", action="store_true", help="evaluate the best checkpoint on the test split at the end")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train, default_preset="dev")

    ev = sub.add_parser("eval", help="evaluate a checkpoint: accuracy +- 95%% CI, adaptation curve, AUAC")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint file, or a sharded run's step-N.dcp folder")
    ev.add_argument("--episodes", type=int, help="episodes (default: the config's test_episodes, 600)")
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--inner-steps", type=int, help="test-time inner steps (default: the run's; MAML's "
                    "papers test Omniglot with 3, mini-ImageNet with 10)")
    ev.add_argument("--query", type=int, help="query images per class at test (default: the run's q_query)")
    ev.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY",
                    help="the model factory of a run on your own model: must equal the checkpoint's (a checkpoint "
                         "never makes eval import code by itself)")
    ev.add_argument("--out", default="runs/eval")
    ev.set_defaults(func=_cmd_eval)

    mem = sub.add_parser("memory", help="memory per GPU of a sharded (FSDP) ViT config, computed by component")
    mem.add_argument("--preset", help="a preset (default production_1b)")
    mem.add_argument("--config", help="a YAML/JSON config file (instead of --preset)")
    mem.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config field")
    mem.add_argument("--gpus", type=int, nargs="+", default=[8], help="numbers of GPUs (default 8)")
    mem.set_defaults(func=_cmd_memory, data_root=None, default_preset="production_1b")

    val = sub.add_parser("validate", help="op self-checks, a hand-computed meta-gradient, one CPU dev-mode epoch (about a minute)")
    val.set_defaults(func=_cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from meta_kernels import _startup
    interrupted = _startup.take_over()  # a Ctrl-C from now on raises KeyboardInterrupt (handled below)
    try:
        return _main(argv, interrupted)
    finally:
        _startup.hand_back()


def _main(argv: list[str] | None, interrupted: int | None) -> int:
    args = build_parser().parse_args(argv)
    if interrupted is not None:  # it came while the imports ran: nothing has started, nothing was saved
        print(f"meta-kernels {args.command}: interrupted by {signal.Signals(interrupted).name} during start-up, before "
              "anything ran; nothing was written", file=sys.stderr)
        return 128 + interrupted
    try:
        from meta_kernels.config import ConfigError, check_cli_count  # counts < 1 would run nothing or divide by zero
        if getattr(args, "out", None) is not None and not str(args.out).strip():
            raise ConfigError("--out: an empty path; name the output folder (e.g. --out runs/train): an empty one "
                              "would write into the current directory")
        for flag in ("max_steps", "episodes", "steps", "meta_batch", "inner_steps", "query"):  # train / eval / demo
            check_cli_count("--" + flag.replace("_", "-"), getattr(args, flag, None))
        for gpus in getattr(args, "gpus", None) or []:  # memory --gpus
            check_cli_count("--gpus", gpus)
        check_cli_count("--seed", getattr(args, "seed", None), minimum=0)  # demo: numpy seeds are >= 0
        return args.func(args)
    except (ValueError, OSError, FloatingPointError, RuntimeError, ImportError) as exc:  # ImportError: a logger's package
        print(f"meta-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while train saves, or Ctrl-C elsewhere
        print(f"meta-kernels {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
