"""Run configuration: the validated models and the YAML loader."""

from evomerge.config.load import load_run_config
from evomerge.config.models import RunConfig

__all__ = ["RunConfig", "load_run_config"]
