"""Live display of a training run on stderr (shared by `train` and `finetune`).

:class:`TrainingDisplay` implements the :class:`breastcnn.training.callbacks.TrainingCallback`
hooks: on a terminal, a rich progress bar per epoch with the running
loss/accuracy and the latest validation scores; otherwise (CI, pipes, files)
one plain line per validation evaluation. It never writes to stdout, so
``--json`` output stays a single JSON document.

Usage from any training loop::

    display = TrainingDisplay()
    display.on_train_begin(total_epochs=5, steps_per_epoch=51)
    display.on_epoch_begin(1)
    display.on_batch_end(step=1, loss=0.69, accuracy=0.5)
    display.on_evaluation({"step": 3, "epoch": 1, "val_accuracy": 0.8, ...})
    display.on_epoch_end(1)
    display.on_train_end(summary)
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from breastcnn.cli.common import progress_enabled, stderr
from breastcnn.training.callbacks import TrainingCallback


def _fmt(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


class TrainingDisplay(TrainingCallback):
    """Progress on stderr: a rich bar per epoch on a terminal, plain lines otherwise.

    Args:
        quiet: no bar even on a terminal (``--json``); evaluation lines still go to stderr.
        plain: force plain lines (tests); default: plain when stderr is not a terminal.
    """

    def __init__(self, quiet: bool = False, plain: bool | None = None):
        self.console = stderr()
        self.live = progress_enabled(quiet) if plain is None else not plain
        self.progress: Progress | None = None
        self.task = None
        self.total_epochs = 0
        self.steps_per_epoch = 0
        self.initial_step = 0
        self._loss_sum = 0.0
        self._acc_sum = 0.0
        self._batches = 0
        self._val_text = ""
        self._prefix = ""

    # -- hooks -------------------------------------------------------------------------

    def on_train_begin(self, total_epochs: int, steps_per_epoch: int, **info) -> None:
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.initial_step = int(info.get("initial_step", 0) or 0)
        fold = info.get("fold")
        self._prefix = f"fold {fold} " if fold else ""
        parts = [f"{self._prefix}training {total_epochs} epoch(s) x {steps_per_epoch} steps"]
        if info.get("n_train") is not None:
            parts.append(f"{info['n_train']} train / {info.get('n_val')} validation images")
        if info.get("initial_epoch", 1) > 1 or self.initial_step:
            parts.append(f"resuming at epoch {info.get('initial_epoch')} step {self.initial_step}")
        if info.get("run_dir"):
            parts.append(f"-> {info['run_dir']}")
        self.console.print(", ".join(parts), highlight=False)
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()

    def on_epoch_begin(self, epoch: int) -> None:
        self._loss_sum = self._acc_sum = 0.0
        self._batches = 0
        if self.progress is not None:
            completed = self.initial_step
            self.initial_step = 0  # only the first (resumed) epoch starts part-way
            self.task = self.progress.add_task(
                f"{self._prefix}epoch {epoch}/{self.total_epochs}",
                total=self.steps_per_epoch,
                completed=completed,
                metrics=self._val_text,
            )

    def on_batch_end(self, step: int, loss: float, accuracy: float) -> None:
        self._loss_sum += float(loss)
        self._acc_sum += float(accuracy)
        self._batches += 1
        if self.progress is not None and self.task is not None:
            n = self._batches
            text = f"loss {self._loss_sum / n:.3f} acc {self._acc_sum / n:.3f}"
            if self._val_text:
                text += f" | {self._val_text}"
            self.progress.update(self.task, advance=1, metrics=text)

    def on_evaluation(self, row: dict) -> None:
        # compact on the bar (it shares one line with the bar), complete in plain lines
        self._val_text = (
            f"val acc {_fmt(row.get('val_accuracy'), 3)} "
            f"bal {_fmt(row.get('val_balanced_accuracy'), 3)} f1 {_fmt(row.get('val_f1'), 3)}"
        )
        if self.progress is None:
            mark = " *" if row.get("improved") else ""
            self.console.print(
                f"{self._prefix}epoch {row.get('epoch')} step {row.get('step')}: "
                f"loss {_fmt(row.get('loss'))} acc {_fmt(row.get('accuracy'), 3)} | "
                f"val_loss {_fmt(row.get('val_loss'))} val_acc {_fmt(row.get('val_accuracy'), 3)} "
                f"bal_acc {_fmt(row.get('val_balanced_accuracy'), 3)} auc {_fmt(row.get('val_auc'), 3)} "
                f"f1 {_fmt(row.get('val_f1'), 3)} recall {_fmt(row.get('val_recall'), 3)} "
                f"| lr {_fmt(row.get('lr'), 6)} | {_fmt(row.get('elapsed_s'), 1)}s{mark}",
                highlight=False,
            )

    def on_epoch_end(self, epoch: int) -> None:
        self.task = None

    def on_message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            self.console.print(text, highlight=False)

    def on_train_end(self, summary: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        stopped = summary.get("stopped", "completed")
        best = summary.get("best_score")
        monitor = summary.get("monitor", "score")
        colour = {"completed": "green", "early_stopping": "green", "interrupted": "yellow"}.get(stopped, "red")
        where = summary.get("model_path") or summary.get("run_dir") or ""
        self.console.print(
            f"[{colour}]{self._prefix}{stopped.replace('_', ' ')}[/{colour}] after {summary.get('epochs_run', '?')} "
            f"epoch(s), {summary.get('steps', '?')} steps, {_fmt(summary.get('elapsed_s'), 1)}s; "
            f"best {monitor} {_fmt(best, 4)} at step {summary.get('best_step', '-')}; model: {where}",
            highlight=False,
        )
        for warning in summary.get("warnings") or []:
            self.console.print(f"[yellow]warning:[/yellow] {self._prefix}{warning}", highlight=False)
