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
