"""TrainState: the JSON round trip of last.npz's train_state, old checkpoints, generator states."""

from __future__ import annotations

import json

import numpy as np
import pytest

from breastcnn.errors import UserInputError
from breastcnn.training.recipes import TrainingSchedule
from breastcnn.training.state import RunningSums, TrainState, read_checkpoint, save_checkpoint

# The keys of train_state as breastcnn.train wrote them before the training package (format 1).
FORMAT_1_KEYS = {
    "format",
    "epoch",
    "step_in_epoch",
    "global_step",
    "evaluations",
    "best_score",
    "best_step",
    "warnings",
    "schedule",
    "running",
    "elapsed_s",
    "lr",
    "stopped",
    "rngs",
    "dropout_rngs",
}


def _schedule() -> TrainingSchedule:
    return TrainingSchedule(
        lr=0.01,
        lr_decay=0.5,
        monitor="val_loss",
        evals_per_epoch=2,
        steps_per_epoch=4,
        lr_decay_epochs=1.0,
        patience_epochs=2.0,
    )


def _busy_state() -> TrainState:
    schedule = _schedule()
    for score in (0.7, 0.6, 0.65):
        schedule.update(score)
    rngs = {"shuffle": np.random.default_rng(1), "augment": np.random.default_rng(2)}
    rngs["shuffle"].permutation(10)
    state = TrainState(
        epoch=2,
        step_in_epoch=3,
        global_step=7,
        evaluations=3,
        best_score=0.6,
        best_step=4,
        warnings=["one class"],
        schedule=schedule.state_dict(),
        running=RunningSums(1.5, 0.75, 2, 1.25, 0.125),
        elapsed_s=12.5,
        lr=0.005,
    )
    state.capture_rngs(rngs, model=None)
    return state


def test_train_state_json_round_trip_is_exact():
    state = _busy_state()
    data = state.to_dict()
    assert set(data) == FORMAT_1_KEYS and data["format"] == 1
    assert data["running"] == [1.5, 0.75, 2, 1.25, 0.125]
    again = TrainState.from_dict(json.loads(json.dumps(data, sort_keys=True)))
    assert again == state
    assert again.to_dict() == data


def test_train_state_restores_the_generators():
    state = _busy_state()
    rngs = {"shuffle": np.random.default_rng(99), "augment": np.random.default_rng(98)}
    restored = TrainState.from_dict(json.loads(json.dumps(state.to_dict())))
    restored.restore_rngs(rngs, model=None)
    expected = np.random.default_rng(1)
    expected.permutation(10)
    assert np.array_equal(rngs["shuffle"].random(5), expected.random(5))
    assert np.array_equal(rngs["augment"].random(5), np.random.default_rng(2).random(5))


def test_running_sums_means_then_reset():
    sums = RunningSums()
    assert sums.take_means() == {"loss": None, "accuracy": None, "data_loss": None, "l2_penalty": None}
    sums.add(1.0, 0.5, 0.75, 0.25)
    sums.add(3.0, 1.0, 1.25, 0.25)
    assert sums.take_means() == {"loss": 2.0, "accuracy": 0.75, "data_loss": 1.0, "l2_penalty": 0.25}
    assert sums.to_list() == [0.0, 0.0, 0, 0.0, 0.0]


def test_pre_recipe_state_is_read_as_it_was_written():
    # checkpoints from before recipes: "early_stopping" instead of "schedule", three running sums
    stopper = {"best": 0.8, "best_step": 3, "step": 4, "wait": 1}
    old = {
        "format": 1,
        "epoch": 1,
        "step_in_epoch": 4,
        "global_step": 4,
        "evaluations": 4,
        "best_score": 0.8,
        "best_step": 3,
        "warnings": [],
        "early_stopping": stopper,
        "running": [0.5, 0.25, 1],
        "elapsed_s": 3.0,
        "lr": 0.008,
        "stopped": None,
        "rngs": {},
    }
    state = TrainState.from_dict(old)
    assert state.running == RunningSums(0.5, 0.25, 1, 0.0, 0.0)
    assert state.schedule == {
        "evaluations": 4,
        "lr": 0.008,
        "early_stopping": stopper,
        "best": {"best": 0.8, "best_step": 3, "step": 4},
    }
    assert "early_stopping" not in state.to_dict()


def test_checkpoint_file_round_trip_and_refusals(tmp_path):
    from breastcnn.models import create_model
    from breastcnn.nn.optim import Adam

    model = create_model("custom", input_shape=(64, 64, 3), seed=0)
    optimizer = Adam(lr=0.01)
    state = _busy_state()
    path = tmp_path / "last.npz"
    save_checkpoint(path, model, optimizer, state, np.arange(5))
    _, _, loaded, permutation = read_checkpoint(path)
    assert loaded == state and permutation.tolist() == [0, 1, 2, 3, 4]

    from breastcnn.models import save_model

    save_model(model, tmp_path / "model.npz")
    with pytest.raises(UserInputError, match="not a training checkpoint"):
        read_checkpoint(tmp_path / "model.npz")
    broken = state.to_dict()
    del broken["rngs"]
    save_model(model, tmp_path / "broken.npz", extra={"train_state": np.array(json.dumps(broken))})
    with pytest.raises(UserInputError, match="lacks rngs"):
        read_checkpoint(tmp_path / "broken.npz")
