"""The tasks: image and video few-shot segmentation. ``task_for(cfg)`` is the one place the
engine decides which one a config is (the config's ``task``, derived from its dataset)."""
from engine.tasks.base import Scorer, Task, mean_std
from engine.tasks.image import ImageTask
from engine.tasks.video import VideoTask
from util.config import task_of

TASKS: dict[str, Task] = {"image": ImageTask(), "video": VideoTask()}


def task_for(cfg) -> Task:
    """The task of a config (``task``, or its dataset's where it is still 'auto')."""
    return TASKS[cfg.task if cfg.task != "auto" else task_of(cfg.dataset)]


__all__ = ["TASKS", "Scorer", "Task", "mean_std", "task_for"]
