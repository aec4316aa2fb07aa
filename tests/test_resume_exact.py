"""Exact resume: a run crashed at seeded random moments and resumed after each crash ends identical to the
uninterrupted run — every optimizer, with and without multi-fidelity promotions, in every phase.

A crash is injected in-process right after the k-th archive write or the k-th checkpoint write (the two moments
whose order a SIGKILL can catch differently; every other moment leaves the same files as one of these): a
``BaseException`` unwinds the driver without any of its exit handling, like a SIGKILL. The moments are printed
with each case so a failure reproduces. ``test_driver.py`` SIGKILLs real processes through the CLI.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from evomerge.archive import Archive
from evomerge.driver import journal as journal_mod
from evomerge.driver.run import resume_run, start_run
from evomerge.errors import CheckpointError
from evomerge.testing.family import build_family, write_perplexity_suite, write_run_config
from evomerge.testing.runs import archive_rows, decided_state, duplicates


class Crash(BaseException):
    """Stands for a SIGKILL: nothing catches it."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    fam = build_family(root / "fam", 2)
    return fam, write_perplexity_suite(root / "suite"), _choice_suite(root / "choice")


def _choice_suite(root: Path) -> Path:
    """Two multiple-choice tasks (0/1 per-example scores, which M2N2's fitness sharing needs)."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for task, alphabet in (("digits", "0123456789"), ("letters", "abcdefghij")):
        for split in ("calibration", "test"):
            lines = []
            for i in range(8):
                opts = ["".join(rng.choice(list(alphabet), 4)) for _ in range(3)]
                lines.append(json.dumps({"id": f"{task}-{split}-{i}", "prompt": "".join(rng.choice(list(alphabet), 6)),
                                         "options": opts, "answer": int(rng.integers(3))}))
            (root / f"{task}.{split}.jsonl").write_text("\n".join(lines) + "\n")
    suite = root / "suite.yaml"
    suite.write_text("name: choice\ntasks:\n" + "".join(
        f"  - {{name: {t}, kind: choice, data: {{calibration: {t}.calibration.jsonl, test: {t}.test.jsonl}}}}\n"
        for t in ("digits", "letters")))
    return suite


MULTI = {"fidelity": {"subset": 3, "promote_quantile": 0.4, "rescore_test": True}}
#: The anchor subset: chosen from the baselines' full-set scores, kept in the run folder, promoted by its estimate.
ANCHOR = {"fidelity": {"subset": 3, "subset_method": "anchor", "promote_quantile": 0.4, "rescore_test": True}}
CASES = {
    "cma_es": ("cma_es", {"popsize": 4}, "builtin:ties-per-layer"),
    "nevergrad": ("nevergrad", {"optimizer": "TwoPointsDE"}, "builtin:ties-per-layer"),
    "m2n2": ("m2n2", {"archive_size": 4}, "builtin:segments"),  # scored on the choice suite
    "random": ("random", {}, "builtin:ties-per-layer"),
    "optuna": ("optuna", {"sampler": "TPESampler", "sampler_options": {"n_startup_trials": 3}}, "builtin:ties-per-layer"),
    # three design points, then GP proposals (a cheap acquisition optimization keeps the case fast)
    "bo": ("bo", {"n_init": 3, "raw_samples": 16, "num_restarts": 1, "acqf_maxiter": 15, "mc_samples": 16},
           "builtin:ties-per-layer"),
    # warm start: the task-arithmetic grid is scored with the baselines, CMA-ES starts at the best weight
    "warm": ("cma_es", {"popsize": 4, "sigma0": 0.1, "x0_first": True}, "builtin:task-arithmetic-per-layer"),
}
WARM = {"space": {"template": "builtin:task-arithmetic-per-layer", "warm_start": {"weights": [0.3, 0.7, 1.1]}}}


class Crasher:
    """Raises :class:`Crash` after the n-th archive append or checkpoint save counted from ``arm``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.target: tuple[str, int] | None = None
        self.counts = {"archive": 0, "checkpoint": 0}
        orig_append = Archive.append
        orig_save = journal_mod.save_checkpoint

        def append(archive, *a, **kw):
            seq = orig_append(archive, *a, **kw)
            self._tick("archive")
            return seq

        def save(*a, **kw):
            path = orig_save(*a, **kw)
            self._tick("checkpoint")
            return path

        monkeypatch.setattr(Archive, "append", append)
        monkeypatch.setattr(journal_mod, "save_checkpoint", save)

    def arm(self, kind: str, n: int) -> None:
        self.target, self.counts = (kind, n), {"archive": 0, "checkpoint": 0}

    def _tick(self, kind: str) -> None:
        self.counts[kind] += 1
        if self.target == (kind, self.counts[kind]):
            self.target = None
            raise Crash(kind)


def _config(tmp_path: Path, setup, case: str, multi: bool | dict, name: str, evals: int) -> Path:
    fam, suite, choice = setup
    opt, options, template = CASES[case] if case != "early" else CASES["cma_es"]
    suite = choice if opt == "m2n2" or case == "early" else suite
    fidelity = multi if isinstance(multi, dict) else MULTI if multi else {}
    extra = {**fidelity, **(WARM if case == "warm" else {})}
    return write_run_config(tmp_path / f"{name}.yaml", fam, suite, name=name, evals=evals, optimizer=opt,
                            options=options, template=template, extra=extra)


@pytest.mark.parametrize("multi", [False, True], ids=["full", "multi-fidelity"])
@pytest.mark.parametrize("case", list(CASES))
def test_crash_anywhere_then_resume_equals_uninterrupted(setup, tmp_path, monkeypatch, case, multi):
    _crash_anywhere_and_resume(setup, tmp_path, monkeypatch, case, multi)


