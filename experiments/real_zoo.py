"""The real zoo's reference table, and what its fine-tunes keep of the base's general abilities (CPU).

    python experiments/real_zoo.py --zoo zoo/real            # builds the zoo first if needed (~27 min)
    python experiments/real_zoo.py --zoo zoo/real --size real-test --results /tmp/real_zoo_test.md   # smoke run

Builds (or reuses) ``evomerge zoo build DIR --size real`` and writes ``experiments/results/real_zoo.md``: the
build time of every step and the manifest's reference table (every model on every task and split of
``builtin:real``, greedy exact match, measured while building), then every model scored here on
``builtin:real-general`` (a multiple-choice capital lookup, and the mean token log-likelihood of plain English
sentences) on both splits with the hf scorer.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.scoring import load_suite, make_scorer
from evomerge.testing.real import build_real_zoo, reference_table

log = logging.getLogger("real_zoo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path("zoo/real"))
    ap.add_argument("--size", default="real")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "real_zoo.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    manifest = build_real_zoo(args.zoo, args.size, args.seed)
    suite = load_suite("builtin:real-general")
    scorer = make_scorer("hf", batch_size=16, threads=None)
    general: dict[str, dict[str, dict[str, float]]] = {}
    t0 = time.perf_counter()
    for name in manifest.models:
        tok = AutoTokenizer.from_pretrained(manifest.path(name))
        model = AutoModelForCausalLM.from_pretrained(manifest.path(name), dtype=torch.float32)
        general[name] = {}
        for split in ("calibration", "test"):
            out = scorer.score(model, tok, suite, split=split)
            general[name][split] = {t: float(ts.mean) for t, ts in out.tasks.items()}
        log.info("%s: %s", name, general[name])
    seconds = time.perf_counter() - t0
    build = manifest.build_seconds
    lines = [
        f"# Real zoo ({manifest.size.name}, seed {manifest.seed})",
        "",
        f"`python experiments/real_zoo.py --zoo {args.zoo} --size {args.size}`, {date.today()}, "
        f"{platform.machine()}, {manifest.num_threads} torch thread(s) for the build, torch "
        f"{manifest.torch_version}, transformers {manifest.transformers_version}; base: "
        f"{manifest.base_source['package']} ({manifest.base_source['file']}).",
        "",
        "Build seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in build.items()) + ".",
        f"Training steps: {manifest.steps}.",
        "",
        "## builtin:real (greedy exact match; calibration 60, test 120 examples per task)",
        "",
        reference_table(manifest),
        "",
        "## builtin:real-general (capital: accuracy over 4 options; text: mean token log-likelihood)",
        "",
        "| model | capital (cal) | text (cal) | capital (test) | text (test) |",
        "|---|---|---|---|---|",
    ]
    for name, ref in general.items():
        cells = [f"{ref[s][t]:.3f}" for s in ("calibration", "test") for t in suite.names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Scoring builtin:real-general: {seconds:.0f} s for {len(general)} models."]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
