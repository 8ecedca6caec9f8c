"""``breastcnn train`` and NumPy ``breastcnn finetune`` as library calls: one run directory per run.

One run = one directory (:mod:`breastcnn.runs`) with ``config.json``,
``history.csv`` (one row per validation evaluation), ``model.npz`` (the best
model by ``monitor``), ``last.npz`` (a resumable checkpoint), ``training.png``
and ``summary.json``. The loop itself is :mod:`breastcnn.training.loop`; the
values come from a recipe (:mod:`breastcnn.training.recipes`), single options
overriding it. At the end, a best model that predicts (almost) one class on
the validation subset, or is no more accurate there than the majority class,
is reported in the summary's ``warnings`` (and on stderr by the CLI).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from breastcnn.data.breakhis import check_outside_data
from breastcnn.data.split import fold_dirs, load_split, split_identity
from breastcnn.data.stain_options import training_stain
from breastcnn.data.tasks import TASK_CLASSES
from breastcnn.errors import UserInputError
from breastcnn.fsutil import atomic_write_json, remove_stale_temps
from breastcnn.models import create_model, load_model
from breastcnn.nn.optim import Adam, optimizer_from_state
from breastcnn.runs import RUN_FILES, RUNS_ROOT, fold_run_dirs, read_run_config, run_directory, write_run_config
from breastcnn.training.callbacks import CallbackList, PointLatest, TrainingCallback
from breastcnn.training.common import CHECKPOINT_NAME, FINISHED, SUMMARY_NAME, require_both_classes
from breastcnn.training.config import NUMPY_ARCHS, TrainConfig
from breastcnn.training.data import VAL_CARVE_FRACTION, carve_validation, load_train_data
from breastcnn.training.loop import compile_model, fit
from breastcnn.training.state import read_checkpoint


def _recorded_options(config: TrainConfig, extra: dict | None) -> dict:
    """``config.json``'s ``options``: every resolved option, the recipe and which of its values were overridden."""
    return {**config.to_dict(), "recipe_overrides": config.recipe_overrides(), **(extra or {})}


def _build_model(config: TrainConfig, meta_extra: dict):
    if config.arch not in NUMPY_ARCHS:
        raise UserInputError(
            f"--arch {config.arch!r}: train builds the NumPy models ({', '.join(NUMPY_ARCHS)}); "
            "train vgg16/resnet50/custom-keras with 'breastcnn finetune --arch NAME'"
        )
    try:
        model = create_model(
            config.arch,
            input_shape=(config.image_size, config.image_size, 3),
            num_classes=len(TASK_CLASSES[config.task]),
            seed=config.seed,
            activation=config.activation,
        )
    except UserInputError as exc:  # the options were validated: what is left is the size (too small)
        raise UserInputError(f"--image-size {config.image_size}: {exc}") from None
    if getattr(model, "framework", "numpy") != "numpy":
        raise UserInputError(
            f"--arch {config.arch} is a Keras model; train it with 'breastcnn finetune --arch {config.arch}'"
        )
    model.meta.update(
        {
            "arch": config.arch,
            "classes": list(TASK_CLASSES[config.task]),
            "preprocess": config.preprocess,
            "image_size": config.image_size,
            "task": config.task,
            **meta_extra,
        }
    )
    optimizer = Adam(lr=config.lr)
    compile_model(model, optimizer, config.l2)
    return model, optimizer


def _restore(run_dir: Path, config: TrainConfig):
    """``(model, optimizer, (TrainState, permutation))`` from ``run_dir/last.npz``."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise UserInputError(f"--resume {run_dir}: no {CHECKPOINT_NAME} checkpoint in this directory")
    model, optimizer_state, state, permutation = read_checkpoint(path)
    optimizer = optimizer_from_state(optimizer_state)
    compile_model(model, optimizer, config.l2)
    return model, optimizer, (state, permutation)


def _previous_summary(path: Path) -> dict | None:
    """``summary.json`` of a run (None when absent); anything but a JSON object is a user error naming it."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc}); delete it to resume") from None
    if not isinstance(summary, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(summary).__name__}; delete it to resume")
    return summary


