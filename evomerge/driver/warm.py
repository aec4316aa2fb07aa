"""``space.warm_start``: score task arithmetic on a grid of weights with the baselines, then start the optimizer
at the best of them.

:func:`prepare` (preflight) checks the space, builds the grid's baselines and a factory of optimizers whose start
point gives every searched per-model ``weight`` one value (the rest of the start point is the template's);
:func:`start_optimizer` (driver, once the baselines are scored and the references are known) picks the weight and
builds the optimizer there. The choice is a function of the scored baselines, so a resumed run, which replays
them from its archive, builds the same optimizer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from evomerge.config import RunConfig
from evomerge.driver.baselines import Baseline
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe

WHERE = "space.warm_start"


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """The grid's baselines, their weights by baseline name, and weight -> a fresh optimizer started there."""

    baselines: list[Baseline]
    weights: dict[str, float]
    make_optimizer: Callable[[float], Any]


def prepare(cfg: RunConfig, template: Any, models: Any, space: Any, x0_recipe: Recipe, problem: Any,
            factory: Any, options: dict[str, Any]) -> WarmStart:
    """Validate ``space.warm_start`` against the space and build its grid and optimizer factory."""
    from evomerge.spaces.base import build_space
    from evomerge.spaces.template import parse_template

    assert cfg.space.warm_start is not None
    genes = space.param_genes
    if genes is None:
        raise ConfigError(f"{WHERE}: needs a params or hybrid template; {cfg.space.template} is a "
                          f"{getattr(template, 'kind', '?')} template")
    if not any(p.spec.name == "weight" and p.spec.scope == "source" for p in genes.searched):
        raise ConfigError(f"{WHERE}: the template does not search a per-model 'weight' ({cfg.space.template})")
    if cfg.base_model is None or x0_recipe.base_model != cfg.base_model:
        raise ConfigError(f"{WHERE}: needs base_model (task arithmetic adds task vectors to the base)")
    merged = [m.model for m in x0_recipe.models]
    baselines: list[Baseline] = []
    weights: dict[str, float] = {}
    for w in map(float, cfg.space.warm_start.weights):
        name = f"task_arithmetic w={w:g}"
        weights[name] = w
        baselines.append(Baseline(name, Recipe(
            method="task_arithmetic", base_model=cfg.base_model,
            models=tuple({"model": m, "parameters": {"weight": w}} for m in merged), **models.vocab_fields),
            "handset"))
    data = template.model_dump(mode="json")

    def make_optimizer(weight: float) -> Any:
        warm = with_start_weight(data, weight)
        warm_space = build_space(parse_template(warm, source=f"{WHERE} (weight {weight:g})"), models)
        if warm_space.dim != space.dim:  # pragma: no cover - the init never changes the layout
            raise ConfigError(f"{WHERE}: the start weight changed the space's layout")
        return factory(dataclasses.replace(problem, x0=warm_space.x0), seed=cfg.seed, **options)

    return WarmStart(baselines, weights, make_optimizer)


def with_start_weight(template: dict[str, Any], weight: float) -> dict[str, Any]:
    """A copy of a template's data whose searched per-model ``weight`` starts at ``weight`` (``init`` of a params
    template, ``params.init`` of a hybrid one)."""
    out = copy.deepcopy(template)
    section = out["params"] if out["kind"] == "hybrid" else out
    section["init"] = {**section.get("init", {}), "weight": float(weight)}
    return out


def choose(scored: Iterable[tuple[str, float]], weights: dict[str, float]) -> tuple[float | None, dict[float, float]]:
    """The grid weight with the best score (ties: the first of the grid) from ``(baseline name, score)`` pairs,
    and the scores by weight; ``None`` when no grid merge was scored."""
    scores = {weights[name]: s for name, s in scored if name in weights}
    order = [w for w in weights.values() if w in scores]
    if not order:
        return None, {}
    return max(order, key=lambda w: (scores[w], -order.index(w))), {w: scores[w] for w in order}


def start_optimizer(default: Any, warm: WarmStart | None, scored: Iterable[Any], refs: Any,
                    tasks: list[str]) -> tuple[Any, dict[str, Any] | None]:
    """The optimizer the search runs with, and the warm-start choice (None without a warm start).

    ``default`` is the optimizer built at the template's start point; ``scored`` the baselines' results (objects
    with ``meta`` and ``result``) on the full calibration set, ``refs`` the run's
    :class:`~evomerge.references.References`. The grid weight is chosen by the optimizer's own scalarization of
    the normalized task scores (ties: the first weight of the grid).
    """
    if warm is None:
        return default, None
    pairs = [(str(s.meta.get("baseline")), float(default.scalarizer(refs.objectives(s.result, tasks))))
             for s in scored if s.result.ok]
    best, scores = choose(pairs, warm.weights)
    info = {"weight": best, "scores": {f"{w:g}": v for w, v in scores.items()}}
    if best is None:
        return default, info
    return warm.make_optimizer(best), info
