"""GLUE data: task registry, loading (TSV folder or hub), tokenization and batching."""

from jaxpeft.data.glue import HUB_DATASET, Split, load_split
from jaxpeft.data.tasks import TASKS, Task, get_task

__all__ = ["HUB_DATASET", "Split", "TASKS", "Task", "get_task", "load_split"]
