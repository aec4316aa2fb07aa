"""AdaMerging (evomerge.driver.adamerging): entropy minimization over the task-arithmetic space's genome.

Defining properties on the session's test zoo, over a small calibration suite (16 prompts per task): the entropy
falls over the steps; the gradient reaches the genome and nothing else; zero steps return the start; the same
seed gives the same fit; the functional model is the recipe's model; the fitted recipe merges to disk and in
place with the same bits; ``space.start_from`` starts a search there; bad inputs are refused naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.config import RunConfig
from evomerge.driver.adamerging import (
    START_FILE,
    AdaMerging,
    AdaMergingConfig,
    load_start,
    write_fit,
)
from evomerge.driver.run import preflight
from evomerge.driver.worker import Worker
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]


def _suite(folder: Path, n: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for skill in ("add", "rev"):
        for split in ("calibration", "test"):
            lines = (REPO / "fitness" / "zoo" / f"{skill}.{split}.jsonl").read_text().splitlines()[:n]
            (folder / f"{skill}.{split}.jsonl").write_text("\n".join(lines) + "\n")
        tasks.append({"name": skill, "kind": "generate", "max_new_tokens": 10, "stop": ["\n"],
                      "metric": "exact_match",
                      "data": {"calibration": f"{skill}.calibration.jsonl", "test": f"{skill}.test.jsonl"}})
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "small", "tasks": tasks}))
    return path


def _cfg(zoo, suite: Path, out: Path, **space) -> RunConfig:
    return RunConfig.model_validate({
        "name": "ada", "output_dir": str(out), "base_model": "base",
        "sources": {"base": str(zoo.base), "add": str(zoo.expert("add")), "rev": str(zoo.expert("rev"))},
        "space": {"template": "builtin:task-arithmetic-per-layer", **space},
        "fitness": {"suite": str(suite), "batch_size": 32}, "resources": {"threads_per_worker": 1}})


@pytest.fixture(scope="module")
def setup(zoo_test, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adamerging")
    suite = _suite(tmp / "suite")
    cfg = _cfg(zoo_test, suite, tmp / "runs")
    prep = preflight(cfg)
    return {"cfg": cfg, "prep": prep, "worker": Worker(prep.spec), "tmp": tmp, "suite": suite, "zoo": zoo_test}


def _fitter(setup, seed: int = 0, **kw) -> AdaMerging:
    return AdaMerging(setup["prep"].space, setup["worker"], AdaMergingConfig(**kw), seed=seed, batch_size=32)


@pytest.fixture(scope="module")
def fitted(setup):
    return _fitter(setup, steps=4, lr=0.05, refresh=1).fit()


def test_entropy_decreases_over_the_steps(fitted):
    entropy = [h["loss"] for h in fitted.history]
    assert len(entropy) == 5 and all(np.isfinite(entropy))
    assert entropy[-1] < entropy[0] * 0.98
    assert not np.array_equal(fitted.genome, fitted.x0)
    assert fitted.cost.gradient_passes == 4 and fitted.cost.generation_passes == 5


def test_the_gradient_reaches_only_the_genome(setup):
    fitter = _fitter(setup, steps=1)
    worker = setup["worker"]
    before = {n: t.clone() for n, t in worker.sources.base.items()}
    u = torch.tensor(setup["prep"].space.x0, dtype=torch.float64, requires_grad=True)
    drawn = fitter._draw(np.random.default_rng(0))
    fitter._regenerate(u.detach().numpy(), drawn)
    loss = fitter.loss_and_grad(u, drawn)
    assert loss > 0 and u.grad is not None and torch.isfinite(u.grad).all() and u.grad.abs().max() > 0
    assert all(p.grad is None and not p.requires_grad for p in worker.model.parameters())
    assert not any(t.requires_grad for t in (*worker.sources.base.values(), *worker.sources.deltas.values()))
    assert all(torch.equal(before[n], worker.sources.base[n]) for n in before)


def test_zero_steps_return_the_start(setup):
    space = setup["prep"].space
    res = _fitter(setup, steps=0).fit()
    np.testing.assert_array_equal(res.genome, space.x0)
    assert res.recipe.hash == space.decode(space.x0).hash and len(res.history) == 1


def test_the_same_seed_gives_the_same_fit(setup):
    space, worker = setup["prep"].space, setup["worker"]

    def fit(seed: int) -> list[float]:
        f = AdaMerging(space, worker, AdaMergingConfig(steps=2, lr=0.05, subset=6), seed=seed, batch_size=32)
        return f.fit().genome.tolist()

    a = fit(0)
    assert fit(0) == a
    assert fit(1) != a  # another seed draws other examples


def test_the_functional_model_is_the_recipes_model(setup, fitted):
    from evomerge.merge.materialize import materialize_state_dict

    fitter = _fitter(setup, steps=0)
    with torch.no_grad():
        params = fitter.merged(torch.tensor(fitted.genome, dtype=torch.float64))
    sd = materialize_state_dict(fitted.recipe, setup["cfg"].sources)
    live = dict(setup["worker"].model.named_parameters())
    for ckpt, name in fitter.targets.items():
        torch.testing.assert_close(params[name], sd[ckpt], rtol=1e-5, atol=1e-6)
        assert params[name].shape == live[name].shape


def test_the_fitted_recipe_merges_to_disk_and_in_place_with_the_same_bits(setup, fitted):
    from safetensors.torch import load_file

    from evomerge.merge.materialize import materialize_to_disk

    out = materialize_to_disk(fitted.recipe, setup["tmp"] / "merged", paths=setup["cfg"].sources)
    disk: dict[str, torch.Tensor] = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        disk.update(load_file(f))
    worker = setup["worker"]
    worker.merger.apply(fitted.recipe)
    worker._merged = None
    for name, live in worker.merger.targets.items():
        assert torch.equal(live, disk[name]), name


def test_start_from_starts_the_search_at_the_fitted_genome(setup, fitted, tmp_path):
    prep = setup["prep"]
    write_fit(tmp_path, fitted, AdaMergingConfig(steps=4, lr=0.05), prep.space, {})
    assert json.loads((tmp_path / "summary.json").read_text())["recipe_hash"] == fitted.recipe.hash
    cfg = _cfg(setup["zoo"], setup["suite"], setup["tmp"] / "runs", start_from=str(tmp_path))
    started = preflight(cfg)
    np.testing.assert_array_equal(started.optimizer.problem.x0, fitted.genome)
    with pytest.raises(ConfigError, match=r"space.start_from: .* another search space"):
        load_start(tmp_path / START_FILE, preflight(_cfg(setup["zoo"], setup["suite"], setup["tmp"],
                                                         template="builtin:task-arithmetic-global")).space)
    bad = json.loads((tmp_path / START_FILE).read_text())
    bad["genome"][0] = 2.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"space.start_from: .*bad.json: genome must hold"):
        load_start(tmp_path / "bad.json", prep.space)
    with pytest.raises(ValueError, match="start_from and warm_start"):
        _cfg(setup["zoo"], setup["suite"], tmp_path, start_from=str(tmp_path), warm_start={})


def test_a_space_that_is_not_task_arithmetic_weights_is_refused(setup):
    prep = preflight(_cfg(setup["zoo"], setup["suite"], setup["tmp"], template="builtin:ties-per-layer"))
    with pytest.raises(ConfigError, match="space.template: adamerging fits task_arithmetic"):
        AdaMerging(prep.space, setup["worker"], AdaMergingConfig(), seed=0, batch_size=32)


def test_the_command_writes_the_fit_and_refuses_bad_input(setup, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    cfg = setup["cfg"].model_dump(mode="json") | {"output_dir": str(tmp_path / "runs")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["adamerge", str(path), "--steps", "1", "--no-score"])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "runs" / "adamerging-ada"
    assert {p.name for p in folder.iterdir()} == {"recipe.yaml", START_FILE, "log.jsonl", "summary.json"}
    assert len((folder / "log.jsonl").read_text().splitlines()) == 2
    load_start(folder, setup["prep"].space)
    again = CliRunner().invoke(app, ["adamerge", str(path), "--steps", "1", "--no-score"])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(app, ["adamerge", str(path), "--lr", "0", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "lr" in bad.output and not (tmp_path / "x").exists()


def test_balance_weighs_most_the_task_whose_entropy_fell_least(setup):
    res = _fitter(setup, steps=3, lr=0.05, balance=20.0).fit()
    first = res.history[0]["tasks"]
    assert res.history[0]["weights"] == [0.5, 0.5]  # nothing is known before the first step
    for prev, rec in zip(res.history[:-2], res.history[1:-1], strict=True):
        ratio = {t: prev["tasks"][t] / first[t] for t in first}
        w = dict(zip(first, rec["weights"], strict=True))
        assert sum(w.values()) == pytest.approx(1.0)
        assert max(w, key=w.get) == max(ratio, key=ratio.get)


def test_the_likelihood_objective_is_the_reference_answers_nll_and_falls(setup):
    """``likelihood``: the step-0 loss is the mean per-token NLL of each task's reference answers (answer + stop
    string after the scorer's prompt ids), computed here by the live model merged in place at the start; the fit
    lowers it without a generation pass."""
    space, worker = setup["prep"].space, setup["worker"]
    res = _fitter(setup, steps=4, lr=0.05, objective="likelihood").fit()
    worker.merger.apply(space.decode(space.x0))
    worker._merged = None
    tok = worker.tokenizer
    want = []
    for task in worker.suite.tasks:
        nll = count = 0.0
        for ex in task.examples("calibration"):
            prompt = tok(task.spec.fewshot_prefix + ex.prompt, add_special_tokens=False)["input_ids"]
            answer = tok(ex.answer + "\n", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            labels = ids.clone()
            labels[0, :len(prompt)] = -100
            with torch.no_grad():
                out = worker.model(input_ids=ids, labels=labels)
            nll += float(out.loss) * len(answer)
            count += len(answer)
        want.append(nll / count)
    assert res.history[0]["tasks"] == pytest.approx(dict(zip([t.name for t in worker.suite.tasks], want,
                                                                strict=True)), rel=1e-4)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.98 and not np.array_equal(res.genome, res.x0)
    assert res.cost.generation_passes == 0 and res.cost.gradient_passes == 4
    entropy = _fitter(setup, steps=4, lr=0.05).fit()
    assert not np.allclose(entropy.genome, res.genome)  # the objective changes the fit


def test_the_likelihood_objective_refuses_refresh(setup, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    with pytest.raises(ValueError, match="refresh"):
        AdaMergingConfig(objective="likelihood", refresh=2)
    cfg = setup["cfg"].model_dump(mode="json") | {"output_dir": str(tmp_path / "runs")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for flags, field in ((["--objective", "likelihood", "--refresh", "2"], "refresh"),
                         (["--objective", "accuracy"], "objective")):
        res = CliRunner().invoke(app, ["adamerge", str(path), "--steps", "1", *flags])
        assert res.exit_code == 2 and field in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "runs").exists()
    res = CliRunner().invoke(app, ["adamerge", str(path), "--steps", "1", "--objective", "likelihood",
                                   "--no-score"])
    assert res.exit_code == 0 and "likelihood" in res.output, res.output
    summary = json.loads((tmp_path / "runs" / "adamerging-ada" / "summary.json").read_text())
    assert summary["objective"] == "likelihood" and summary["loss"]["fitted"] < summary["loss"]["start"]


def test_regmean_scales_fit_the_merge_a_candidate_gets(setup, tmp_path):
    """``builtin:regmean-per-layer``: the fit over RegMean's task-vector scales builds the merge from the projected
    task vectors (RegMean on the linear weights, the fallback elsewhere), which at any genome is the
    materializer's merge of the decoded recipe; the likelihood fit lowers its loss; the command computes the
    statistics into the fit's own folder; without statistics the fit is refused."""
    import dataclasses

    from evomerge.driver.adamerging import run_adamerging
    from evomerge.driver.run import search_stats
    from evomerge.merge.materialize import materialize_state_dict

    overrides = {"init": {"scale": 1.5}, "fixed": {"alpha": 0.5},
                 "data": {"suite": str(setup["suite"]), "examples": 8}}
    cfg = _cfg(setup["zoo"], setup["suite"], tmp_path / "runs", template="builtin:regmean-per-layer",
               overrides=overrides)
    prep = preflight(cfg)
    with pytest.raises(ConfigError, match="reads calibration statistics"):
        AdaMerging(prep.space, Worker(prep.spec), AdaMergingConfig(objective="likelihood"), seed=0, batch_size=32)
    worker = Worker(dataclasses.replace(prep.spec, stats_files=search_stats(prep, tmp_path / "stats")))
    fitter = AdaMerging(prep.space, worker, AdaMergingConfig(objective="likelihood", steps=3, lr=0.05), seed=0,
                        batch_size=32)
    u = np.random.default_rng(1).random(prep.space.dim)
    with torch.no_grad():
        params = fitter.merged(torch.tensor(u, dtype=torch.float64))
    recipe = prep.space.decode(u)
    sd = materialize_state_dict(recipe, cfg.sources, stats=worker.stats)
    def over_n(v):  # scale s is task arithmetic at weight s / n where the Gram matrices are equal
        return {k: over_n(x) for k, x in v.items()} if isinstance(v, dict) else (
            [x / 2 for x in v] if isinstance(v, list | tuple) else v / 2)

    ta = materialize_state_dict(Recipe(method="task_arithmetic", base_model="base", models=tuple(
        {"model": m.model, "parameters": {"weight": over_n(m.parameters["scale"])}} for m in recipe.models)),
        cfg.sources)
    q = "model.layers.0.self_attn.q_proj.weight"
    for ckpt, name in fitter.targets.items():
        torch.testing.assert_close(params[name], sd[ckpt], rtol=1e-4, atol=1e-5)
    norm = "model.layers.0.input_layernorm.weight"  # the fallback (linear) of the scaled task vectors
    torch.testing.assert_close(sd[norm], ta[norm], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sd[q], ta[q], atol=1e-4)  # on linear weights the Gram matrices act
    res = fitter.fit()
    assert res.history[-1]["loss"] < res.history[0]["loss"] and not np.array_equal(res.genome, res.x0)
    out = run_adamerging(cfg, AdaMergingConfig(objective="likelihood", steps=1, lr=0.05), tmp_path / "fit", score=False)
    assert (out / START_FILE).is_file() and list((out / "cache" / "stats").glob("stats-*.safetensors"))
