"""Task kinds. `build(cfg)` is the one place a run's kind is chosen (by its data config's class); everything after
asks the Task (tasks/base.py) for what differs between kinds."""
from __future__ import annotations

from dualign.config.tasks import ExactTaskConfig, TextDataConfig
from dualign.tasks.base import Task
from dualign.tasks.exact import ExactTask
from dualign.tasks.text import TextTask

TASKS = {ExactTaskConfig: ExactTask, TextDataConfig: TextTask}


def build(cfg) -> Task:
    return TASKS[type(cfg.data)](cfg)