def _train_one(
    config: TrainConfig,
    run_dir: Path,
    split_dir: Path,
    progress: Sequence[TrainingCallback],
    resume: bool,
    fold: int | None = None,
    base_model: Callable | None = None,
    extra_options: dict | None = None,
) -> dict:
    hooks = CallbackList(progress)
    split = load_split(split_dir)
    split_hash = split.hash
    require_both_classes(split, config.task)
    if not split.subset("val"):
        split = carve_validation(split, seed=config.seed)
        hooks.on_message(
            f"{split_dir} has no validation subset (e.g. a 70/30 k-fold split): validating on "
            f"{len(split.subset('val'))} images of {VAL_CARVE_FRACTION:.1%} of the training patients, never on test"
        )
    if resume:
        previous = _previous_summary(run_dir / SUMMARY_NAME)
        if previous is not None and previous.get("stopped") in FINISHED:
            hooks.on_message(f"{run_dir}: already finished ({previous['stopped']}), nothing to resume")
            return previous
    run_dir.mkdir(parents=True, exist_ok=True)
    meta_extra = {
        "split_hash": split_hash,
        "seed": config.seed,
        "magnification": (split.info or {}).get("magnification"),
    }  # read by `breastcnn slide`
    # the model before the data: a size the architecture cannot take is refused before any cache is written
    resume_state = None
    if resume and (run_dir / CHECKPOINT_NAME).is_file():
        model, optimizer, resume_state = _restore(run_dir, config)  # its meta has the stain target it was fitted
    elif base_model is not None:
        model, optimizer = base_model()
        model.meta.update(meta_extra)
        _check_base_task(model, config)
        _record_stain(model, split, config)
    else:
        model, optimizer = _build_model(config, meta_extra)
        _record_stain(model, split, config)
    data = load_train_data(
        split,
        config.image_size,
        config.preprocess,
        config.jobs,
        hooks.on_message,
        task=config.task,
        normaliser=model.spec.normaliser,
    )
    if config.monitor == "val_auc" and np.unique(data.y_val).size < 2:
        raise UserInputError(
            f"--monitor val_auc: the validation subset of {split_dir} holds one class only, so ROC AUC is "
            "undefined; use --monitor val_loss or val_balanced_accuracy"
        )
    if resume_state is None:
        write_run_config(run_dir, _recorded_options(config, extra_options), split)
    return fit(model, optimizer, config, run_dir, data, progress, resume=resume_state, fold=fold)


def _record_stain(model, split, config: TrainConfig) -> None:
    """Fit the run's stain target (``--stain-norm``/``--stain-target``) and record the stain settings in the
    model's meta (the command's, replacing a fine-tuned model's)."""
    stain = training_stain(
        split, config.image_size, config.stain_norm, config.stain_target, config.stain_augment, jobs=config.jobs
    )
    model.meta.pop("stain", None)
    model.meta.update({"stain": stain.meta} if stain.meta is not None else {})


def _check_base_task(model, config: TrainConfig) -> None:
    """A fine-tuned NumPy model keeps its outputs: ``--task`` must be the task it was trained for."""
    task = model.spec.task
    if task != config.task:
        raise UserInputError(
            f"--task {config.task}: the model to fine-tune ({model.meta.get('finetuned_from')}) "
            f"was trained for the {task} task; pass --task {task}"
        )


class _SplitIdentity:
    """What ``config.json`` records of a k-fold split: its absolute dir and combined hash."""

    def __init__(self, directory: Path, digest: str):
        self.dir, self.hash = directory, digest


def _recorded_split(run_dir: Path, recorded: dict) -> tuple[Path, str, Path]:
    """The split a run was trained on, checked: ``(absolute dir, hash, data root)``.

    ``config.json`` records the absolute split directory and its manifest hash
    (older files: the ``--split`` as typed, relative to the directory training
    ran in, which is tried against the current directory). A split that is
    gone, or whose manifest changed since, is refused naming both.
    """
    config_path = run_dir / "config.json"
    info = recorded.get("split")
    if info is not None and not isinstance(info, dict):
        raise UserInputError(f"{config_path}: 'split' must be an object with 'dir' and 'hash', got {info!r}")
    info = info or {}
    where = info.get("dir") or recorded["options"].get("split")
    expected = info.get("hash")
    if not isinstance(where, str) or not where or (expected is not None and not isinstance(expected, str)):
        raise UserInputError(f"{config_path}: no usable split path/hash recorded (got {where!r}, {expected!r})")
    path = Path(where)
    if not path.exists():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()}: it was recorded as typed)"
        raise UserInputError(f"--resume {run_dir}: the split it was trained on, {where}, does not exist{relative}")
    actual, root = split_identity(path)
    if expected is not None and actual != expected:
        raise UserInputError(
            f"--resume {run_dir}: the split changed: {config_path} records {where} with manifest hash "
            f"{expected[:12]}, but {path.resolve()} now has manifest hash {actual[:12]}; resume with the same split, "
            "or train a new run"
        )
    return path.resolve(), actual, root


