"""Every shipped config, template and suite validates; the JSON schema is produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import load_run_config
from evomerge.resources import builtin_dir
from evomerge.spaces.template import builtin_templates, load_template

CONFIGS = sorted(builtin_dir("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path: Path):
    cfg = load_run_config(path)
    load_template(cfg.space.template)
    if cfg.fitness.suite.startswith("builtin:"):
        from evomerge.scoring.suite import load_suite

        suite = load_suite(cfg.fitness.suite)
        assert suite.names


@pytest.mark.parametrize("name", builtin_templates())
def test_builtin_templates_load(name: str):
    assert load_template(f"builtin:{name}").kind in {"params", "routing", "hybrid", "segments"}


def test_schema_command_prints_the_run_config_schema():
    res = CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert {"sources", "space", "fitness", "optimizer", "budget"} <= set(schema["properties"])


def test_config_paths_resolve_relative_to_the_file(tmp_path):
    cfg = load_run_config(builtin_dir("configs") / "tiny-demo.yaml")
    assert Path(cfg.sources["base"]).is_absolute()
    assert cfg.sources["base"].endswith("zoo/demo/base")
