"""`fit(config) -> TrainState` and `evaluate(config)`: the layers below, assembled.

Start priority (big_vision's): the workdir's own checkpoint, then `--resume PATH`, then
`--weights`, then random initialisation. The data stream is a pure function of
(seed, step), so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsft import checkpoint, data, imprint, metrics, optim, recipes, steps
from jaxsft import config as config_lib
from jaxsft import workdir as workdir_lib
from jaxsft.config import Config, ConfigError
from jaxsft.models import ARCHITECTURES, create_model
from jaxsft.periodic import is_time
from jaxsft.preemption import StopRequest
from jaxsft.state import TrainState, ema_state
from jaxsft.weights import load_weights
from jaxsft.workdir import CHECKPOINT_DIR, METRICS_FILE, PLOT_FILE, SUMMARY_FILE


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved. Rerun the same command to resume."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"{signal_name} at step {step}: checkpoint saved; rerun the same "
                         "command to resume")
        self.signal_name, self.step = signal_name, step


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a config means once the data set and devices are known: sizes, lengths, cadences
    and the optimizer, computed once."""

    info: data.DatasetInfo
    num_classes: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int
    bn_mode: str  # after LP-FT's probe, if any
    probe_steps: int  # LP-FT's linear-probe phase (0: none)
    bn_momentum: float  # torch's convention
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def make_plan(cfg: Config, info: data.DatasetInfo | None = None) -> Plan:
    """Resolves data-dependent settings; refuses impossible ones before anything compiles.
    `info`: the data set's, when the caller has read it already."""
    _check_compute(cfg)
    info = info or data.dataset_info(cfg.data)
    spe = data.steps_per_epoch(info, cfg.data)
    total = cfg.run.total_steps(spe)
    tx, schedule = optim.create_optimizer(cfg.optim, total_steps=total, steps_per_epoch=spe,
                                          batch_size=cfg.data.batch_size)
    # A linear probe trains only the head: the backbone's BatchNorm statistics stay as loaded.
    bn_mode = "frozen" if cfg.optim.recipe == "linear-probe" else cfg.run.bn
    return Plan(info=info, num_classes=cfg.model.num_classes or info.num_classes,
                steps_per_epoch=spe, total_steps=total, eval_every=cfg.run.eval_every or spe,
                checkpoint_every=cfg.run.checkpoint_every or spe, log_every=cfg.run.log_every,
                bn_mode=bn_mode, probe_steps=optim.probe_steps(cfg.optim, total),
                bn_momentum=_bn_momentum(cfg.run.bn_momentum, spe), tx=tx, schedule=schedule)


def _bn_momentum(setting: str, steps_per_epoch: int) -> float:
    """auto: Kornblith et al. (2019)'s max(1 - 10 / steps per epoch, 0.9) in TF's convention,
    i.e. min(10 / steps per epoch, 0.1) in torch's: statistics averaged over about an epoch."""
    return min(10 / steps_per_epoch, 0.1) if setting == "auto" else float(setting)


