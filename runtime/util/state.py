"""``shoal.util.state``: the state API under Ray's ``ray.util.state`` name (see shoal.state)."""

from ..state import (
    StateList,
    cluster_snapshot,
    get_actor,
    get_task,
    list_actors,
    list_metrics,
    list_nodes,
    list_objects,
    list_tasks,
    list_workers,
    metrics_text,
    stack,
    summarize_objects,
    summarize_tasks,
)

__all__ = [
    "StateList",
    "cluster_snapshot",
    "get_actor",
    "get_task",
    "list_actors",
    "list_metrics",
    "list_nodes",
    "list_objects",
    "list_tasks",
    "list_workers",
    "metrics_text",
    "stack",
    "summarize_objects",
    "summarize_tasks",
]
