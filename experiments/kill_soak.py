"""Kill soak: SIGKILL a real `evomerge run` (its whole process group) at seeded random moments, `evomerge resume`
after each kill, and compare the result with an uninterrupted run of the same config and seed.

Compared: every archive row (candidate id, recipe hash, split, fidelity, status, per-example scores, bit for
bit), duplicates (an evaluation stored twice), the final checkpoint's state (without the clock; the optimizer's
next proposals instead of its opaque blob), the exported recipe and the report's files. Kills land in every
phase, the report and the export included (the CLI writes them after the search).

    python experiments/kill_soak.py --zoo zoo/demo --kills 50 --seed 0 [--evals 40] [--out runs/soak]

Default problem: the demo zoo's add and rev experts, builtin:ties-per-layer, cma_es popsize 6, multi-fidelity
(subset 40, promote quantile 0.3, test re-scoring), 40 evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from evomerge.testing.runs import archive_rows, decided_state, duplicates


def config(zoo: Path, out: Path, evals: int, name: str) -> Path:
    doc = {
        "name": name, "seed": 0, "output_dir": str(out),
        "sources": {"base": str(zoo / "base"), "add": str(zoo / "expert_add"), "rev": str(zoo / "expert_rev")},
        "base_model": "base", "space": {"template": "builtin:ties-per-layer"},
        "fitness": {"suite": "builtin:zoo-2", "scorer": "hf", "batch_size": 100},
        "optimizer": {"name": "cma_es", "options": {"popsize": 6}},
        "budget": {"evaluations": evals},
        "fidelity": {"subset": 40, "promote_quantile": 0.3, "rescore_test": True},
        "resources": {"threads_per_worker": 1},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", *args]


def phase_of(run_dir: Path) -> str:
    """Where the run stood when it was killed: the checkpoint's phase, then report / export if they exist."""
    from evomerge.checkpoint import read_checkpoint

    if not (run_dir / "config.resolved.yaml").exists():
        return "preflight"
    try:
        ckpt = read_checkpoint(run_dir)
    except Exception:  # noqa: BLE001 - reported as unreadable, the resume decides
        return "unreadable"
    phase = "baselines" if ckpt is None else str(ckpt.state.get("phase"))
    if phase == "done":
        return "export" if (run_dir / "report").exists() else "report"
    return phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path("zoo/demo"))
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--min-s", type=float, default=2.0)
    ap.add_argument("--max-s", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = ap.parse_args()
    if not (args.zoo / "zoo.json").is_file():
        subprocess.run(cli("zoo", "build", str(args.zoo), "--size", "demo"), check=True)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    log = open(args.out / "soak.log", "ab")  # noqa: SIM115 - every process's output, for a failure's cause
    quiet = {"stdout": log, "stderr": log, "env": env}

    t0 = time.monotonic()
    subprocess.run(cli("run", str(config(args.zoo, args.out, args.evals, "ref"))), check=True, **quiet)
    ref_s = time.monotonic() - t0
    ref = args.out / "ref"

    cfg = config(args.zoo, args.out, args.evals, "k")
    run_dir = args.out / "k"
    rng = np.random.default_rng(args.seed)
    moments = [float(rng.uniform(args.min_s, args.max_s)) for _ in range(args.kills)]
    print(f"reference run {ref_s:.0f} s; {args.kills} SIGKILLs after {[f'{m:.1f}' for m in moments]} s", flush=True)
    phases: Counter[str] = Counter()
    kills = 0
    t0 = time.monotonic()
    for moment in moments:
        argv = cli("resume", str(run_dir)) if (run_dir / "config.resolved.yaml").exists() else cli("run", str(cfg))
        proc = subprocess.Popen(argv, start_new_session=True, **quiet)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            phase = phase_of(run_dir)
            phases[phase] += 1
            print(f"kill {kills} after {moment:.1f} s: {phase}", flush=True)
            continue
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode} after {kills} kills (see {args.out / 'soak.log'})")
        break  # the run finished before the next kill
    done = subprocess.run(cli("resume", str(run_dir)), **quiet)  # finish (a no-op replay if it already finished)
    if done.returncode != 0:
        raise SystemExit(f"final resume exited {done.returncode} (see {args.out / 'soak.log'})")
    soak_s = time.monotonic() - t0

    got, expected = archive_rows(run_dir), archive_rows(ref)
    dup = duplicates(got)
    same_rows = got == expected
    same_state = decided_state(run_dir) == decided_state(ref)
    same_export = (run_dir / "export" / "recipe.yaml").read_text() == (ref / "export" / "recipe.yaml").read_text()
    report_ok = all((run_dir / "report" / f).is_file() for f in ("report.md", "pareto.png", "progress.png"))
    leftovers = sorted(p.name for p in run_dir.iterdir() if ".tmp-" in p.name)
    result = {
        "kills": kills, "kills_by_phase": dict(phases), "rows": len(got), "expected_rows": len(expected),
        "duplicates": dup, "rows_equal": same_rows, "state_equal": same_state, "export_equal": same_export,
        "report_complete": report_ok, "leftover_temp_folders": leftovers,
        "reference_s": round(ref_s, 1), "soak_s": round(soak_s, 1), "seed": args.seed, "evals": args.evals,
    }
    print(json.dumps(result, indent=1))
    ok = same_rows and same_state and same_export and report_ok and dup == 0 and not leftovers
    print("EQUAL to the uninterrupted run" if ok else "DIFFERENT from the uninterrupted run")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
