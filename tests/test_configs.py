"""Every shipped config, template and suite validates; the JSON schema is produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.builtin import builtin_dir
from evomerge.cli import app
from evomerge.config import load_run_config
from evomerge.errors import ConfigError
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
    assert load_template(f"builtin:{name}").kind in {"params", "routing", "hybrid", "segments", "lines", "layer_swap"}


def test_schema_command_prints_the_run_config_schema():
    res = CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0
    schema = json.loads(res.output)
    assert {"sources", "space", "fitness", "optimizer", "budget"} <= set(schema["properties"])


def test_schema_shows_every_optimizers_options_by_name():
    schema = json.loads(CliRunner().invoke(app, ["schema"]).output)
    union = schema["properties"]["optimizer"]
    assert union["discriminator"]["propertyName"] == "name"
    defs = schema["$defs"]
    options = {}
    for ref in union["discriminator"]["mapping"].values():
        model = defs[ref.rsplit("/", 1)[-1]]
        opts = defs[model["properties"]["options"]["$ref"].rsplit("/", 1)[-1]]
        options[model["properties"]["name"]["const"]] = opts["properties"]
    from evomerge.config.optimizers import OPTIMIZER_CONFIGS

    assert set(options) == set(OPTIMIZER_CONFIGS) >= {"cma_es", "nevergrad", "m2n2", "random", "bo", "optuna"}
    assert options["bo"]["model"]["enum"] == ["gp", "saas"] and options["bo"]["n_init"]["default"] is None
    assert options["optuna"]["sampler"]["default"] == "TPESampler" and "sampler_options" in options["optuna"]
    assert options["cma_es"]["sigma0"]["exclusiveMinimum"] == 0 and options["cma_es"]["sigma0"]["default"] == 0.2
    assert "archive_size" in options["m2n2"] and "num_workers" in options["nevergrad"]
    assert all("scalarize" in o for o in options.values())


def test_an_optimizer_block_without_a_name_is_cma_es_and_options_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    doc = yaml.safe_load((builtin_dir("configs") / "tiny-demo.yaml").read_text())
    doc["optimizer"] = {"options": {"sigma0": 0.05}}
    path.write_text(yaml.safe_dump(doc))
    cfg = load_run_config(path)
    assert cfg.optimizer.name == "cma_es" and cfg.optimizer.options.sigma0 == 0.05
    doc["optimizer"] = {"name": "nevergrad", "options": {"num_workers": 0}}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"optimizer\.options\.num_workers: Input should be greater than or equal to 1"):
        load_run_config(path)
    doc["optimizer"] = {"name": "optuna", "options": {"sampler": "NSGAIISampler", "sampler_options": {"population_size": 8}}}
    path.write_text(yaml.safe_dump(doc))
    cfg = load_run_config(path)
    assert cfg.optimizer.options.sampler == "NSGAIISampler" and cfg.optimizer.options.sampler_options == {"population_size": 8}
    doc["optimizer"] = {"name": "optuna", "options": {"sampler": "GridSampler"}}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"optimizer\.options\.sampler: .*unknown or unsupported Optuna sampler 'GridSampler'"):
        load_run_config(path)


def test_options_left_to_the_run_are_filled_from_it_and_kept_unset_in_the_config():
    from evomerge.config.optimizers import CmaEsOptions, NevergradOptions

    ng = NevergradOptions()
    assert (ng.num_workers, ng.budget) == (None, None)
    filled = ng.for_run(workers=4, evaluations=64)
    assert (filled.num_workers, filled.budget) == (4, 64)
    assert NevergradOptions(num_workers=2).for_run(workers=4, evaluations=None).num_workers == 2
    assert CmaEsOptions().for_run(workers=4, evaluations=64) == CmaEsOptions()


def test_config_paths_resolve_relative_to_the_file(tmp_path):
    cfg = load_run_config(builtin_dir("configs") / "tiny-demo.yaml")
    assert Path(cfg.sources["base"]).is_absolute()
    assert cfg.sources["base"].endswith("zoo/demo/base")


def test_retired_fields_are_refused_in_a_config_but_a_run_folder_holding_them_still_loads(tmp_path):
    """fitness.normalize / fitness.allow_test_split were accepted and never read; earlier versions wrote them
    into every run folder's resolved config."""
    import yaml

    from evomerge.config import RunConfig
    from evomerge.config.load import CONFIG_FILE, load_run
    from evomerge.errors import ConfigError

    doc = {"name": "x", "sources": {"a": "/m/a", "b": "/m/b"}, "space": {"template": "builtin:ties-per-layer"},
           "fitness": {"suite": "builtin:zoo", "normalize": "references", "allow_test_split": False}}
    with pytest.raises(Exception, match="normalize"):
        RunConfig.model_validate(doc)
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(doc))
    cfg = load_run(tmp_path)
    assert cfg.fitness.suite == "builtin:zoo"
    doc["fitness"]["unknown"] = 1
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="fitness.unknown: unknown key"):
        load_run(tmp_path)


def test_pool_backends_come_from_the_registry():
    from pydantic import ValidationError

    from evomerge.config.models import ResourcesConfig
    from evomerge.driver.pool import LocalPool
    from evomerge.pools import POOLS

    assert POOLS.names() == ["local", "ray"]
    assert ResourcesConfig.model_json_schema()["properties"]["backend"]["enum"] == ["local", "ray"]
    with pytest.raises(ValidationError, match="unknown pool backend 'slurm'; valid names: local, ray"):
        ResourcesConfig(backend="slurm")
    pool = POOLS.get("local")(lambda: "worker", ResourcesConfig())
    assert isinstance(pool, LocalPool) and pool.evaluator == "worker" and pool.free() == 1


def test_custom_resources_per_worker_places_ray_workers_only():
    from pydantic import ValidationError

    from evomerge.config.models import ResourcesConfig

    ok = ResourcesConfig(backend="ray", custom_resources_per_worker={"merge_worker": 1})
    assert ok.custom_resources_per_worker == {"merge_worker": 1}
    with pytest.raises(ValidationError, match="backend 'local' runs one worker in this process"):
        ResourcesConfig(custom_resources_per_worker={"merge_worker": 1})
    with pytest.raises(ValidationError, match=r"\['GPU'\] are not custom resources"):
        ResourcesConfig(backend="ray", custom_resources_per_worker={"GPU": 1})
    with pytest.raises(ValidationError, match="finite and > 0"):
        ResourcesConfig(backend="ray", custom_resources_per_worker={"merge_worker": 0})
