"""Load a run config from YAML (relative paths are resolved against the config file's folder), or the
resolved config a run folder holds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.builtin import read_text
from evomerge.config.models import RunConfig
from evomerge.config.optimizers import OPTIMIZER_CONFIGS
from evomerge.errors import ConfigError
from evomerge.io.adapter import resolve_spec

log = logging.getLogger(__name__)

#: The resolved config, as a run folder holds it (written when the run starts).
CONFIG_FILE = "config.resolved.yaml"


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming the YAML path (``fitness.suite``, ``sources.a``)."""
    lines = []
    for err in exc.errors():
        parts = list(err["loc"])
        if parts[:1] == ["optimizer"] and len(parts) > 1 and parts[1] in OPTIMIZER_CONFIGS:
            del parts[1]  # the union's tag: the YAML path is optimizer.options.<field>
        loc = ".".join(str(p) for p in parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)  # a model check names its own fields
    return f"{source}: " + "; ".join(lines)


def _resolve(base: Path, value: str) -> str:
    if value.startswith("builtin:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    doc = _merge(doc, overrides or {})
    base = path.parent.resolve()
    try:
        cfg = RunConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    upd: dict[str, Any] = {
        "sources": {k: resolve_spec(v, base) for k, v in cfg.sources.items()},  # BASE+ADAPTER: both sides
        "output_dir": _resolve(base, cfg.output_dir) if not Path(cfg.output_dir).is_absolute() else cfg.output_dir,
        "space": cfg.space.model_copy(update={"template": _resolve(base, cfg.space.template), **(
            {"start_from": _resolve(base, cfg.space.start_from)} if cfg.space.start_from else {})}),
        "fitness": cfg.fitness.model_copy(update={"suite": _resolve(base, cfg.fitness.suite)}),
    }
    if cfg.zoo is not None:
        upd["zoo"] = cfg.zoo.model_copy(update={"dir": _resolve(base, cfg.zoo.dir)})
    return cfg.model_copy(update=upd)


def load_run(run_dir: str | Path) -> RunConfig:
    """The resolved config of the run folder ``run_dir``."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    data = yaml.safe_load(path.read_text())
    for section, key in RETIRED_FIELDS:  # written by earlier versions into every resolved config
        if isinstance(data, dict) and isinstance(data.get(section), dict) and key in data[section]:
            log.debug("%s: ignoring %s.%s (no longer a config field)", path, section, key)
            del data[section][key]
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


#: Fields earlier versions accepted (and wrote into config.resolved.yaml) without acting on them; a run folder
#: holding them still loads, a new config setting them is refused naming the field.
RETIRED_FIELDS = (("fitness", "normalize"), ("fitness", "allow_test_split"))


def _merge(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
