"""One ``--jobs`` default across commands, documented in each command's help (issue 16 item 9)."""

from __future__ import annotations

from typer.main import get_command

from breastcnn.cli.app import app
from breastcnn.data.images import DEFAULT_JOBS
from breastcnn.training.config import TrainConfig


def test_every_jobs_option_has_the_one_default_and_says_so():
    commands = get_command(app).commands
    found = {}
    for name, command in commands.items():
        for param in command.params:
            if param.name == "jobs":
                found[name] = param
    assert set(found) == {"synth", "split", "train", "finetune", "evaluate", "predict", "compare"}
    assert DEFAULT_JOBS == -1 and TrainConfig().jobs == DEFAULT_JOBS
    for name, param in found.items():
        assert param.default == DEFAULT_JOBS, name
        assert {"--jobs", "-j"} <= set(param.opts), name
        assert "-1 = all cores, the default of every command" in param.help, name