def test_crash_anywhere_with_an_anchor_subset_then_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    run_dir = _crash_anywhere_and_resume(setup, tmp_path, monkeypatch, "cma_es", ANCHOR)
    assert (run_dir / "calibration_subset.json").read_text() == (tmp_path / "runs/ref/calibration_subset.json").read_text()
    rows = [r for r in archive_rows(run_dir) if r[0] >= 0 and r[2] == "calibration"]
    cheap, promoted = [r for r in rows if r[3] == "anchor:3"], [r for r in rows if r[3] == "full"]
    assert len(cheap) == 8 and 0 < len(promoted) < len(cheap)
    chosen = {t: p["chosen"] for t, p in json.loads((run_dir / "calibration_subset.json").read_text())["tasks"].items()}
    with Archive(run_dir / "archive.sqlite", readonly=True) as a:
        for r in a.records(fidelity="anchor:3"):  # the worker scored exactly the chosen examples
            assert {t: list(ts.example_ids) for t, ts in r.result.tasks.items()} == chosen
            assert set(r.meta["estimate"]) == set(chosen)  # with its estimate of the full-set score


def _crash_anywhere_and_resume(setup, tmp_path, monkeypatch, case, multi) -> Path:
    from evomerge.export import export_run

    evals = 8
    ref_dir = start_run(_config(tmp_path, setup, case, multi, "ref", evals))
    expected = archive_rows(ref_dir)
    crasher = Crasher(monkeypatch)
    rng = np.random.default_rng([zlib.crc32(case.encode()), bool(multi)])
    # seeded moments: (what, after how many writes of it since the (re)start); printed for a reproduction
    moments = [("archive" if rng.random() < 0.6 else "checkpoint", int(rng.integers(1, 12))) for _ in range(4)]
    print(f"{case} multi={multi}: crashes after {moments}")
    cfg = _config(tmp_path, setup, case, multi, "k", evals)
    run_dir = tmp_path / "runs" / "k"
    crashes = 0
    for kind, n in moments:
        crasher.arm(kind, n)
        try:
            if (run_dir / "archive.sqlite").exists():
                resume_run(run_dir)
            else:
                start_run(cfg)
        except Crash:
            crashes += 1
            continue
        break
    crasher.target = None
    resume_run(run_dir)  # finishes the run (a no-op replay when it already finished)
    assert crashes >= 2, f"the moments {moments} crashed only {crashes} times"
    got = archive_rows(run_dir)
    assert duplicates(got) == 0, "an evaluation was stored twice"
    assert got == expected
    assert decided_state(run_dir) == decided_state(ref_dir)
    a = export_run(ref_dir, pick="best", out=tmp_path / "ea")[0]
    b = export_run(run_dir, pick="best", out=tmp_path / "eb")[0]
    assert (a / "recipe.yaml").read_text() == (b / "recipe.yaml").read_text()
    return run_dir


def test_every_prefix_of_a_promoting_run_resumes_exactly(setup, tmp_path, monkeypatch):
    """A crash after each single archive write of a multi-fidelity CMA-ES run, resumed each time."""
    evals = 6
    ref_dir = start_run(_config(tmp_path, setup, "cma_es", True, "ref", evals))
    expected = archive_rows(ref_dir)
    crasher = Crasher(monkeypatch)
    run_dir = tmp_path / "runs" / "k"
    cfg = _config(tmp_path, setup, "cma_es", True, "k", evals)
    crashes = 0
    while True:
        crasher.arm("archive", 1)
        try:
            resume_run(run_dir) if run_dir.exists() else start_run(cfg)
        except Crash:
            crashes += 1
            continue
        break
    assert crashes == len(expected)  # the last write's crash leaves nothing to do but the final checkpoint
    assert archive_rows(run_dir) == expected
    assert decided_state(run_dir) == decided_state(ref_dir)


def test_an_archive_that_is_not_this_runs_is_refused_naming_the_row(setup, tmp_path):
    """A resumed run whose config no longer matches its archive (here: the seed was edited) stops at the first
    archived evaluation the config would not have made, instead of mixing two runs."""
    import yaml

    run_dir = start_run(_config(tmp_path, setup, "random", False, "a", 3))
    path = run_dir / "config.resolved.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["seed"] = 7
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    before = archive_rows(run_dir)
    with pytest.raises(CheckpointError, match=r"evaluation \d+ \(candidate -?\d+, full, calibration\) is not what "
                                              r"this run evaluates at that point"):
        resume_run(run_dir)
    assert archive_rows(run_dir) == before  # nothing was added


def test_crash_anywhere_with_early_stopping_then_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    """fidelity.early_stop: the bound travels with each job, so a replay rebuilds the same jobs; stopped
    candidates are archived with their partial scores and fidelity ``stopped``, never as full-set scores."""
    early = {"fidelity": {"early_stop": "mean", "early_stop_chunks": 4, "rescore_test": True}}
    run_dir = _crash_anywhere_and_resume(setup, tmp_path, monkeypatch, "early", early)
    rows = [r for r in archive_rows(run_dir) if r[0] >= 0 and r[2] == "calibration"]
    stopped = [r for r in rows if r[3] == "stopped"]
    assert stopped and len(stopped) < len(rows)
    with Archive(run_dir / "archive.sqlite", readonly=True) as a:
        for r in a.records(fidelity="stopped"):
            assert all(0 < len(ts.scores) < 8 for ts in r.result.tasks.values())  # the chunks it was scored on
        tested = {r.recipe_hash for r in a.records(split="test") if r.candidate_id >= 0}
    assert not tested & {r[1] for r in stopped} - {r[1] for r in rows if r[3] == "full"}