@dataclasses.dataclass
class _RunPlan:
    """What :func:`run_training` settled before it opens the run directory."""

    config: TrainConfig
    split_hash: str
    data_root: Path
    latest_root: Path | None = None
    base_model: Callable | None = None
    extra_options: dict | None = None


def _plan_resume(run_dir: Path, threads: int | None, base_model, extra_options) -> _RunPlan:
    """The plan of ``--resume RUN_DIR``: the recorded options (``threads`` from this command) and split."""
    if not run_dir.is_dir():
        raise UserInputError(f"--resume {run_dir}: no such run directory")
    recorded = read_run_config(run_dir)
    options = recorded["options"]
    config = TrainConfig.from_dict(options, source=run_dir / "config.json", threads=threads)
    split_path, split_hash, data_root = _recorded_split(run_dir, recorded)
    config = dataclasses.replace(config, split=str(split_path)).validate()
    plan = _RunPlan(
        config,
        split_hash,
        data_root,
        latest_root=run_dir.parent if options.get("out") is None else None,
        base_model=base_model,
        extra_options=extra_options,
    )
    if base_model is None and options.get("finetune_from"):
        # a fine-tuning run interrupted before its first checkpoint starts again from its source model
        freeze = int(options.get("freeze") or 0)
        plan.base_model = _finetune_base(Path(options["finetune_from"]), freeze, config)
        plan.extra_options = {"finetune_from": options["finetune_from"], "freeze": freeze}
    return plan


def _plan_new(config: TrainConfig, base_model, extra_options) -> _RunPlan:
    config = config.validate()
    if not Path(config.split).exists():
        raise UserInputError(f"--split {config.split}: no such split directory; run 'breastcnn split --mag 200X' first")
    config = dataclasses.replace(
        config,
        split=str(Path(config.split).resolve()),  # a replay finds them
        stain_target=config.stain_target and str(Path(config.stain_target).resolve()),
    )
    split_hash, data_root = split_identity(config.split)
    return _RunPlan(config, split_hash, data_root, base_model=base_model, extra_options=extra_options)


def run_training(
    config: TrainConfig,
    progress_callbacks: Sequence[TrainingCallback] = (),
    resume: str | Path | None = None,
    _base_model: Callable | None = None,
    _extra_options: dict | None = None,
) -> dict:
    """Train per ``config`` (or continue the run in ``resume``); returns the summary dict.

    A k-fold split directory trains one model per fold into ``RUN_DIR/fold1..K``
    and returns ``{"folds": [summary, ...], "run_dir": ..., "stopped": ...}``.
    Raises :class:`~breastcnn.training.common.TrainingDiverged` on a NaN/inf loss (best model kept);
    an interruption returns a summary with ``stopped == "interrupted"``.

    The run directory is locked while training (a second run into it is refused
    naming the holder's pid); ``runs/latest`` moves to a default run once it has
    written a model; a run that fails before writing anything is removed again.
    A resumed run trains on the split recorded in its ``config.json`` (absolute
    path; the manifest hash must still match).
    """
    if resume is not None:
        plan = _plan_resume(Path(resume), config.threads, _base_model, _extra_options)
    else:
        plan = _plan_new(config, _base_model, _extra_options)
    config = plan.config
    check_outside_data(resume or config.out or RUNS_ROOT, plan.data_root, "--resume" if resume else "--out")
    split_dir = Path(config.split)
    with run_directory(config.arch, config.out, config.force, resume=resume, latest_root=plan.latest_root) as run:
        run_dir = run.path
        if resume is not None:  # a run killed while writing leaves temporary files; we hold the lock
            for folder in (run_dir, *fold_run_dirs(run_dir)):
                remove_stale_temps(folder, RUN_FILES)
        progress = [*progress_callbacks, PointLatest(run)]
        folds = fold_dirs(split_dir)
        if not folds:
            return _train_one(
                config,
                run_dir,
                split_dir,
                progress,
                resume is not None,
                base_model=plan.base_model,
                extra_options=plan.extra_options,
            )
        if resume is None:
            write_run_config(
                run_dir,
                {**_recorded_options(config, plan.extra_options), "folds": len(folds)},
                _SplitIdentity(split_dir, plan.split_hash),
            )
        return _train_folds(plan, run_dir, folds, progress, resume is not None)


