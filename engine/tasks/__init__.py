"""Pretext tasks behind one registry and one contract (`rafmedia.engine.tasks.base`).

Build one with `create_task(name, encoder=..., **options)`; list them with `list_tasks()`. Each module of this
package registers its tasks when it is imported; a new module is added to the import line below.
"""
from rafmedia.engine.tasks import (contrastive, cpc, dino, mae, paired, shape,  # noqa: F401  (register their tasks)
                                   taleb)
from rafmedia.engine.tasks.base import TASKS, TaskConfig, check_compatible, create_task, list_tasks, task_data_kind

__all__ = ["TASKS", "TaskConfig", "check_compatible", "create_task", "list_tasks", "task_data_kind"]
