"""Runs that cannot score: stop strings a tokenizer cannot spell still work; a run whose every evaluation
failed ends with one line giving the first error (exit code 2), never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ScoreError
from evomerge.results import RunResults
from evomerge.testing.family import build_family, write_perplexity_suite, write_run_config
from evomerge.testing.tokenizer import ALPHABET, build_tokenizer


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("failed")
    return root, build_family(root / "fam", 2), write_perplexity_suite(root / "suite")


def _generate_suite(root: Path) -> Path:
    """One ``generate`` task with the default stop string (a newline)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, start in (("calibration", 0), ("test", 50)):
        rows = [{"id": f"{split}-{i}", "prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(start, start + 4)]
        (root / f"add.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = root / "suite.yaml"
    suite.write_text("name: add\ntasks:\n  - {name: add, kind: generate, max_new_tokens: 4,"
                     " data: {calibration: add.calibration.jsonl, test: add.test.jsonl}}\n")
    return suite


def test_a_stop_string_the_tokenizer_cannot_spell_still_stops_on_the_text(family, tmp_path):
    root, fam, _ = family
    # the same models with a char-level tokenizer that has no newline token
    tok = build_tokenizer(ALPHABET.replace("\n", ""))
    assert "\n" not in tok.get_vocab()
    models = {name: tmp_path / "models" / name for name in fam}
    for name, folder in fam.items():
        shutil.copytree(folder, models[name])
        tok.save_pretrained(models[name])
    cfg = write_run_config(tmp_path / "cfg.yaml", models, _generate_suite(tmp_path / "suite"), name="nl", evals=4)
    res = CliRunner().invoke(app, ["run", str(cfg), "--no-export"])
    assert res.exit_code == 0, res.output
    r = RunResults(tmp_path / "runs" / "nl")
    failed = [x.result.error for x in r.records if not x.ok]
    assert not failed, failed
    assert len([x for x in r.calib if x.candidate_id >= 0]) == 4
    assert {x.meta["baseline"] for x in r.calib if x.candidate_id < 0} >= {"base", "m1", "m2"}


def test_a_run_whose_every_evaluation_failed_ends_with_the_first_error(family, tmp_path, monkeypatch):
    from evomerge.scoring.scorers.hf import HfScorer

    root, fam, suite = family

    def broken(self, *args, **kwargs):
        raise ScoreError("the scorer broke")

    monkeypatch.setattr(HfScorer, "score", broken)
    cfg = write_run_config(tmp_path / "cfg.yaml", fam, suite, name="dead", evals=4)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if "error:" in line]
    assert len(lines) == 1, res.output
    assert "RunFailedError" in lines[0] and "ScoreError: the scorer broke" in lines[0], lines[0]
    assert "baseline 'base'" in lines[0] and "evaluations" in lines[0], lines[0]
    run_dir = tmp_path / "runs" / "dead"
    # the run folder keeps the record of what failed; nothing was reported or exported
    assert (run_dir / "archive.sqlite").is_file()
    assert not (run_dir / "report").exists() and not (run_dir / "export").exists()
    assert all(not x.ok for x in RunResults(run_dir).records)
    for cmd in (["report", str(run_dir)], ["export", str(run_dir)]):
        again = runner.invoke(app, cmd)
        assert again.exit_code == 2 and "the scorer broke" in again.output, (cmd, again.output)
        assert "Traceback" not in again.output