def _train_folds(plan: _RunPlan, run_dir: Path, folds: list, progress: list, resume: bool) -> dict:
    """One model per fold into ``run_dir/foldK``; the combined summary (written unless interrupted)."""
    summaries = []
    for k, fold_split in enumerate(folds, start=1):
        summary = _train_one(
            plan.config,
            run_dir / f"fold{k}",
            fold_split,
            progress,
            resume,
            fold=k,
            base_model=plan.base_model,
            extra_options=plan.extra_options,
        )
        summaries.append(summary)
        if summary["stopped"] == "interrupted":
            break
    stopped = "interrupted" if summaries[-1]["stopped"] == "interrupted" else "completed"
    warnings = [f"fold {s['fold']}: {w}" for s in summaries for w in s.get("warnings", [])]
    result = {
        "run_dir": str(run_dir),
        "folds": summaries,
        "stopped": stopped,
        "recipe": plan.config.recipe,
        "monitor": plan.config.monitor,
        "warnings": warnings,
    }
    if stopped != "interrupted":
        atomic_write_json(run_dir / SUMMARY_NAME, result)
    return result


def finetune_numpy(
    model_path: str | Path,
    config: TrainConfig,
    freeze: int = 0,
    progress_callbacks: Sequence[TrainingCallback] = (),
    resume: str | Path | None = None,
    model=None,
) -> dict:
    """Continue training a saved NumPy model (``.npz``) on ``config.split``; same outputs as training.

    The first ``freeze`` layers (indices as in ``model.summary()``) are frozen
    (no gradient, no update). ``config.image_size`` and ``config.preprocess``
    are taken from the model's meta (a model knows its input); ``config.arch``
    becomes ``"<arch>-finetuned"`` for the run directory name. The optimizer is
    a fresh Adam at ``config.lr`` (the fine-tuning LR, e.g. 1e-3).
    ``resume``: a run directory from an interrupted fine-tuning. ``model``:
    the model already loaded from ``model_path`` (the CLI loads it once).
    """
    if resume is not None:
        return run_training(config, progress_callbacks, resume=resume)
    config = config.resolved()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserInputError(f"--model {model_path}: no such file; run 'breastcnn train' first")
    if model_path.suffix != ".npz":
        raise UserInputError(f"--model {model_path}: finetune_numpy needs a NumPy .npz model")
    probe = model if model is not None else load_model(model_path)
    n_layers = len(probe.layers)
    if not 0 <= freeze <= n_layers:
        raise UserInputError(f"--freeze must be between 0 and {n_layers} (layers of {model_path}), got {freeze}")
    config = dataclasses.replace(
        config,
        image_size=int(probe.meta.get("image_size", config.image_size)),
        preprocess=str(probe.meta.get("preprocess", config.preprocess)),
        arch=f"{probe.meta.get('arch', 'custom')}-finetuned" if not config.arch.endswith("-finetuned") else config.arch,
    )
    config = config.validate()
    model_path = model_path.resolve()  # recorded in config.json: a resume from elsewhere finds it
    return run_training(
        config,
        progress_callbacks,
        _base_model=_finetune_base(model_path, freeze, config, probe),
        _extra_options={"finetune_from": str(model_path), "freeze": freeze},
    )


def _finetune_base(model_path: Path, freeze: int, config: TrainConfig, loaded=None) -> Callable:
    """The model builder of a fine-tuning run: the saved model, its first ``freeze`` layers frozen, fresh Adam.

    ``loaded``: the model already read from ``model_path`` (used once, not read again).
    """
    unused = [loaded] if loaded is not None else []

    def base_model():
        if unused:
            model = unused.pop()
        elif model_path.is_file():
            model = load_model(model_path)
        else:
            raise UserInputError(f"{model_path}: the model this fine-tuning run starts from no longer exists")
        model.freeze(freeze)
        model.meta.update({"finetuned_from": str(model_path), "frozen_layers": freeze})
        optimizer = Adam(lr=config.lr)
        compile_model(model, optimizer, config.l2)
        return model, optimizer

    return base_model
