"""The evaluation pool backends by name: ``resources.backend`` of a run config names one.

``POOLS.get(name)(make_evaluator, resources)`` builds the pool; ``make_evaluator()`` builds one worker
and ``resources`` is the run's :class:`~evomerge.config.models.ResourcesConfig`. The factories live in
:mod:`evomerge.driver.pool` and are imported on first use, so a config validates without importing the
driver (or Ray).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evomerge.registry import Registry

__all__ = ["POOLS"]

#: ``(make_evaluator, resources) -> Pool``.
POOLS: Registry[Callable[[Callable[[], Any], Any], Any]] = Registry("pool backend")
POOLS.register_lazy("local", "evomerge.driver.pool:local_pool")
POOLS.register_lazy("ray", "evomerge.driver.pool:ray_pool", capabilities=("distributed",))
