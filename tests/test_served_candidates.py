"""Candidates whose recipe was already scored are served from that result, and the search goes on asking."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evomerge.driver.run import start_run
from evomerge.results import RunResults


def test_a_space_with_few_recipes_spends_its_whole_budget(zoo_test, tmp_path: Path) -> None:
    """Layer swapping over the test zoo has a handful of distinct recipes: random search repeats them. Each repeat
    is served from the earlier result (no second scoring) and counts toward the budget; the run must not end at
    the first one served while nothing is in flight."""
    cfg = {
        "name": "swap", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "sources": {"base": str(zoo_test.base), "add": str(zoo_test.expert("add")), "rev": str(zoo_test.expert("rev"))},
        "base_model": "base", "space": {"template": "builtin:layer-swap"},
        "fitness": {"suite": "builtin:zoo-2", "batch_size": 200},
        "optimizer": {"name": "random", "options": {"x0_first": True}},
        "budget": {"evaluations": 12}, "resources": {"threads_per_worker": 1},
    }
    path = tmp_path / "swap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start_run(path)
    run = tmp_path / "runs" / "swap"
    searched = [r for r in RunResults(run).calib if r.candidate_id >= 0]
    assert sorted(r.candidate_id for r in searched) == list(range(12))
    evals = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    served = [e for e in evals if e["event"] == "eval" and e["candidate"] >= 0 and (e.get("timings") or {}).get("cached")]
    distinct = {e["hash"] for e in evals if e["event"] == "eval" and e["candidate"] >= 0}
    assert served and len(distinct) + len(served) == 12


def test_a_layer_swap_search_with_transition_zones_scores_blended_layers_as_their_merged_folder(zoo_test, tmp_path):
    """The worker routes a blended layer through its live linear merge ("@merge"); the archived scores of such a
    candidate equal those of the folder the recipe merges to on disk, example for example."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.materialize import materialize_to_disk
    from evomerge.scoring.base import make_scorer
    from evomerge.scoring.suite import load_suite

    template = tmp_path / "swap.yaml"
    template.write_text(yaml.safe_dump({"kind": "layer_swap", "max_k": 1, "transition": {"max": 2}}))
    paths = {"base": str(zoo_test.base), "add": str(zoo_test.expert("add")), "rev": str(zoo_test.expert("rev"))}
    cfg = {
        "name": "zones", "seed": 1, "output_dir": str(tmp_path / "runs"), "sources": paths, "base_model": "base",
        "space": {"template": str(template)}, "fitness": {"suite": "builtin:zoo-2", "batch_size": 200},
        "optimizer": {"name": "random"}, "budget": {"evaluations": 8}, "resources": {"threads_per_worker": 1},
    }
    path = tmp_path / "zones.yaml"
    path.write_text(yaml.safe_dump(cfg))
    start_run(path)
    searched = [r for r in RunResults(tmp_path / "runs" / "zones").calib if r.candidate_id >= 0]
    hybrid = [r for r in searched if r.recipe.method == "linear"]
    assert hybrid and all(r.ok for r in searched)
    rec = hybrid[0]
    assert any(s.model == "@merge" for s in rec.recipe.routing.steps)
    folder = materialize_to_disk(rec.recipe, tmp_path / "merged", paths=paths)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    got = make_scorer("hf", batch_size=200).score(model, AutoTokenizer.from_pretrained(zoo_test.base),
                                                  load_suite("builtin:zoo-2"), split="calibration")
    for task, ts in rec.result.tasks.items():
        assert got.tasks[task].scores.tolist() == ts.scores.tolist(), task
