"""Job tasks as objects (extract, generate, complete): what a job computes, behind one interface."""
from __future__ import annotations

from igpt_batch.run.context import Resolved
from igpt_batch.run.tasks.base import Plan, Task
from igpt_batch.run.tasks.extract import Extract
from igpt_batch.run.tasks.sample import Complete, Generate

__all__ = ["Complete", "Extract", "Generate", "Plan", "Resolved", "Task", "get"]


def get(task: "str | Task") -> Task:
    """A task object from a task or its name."""
    if isinstance(task, Task):
        return task
    by_name = {t.name: t for t in (Extract(), Generate(), Complete())}
    if task not in by_name:
        raise ValueError(f"task must be one of {sorted(by_name)}, got {task!r}")
    return by_name[task]