def _check_compute(cfg: Config) -> None:
    """The model, dtype and batch layout this process can run: facts of the devices and
    JAX's mode, so checked here rather than in the config."""
    if cfg.model.model not in ARCHITECTURES:
        raise ConfigError(f"unknown --model {cfg.model.model!r}; known models: "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    if cfg.model.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError("--dtype float64 needs JAX's x64 mode: call jax.config.update("
                          "'jax_enable_x64', True) before planning the run (the CLIs do)")
    devices, processes = jax.local_device_count(), jax.process_count()
    per_process = data.local_batch(cfg.data.batch_size, "--batch-size", devices, processes)
    if cfg.data.eval_batch_size:
        data.local_batch(cfg.data.eval_batch_size, "--eval-batch-size", devices, processes)
    if (per_process // devices) % cfg.run.accum_steps:
        raise ConfigError(f"the per-device batch {per_process // devices} is not divisible by "
                          f"--accum-steps {cfg.run.accum_steps}: use a --batch-size that is "
                          f"a multiple of {devices * processes * cfg.run.accum_steps}")


def initial_state(cfg: Config, plan: Plan, pretrained: bool = True) -> TrainState:
    """A fresh TrainState from --weights (head replaced as needed) or random init.

    `pretrained=False`: only the state's shapes and dtypes (`jax.eval_shape`), a target to
    restore into; nothing is read, initialised or compiled.
    """
    model = create_model(cfg.model.model, plan.num_classes, dtype=jnp.dtype(cfg.model.dtype),
                         bn_momentum=plan.bn_momentum)
    if jax.default_backend() == "cpu":
        from jaxsft import cpu

        model = cpu.accelerate(model)  # same variables, XLA:CPU's fast kernels
    init_rng, state_rng = jax.random.split(jax.random.key(cfg.run.seed))

    def state_of(variables):
        return TrainState.create(apply_fn=model.apply, params=variables["params"],
                                 batch_stats=variables["batch_stats"], tx=plan.tx,
                                 rng=jax.random.key_data(state_rng),  # raw keys checkpoint as-is
                                 ema=cfg.run.ema_decay is not None)

    def random_init(rng):
        size = cfg.data.image_size
        return model.init(rng, jnp.zeros((1, size, size, 3)), train=False)

    if not pretrained:
        return jax.eval_shape(lambda rng: state_of(random_init(rng)), init_rng)
    if cfg.model.weights:
        head_init = cfg.model.head_init
        if head_init == "imprint":
            head_init = imprint.imprinter(model, cfg.data, seed=cfg.run.seed,
                                          train_examples=plan.info.train_examples,
                                          scale=cfg.model.imprint_scale)
        return state_of(load_weights(cfg.model.weights, cfg.model.model,
                                     num_classes=plan.num_classes, rng=init_rng,
                                     head_init=head_init, new_head=cfg.model.new_head))
    return state_of(jax.jit(random_init)(init_rng))


def restore_or_init(cfg: Config, plan: Plan,
                    manager) -> tuple[TrainState, str, dict[str, Any]]:
    """The start state by priority: workdir checkpoint > --resume > --weights > random.

    Returns (state, where it came from, the metadata of the workdir checkpoint it resumes:
    {} for any other start, so a --resume run starts its own early-stopping count).
    """
    resuming = bool(manager.all_steps() or cfg.run.resume)  # then --weights is not read
    state = initial_state(cfg, plan, pretrained=not resuming)
    if manager.all_steps():
        # A damaged newest step is passed over (with a warning) for the newest intact one.
        state, meta = checkpoint.restore(manager, state, "latest", fallback=True)
        if jax.process_index() == 0:  # steps after it would block the saves to come
            checkpoint.set_aside_after(manager, int(state.step))
        return state, f"resumed from {manager.directory} at step {int(state.step)}", meta
    if cfg.run.resume:
        directory, step = _checkpoint_location(cfg.run.resume)
        with checkpoint.create_manager(directory, read_only=True, asynchronous=False) as other:
            state, _ = checkpoint.restore(other, state, step)
        return state, f"started from {cfg.run.resume} at step {int(state.step)}", {}
    source = cfg.model.weights or "random initialisation"
    return state, f"started from {source}", {}


def _checkpoint_location(path: str) -> tuple[Path, str | int]:
    """A workdir, its checkpoints dir, or one step's dir -> (checkpoints dir, step)."""
    p = Path(path)
    if (p / CHECKPOINT_DIR).is_dir():
        return p / CHECKPOINT_DIR, "latest"
    if p.name.isdigit() and (p / "state").is_dir():
        return p.parent, int(p.name)
    if p.is_dir():
        return p, "latest"
    raise ConfigError(f"--resume {path}: no such checkpoint or workdir")


def fit(cfg: Config, *, given: Collection[str] = ()) -> TrainState:
    """Trains per `cfg`, writing config, checkpoints, metrics and plot into the workdir.

    `--recipe auto`/`seed` are resolved first (`jaxsft.recipes.resolve`); `given` names the
    fields the user set at their default values, which they keep (the command line's flags).

    The workdir is locked first (process 0), before anything there is written or deleted;
    config.json is written only once the start (weights, data, restore) has succeeded.
    """
    started = time.perf_counter()
    is_main = jax.process_index() == 0
    say = _printer(is_main)
    info = data.dataset_info(cfg.data)  # read once: a folder is scanned, a builder opened
    cfg, chosen = recipes.resolve(cfg, info, given)
    if chosen:
        say(chosen)
    plan = make_plan(cfg, info)
    _check_classes(plan)
    with (workdir_lib.lock(cfg.run.workdir) if is_main else contextlib.nullcontext()):
        directory = Path(cfg.run.workdir) / CHECKPOINT_DIR
        workdir = workdir_lib.prepare(cfg, write=is_main, save=False,
                                      checkpoint_config=lambda: _checkpoint_config(directory))
        if is_main:  # a read-only place fails here, not inside Orbax's threads and barriers
            workdir_lib.check_writable(workdir)
            workdir_lib.check_writable(directory)
        manager = checkpoint.create_manager(directory, keep=cfg.run.keep,
                                            asynchronous=cfg.run.async_checkpoints)
        try:
            state, origin, resumed_meta = restore_or_init(cfg, plan, manager)
            if is_main:
                workdir_lib.save_config(cfg, workdir)
            say(f"{cfg.model.model} on {plan.info.name}: {plan.num_classes} classes, "
                f"{plan.info.train_examples} train examples, {plan.total_steps} steps "
                f"({plan.steps_per_epoch}/epoch) on {jax.device_count()} "
                f"{jax.default_backend()} device(s); {origin}")
            writer = (_writers(workdir, resumed_at=int(state.step)) if is_main
                      else metrics.MultiWriter([]))
            try:
                state, skipped = _train_loop(cfg, plan, state, resumed_meta, manager, writer,
                                             say)
            except BaseException:
                writer.close()
                _wait_after_failure(manager)
                raise
            writer.close()
            checkpoint.wait(manager)
        finally:
            manager.close()
        if is_main:
            summary = _summarize(workdir, wall_s=time.perf_counter() - started,
                                 skipped=skipped)
            metrics.plot_curves(workdir / METRICS_FILE, workdir / PLOT_FILE)
            say(_summary_line(summary, plan.num_classes) + f"\nplot: {workdir / PLOT_FILE}")
    return state


def _check_classes(plan: Plan) -> None:
    """A classifier needs two classes or more, and an output for every class of the data."""
    have = plan.info.num_classes
    if have < 2:
        raise ConfigError(f"{plan.info.name} has {have} class{'es' if have != 1 else ''}: a "
                          "classifier needs two or more; add a folder (or labels) per class")
    if plan.num_classes < have:
        raise ConfigError(f"--num-classes {plan.num_classes} is below the {have} classes of "
                          f"{plan.info.name}: labels {plan.num_classes}..{have - 1} would "
                          f"have no output; pass --num-classes {have} (or leave it out)")


def _checkpoint_config(directory: Path) -> Config | None:
    """The config kept in the newest intact checkpoint (None if none can be read)."""
    try:
        meta = checkpoint.read_meta(directory, "latest")
        return config_lib.from_dict(meta["config"]) if "config" in meta else None
    except (checkpoint.CheckpointError, ConfigError, KeyError, ValueError):
        return None


def _wait_after_failure(manager) -> None:
    """After a failed run: finish (and seal) a save in progress if it can finish; a save that
    failed too is reported by the first error, not this one."""
    with contextlib.suppress(Exception):
        checkpoint.wait(manager)


def _train_loop(cfg: Config, plan: Plan, state: TrainState, resumed_meta: dict[str, Any],
                manager, writer, say) -> tuple[TrainState, int]:
    """Steps from state.step to plan.total_steps; returns (state, unreadable images skipped).
    `resumed_meta` is the metadata of the checkpoint `state` was resumed from ({} if none)."""
    train_step = _train_steps(cfg, plan)
    eval_step = steps.pmap_eval_step()
    start = int(state.step)
    stopper = EarlyStop.resumed(cfg.run.early_stop, resumed_meta)
    if start >= plan.total_steps or stopper.stopped:
        say(f"already trained for {start} steps (of {plan.total_steps}"
            f"{', stopped early' if stopper.stopped else ''}); nothing to do")
        return state, 0
    rstate = steps.replicate(state)
    train_batches = data.train_batches(cfg.data, seed=cfg.run.seed, start_step=start)
    batches = data.device_prefetch(train_batches)
    meta = {"config": json.loads(cfg.to_json()), "class_names": list(plan.info.class_names),
            "num_classes": plan.num_classes}
    clock = _Throughput()
    window: list[Any] = []
    enabled = None if jax.process_index() == 0 else False
    with StopRequest() as stop, metrics.EpochProgress(plan.steps_per_epoch, plan.total_steps,
                                                      enabled=enabled) as progress:
        for step in range(start + 1, plan.total_steps + 1):
            progress.begin(step)
            rstate, step_metrics = train_step(step - 1)(rstate, next(batches))
            window.append(step_metrics)
            stopping = stop.requested  # read once: a later signal is handled at the next step
            due = _due(plan, step, stopping)
            if due.log:
                row = _flush(window, step, writer, clock, cfg.data.batch_size)
                progress.update(step, loss=row["loss"], top1=row["top1"],
                                images_per_s=row["images_per_s"])
                window = []
            eval_row = run_eval(eval_step, _evaluated(rstate), cfg) if due.eval else None
            if eval_row is not None:
                writer.write(step, eval_row, "eval")
                stopper.update(eval_row["top1"])
            progress.end(step)
            if eval_row is not None:
                epoch = (step - 1) // plan.steps_per_epoch + 1
                say(f"step {step} (epoch {epoch}): eval {_accuracy(eval_row, plan.num_classes)}"
                    f" loss {eval_row['loss']:.4f} over {eval_row['count']} examples")
            if due.save:
                checkpoint.save(manager, steps.unreplicate(rstate),
                                {**meta, "epoch": (step - 1) // plan.steps_per_epoch,
                                 "data_position": step, "early_stop": stopper.record()},
                                metrics=None if eval_row is None else
                                {k: float(v) for k, v in eval_row.items()})
            if stopper.stopped:
                say(f"early stop at step {step}: no better top-1 in {stopper.patience} "
                    f"evaluations; the best checkpoint is kept")
                break
            if stopping:
                progress.close()
                checkpoint.wait(manager)
                raise Preempted(stop.signal_name, step)
    return steps.unreplicate(rstate), train_batches.skipped.count


def _train_steps(cfg: Config, plan: Plan):
    """step -> the compiled step that runs after `step` steps: LP-FT's probe freezes
    BatchNorm, a static option, so it has a step of its own until the boundary."""
    options = dict(label_smoothing=cfg.run.label_smoothing, accum_steps=cfg.run.accum_steps,
                   learning_rate_fn=plan.schedule, ema_decay=cfg.run.ema_decay,
                   mixup_alpha=cfg.run.mixup, cutmix_alpha=cfg.run.cutmix)
    modes = {optim.lp_ft_bn_mode(s, plan.probe_steps, plan.bn_mode) for s in (0, plan.total_steps)}
    compiled = {mode: steps.pmap_train_step(bn_mode=mode, **options) for mode in modes}
    return lambda step: compiled[optim.lp_ft_bn_mode(step, plan.probe_steps, plan.bn_mode)]


def _evaluated(state: TrainState) -> TrainState:
    """The weights an evaluation measures: the moving average's when the run keeps one."""
    return state if state.ema_params is None else ema_state(state)


class EarlyStop:
    """Stops after `patience` evaluations without a better top-1 (None: never)."""

    def __init__(self, patience: int | None, best: float | None = None, stale: int = 0):
        self.patience, self.best, self.stale = patience, best, stale

    @classmethod
    def resumed(cls, patience: int | None, meta: dict[str, Any]) -> EarlyStop:
        """The count where the run's checkpoint left it (fresh without one)."""
        record = meta.get("early_stop") or {}
        return cls(patience, record.get("best"), record.get("stale", 0))

    def update(self, top1: float) -> None:
        if self.best is None or top1 > self.best:
            self.best, self.stale = float(top1), 0
        else:
            self.stale += 1

    @property
    def stopped(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def record(self) -> dict[str, float | int | None]:
        return {"best": self.best, "stale": self.stale}


class Due(NamedTuple):
    """The periodic actions due after a step."""

    log: bool
    eval: bool
    save: bool


def _due(plan: Plan, step: int, stopping: bool) -> Due:
    """Evaluate on its cadence (if there is an eval split), save on its own and after every
    evaluation or stop request, log on its cadence, at each epoch's end and before a save."""
    total = plan.total_steps
    evaluate = plan.info.eval_split is not None and is_time(step, plan.eval_every, total)
    save = evaluate or stopping or is_time(step, plan.checkpoint_every, total)
    log = save or is_time(step, plan.log_every, total) or is_time(step, plan.steps_per_epoch,
                                                                    total)
    return Due(log=log, eval=evaluate, save=save)


def _accuracy(row: dict[str, Any], num_classes: int, prefix: str = "") -> str:
    """'top-1 X%' and, where it says something (more than 5 classes), 'top-5 Y%'."""
    text = f"top-1 {100 * row[prefix + 'top1']:.2f}%"
    if num_classes > 5:
        text += f" top-5 {100 * row[prefix + 'top5']:.2f}%"
    return text


def run_eval(eval_step, rstate, cfg: Config) -> dict[str, float]:
    """Loss, top-1 and top-5 over every example of the eval split (padded batches masked)."""
    sums = [eval_step(rstate, b) for b in data.device_prefetch(data.eval_batches(cfg.data))]
    return metrics.reduce_eval(_first_replica(s) for s in jax.device_get(sums))


def evaluate(cfg: Config, checkpoint_step: int | str = "best") -> dict[str, float]:
    """Evaluates a workdir's checkpoint ('best', 'latest' or a step) on cfg's eval split."""
    plan = make_plan(cfg)
    if plan.info.eval_split is None:
        raise ConfigError(f"{plan.info.name} has no evaluation split; pass --eval-split")
    directory = Path(cfg.run.workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise ConfigError(f"no checkpoints in {cfg.run.workdir}; train there first")
    with checkpoint.create_manager(directory, read_only=True, asynchronous=False) as manager:
        # A damaged step is an error naming it: evaluating another step silently would not
        # be what was asked.
        state, meta = checkpoint.restore(manager, initial_state(cfg, plan, pretrained=False),
                                         checkpoint_step)
    result = run_eval(steps.pmap_eval_step(), steps.replicate(_evaluated(state)), cfg)
    return {**result, "step": int(state.step), "split": plan.info.eval_split,
            "num_classes": plan.num_classes}


def _flush(window, step: int, writer, clock: _Throughput, batch_size: int) -> dict[str, float]:
    """Fetches a window of step metrics, stops on a non-finite loss, writes one train row."""
    rows = [_first_replica(m) for m in jax.device_get(window)]
    bad = [r for r in rows if not bool(r["finite"])]
    if bad:
        raise TrainingError(
            f"the loss became non-finite (lr {float(bad[0]['lr']):.3g}) by step {step}; the "
            "last checkpoint is kept. Lower --lr, add --clip-grad-norm or --warmup-epochs, "
            "with a new --workdir (this one keeps its config); add --resume <this workdir> "
            "to start from its last good checkpoint")
    row = metrics.reduce_train(rows)
    row["images_per_s"] = clock.tick(len(rows) * batch_size)
    writer.write(step, row, "train")
    return row


class _Throughput:
    """Images per second between flushes (the flush syncs with the devices)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def tick(self, images: int) -> float:
        now = time.perf_counter()
        rate, self._last = images / max(now - self._last, 1e-9), now
        return rate


def _first_replica(tree: Any) -> Any:
    """pmapped metrics are identical on every device (they are psum'd): take device 0's."""
    return jax.tree.map(lambda x: np.asarray(x)[0] if np.ndim(x) else x, tree)


def _writers(workdir: Path, resumed_at: int = 0) -> metrics.MultiWriter:
    """The run's metric writers; rows after `resumed_at` (steps to be replayed after a crash
    or stop between checkpoints) are dropped from metrics.jsonl first."""
    return metrics.MultiWriter([metrics.JsonlWriter(workdir / METRICS_FILE, after=resumed_at),
                                metrics.TensorBoardWriter(workdir / "tensorboard")])


def _summarize(workdir: Path, wall_s: float, skipped: int) -> dict[str, Any]:
    """Best and last eval, throughput, and this invocation's wall time; saved as JSON."""
    rows = metrics.read_jsonl(workdir / METRICS_FILE)
    evals = [r for r in rows if r["split"] == "eval"]
    train = [r for r in rows if r["split"] == "train"]
    summary: dict[str, Any] = {"steps": max((r["step"] for r in rows), default=0),
                               "wall_s": round(wall_s, 1), "skipped_images": skipped}
    if evals:
        best = max(evals, key=lambda r: r["top1"])
        summary.update(best_top1=best["top1"], best_top5=best["top5"], best_step=best["step"],
                       last_top1=evals[-1]["top1"], last_top5=evals[-1]["top5"])
    if len(train) > 1:  # the first window includes compilation
        summary["images_per_s"] = float(np.median([r["images_per_s"] for r in train[1:]]))
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary_line(s: dict[str, Any], num_classes: int) -> str:
    parts = [f"done: {s['steps']} steps in {metrics.format_duration(s['wall_s'])}"]
    if "best_top1" in s:
        parts.append(f"best {_accuracy(s, num_classes, 'best_')} (step {s['best_step']}); "
                     f"last top-1 {100 * s['last_top1']:.2f}%")
    if "images_per_s" in s:
        parts.append(f"{s['images_per_s']:,.1f} images/s")
    if s["skipped_images"]:
        parts.append(f"{s['skipped_images']} unreadable images skipped (see the warnings)")
    return "; ".join(parts)


def _printer(enabled: bool):
    def say(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stdout, flush=True)

    return say
