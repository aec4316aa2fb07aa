"""Merge benchmark: in-place merge throughput against memory bandwidth, and merge-to-disk against mergekit.

Builds its own sources in a temporary folder (a random Llama "base" and three "fine-tunes" = base + small
noise, float32 safetensors, deleted at the end), then measures:

* **in place** — :class:`~evomerge.merge.materialize.InPlaceMerger` over resident sources (loaded once),
  merging 3-source recipes (ties, dare_ties, task_arithmetic, linear; per-layer weights and densities) into a
  live ``LlamaForCausalLM``; best of N after one warm-up, at each ``--threads`` count. *Bytes touched* per
  merge = for every merged tensor, the resident base and each task vector read once plus the live parameter
  written once: ``(N + 2) x tensor bytes`` with N = 3. It is reported per second and over the memory-copy
  bandwidth measured in the same process at the same thread count (``Tensor.copy_`` of a 256 MiB buffer,
  best of 5, read + write bytes): a ratio of 1 means the merge costs what copying its inputs and output once
  costs. Minor page faults per merge show how much freshly allocated memory the kernel zeroes.
  Each method runs as the library runs it (the fused kernels of :mod:`evomerge.merge.kernels` for ties,
  task_arithmetic and linear on large tensors; the first merge compiles them and is timed apart) and, unless
  ``--no-eager``, with the fused kernels off (the eager methods), in the same process.
* **where an eager TIES merge spends its time** — stages timed one by one, and the top aten operations of
  one library (fused) merge from ``torch.profiler``.
* **to disk** — ``evomerge merge recipe.yaml --out DIR`` (default shards, and shards of 2x the largest
  tensor) and, with ``--mergekit-bin``, ``mergekit-yaml mergekit.yaml OUT`` on the same recipe (exported with
  ``to_mergekit_yaml``), each a subprocess timed end to end, alternating, with peak RSS from
  ``/usr/bin/time -v`` and sampled anonymous / file-backed RSS. The two outputs are compared entry by entry;
  entries whose magnitude ties a top-k threshold are counted apart (mergekit's ``torch.topk`` keeps an
  implementation-defined subset of equal magnitudes, evomerge the lower indices).

* **on existing models** (``--zoo DIR``: a zoo folder with ``base/`` and three expert folders, e.g. the real
  zoo) — no synthetic sources and no in-place rows: for every method of ``--methods``, the merge to disk of
  both tools as above, one recipe each; agreement entry by entry (for DARE with mergekit run through
  ``experiments/mergekit_seeded.py``, which draws its masks from evomerge's per-tensor stream, and with
  mergekit's own masks by the norm and direction of the merged deltas); that both outputs hold the same
  tensors, load with transformers (output projection tied to the embedding) and generate; and the TIES stage
  split and profile over the zoo's task vectors.

    python experiments/bench_merge.py --mergekit-bin /work/mkvenv/bin/mergekit-yaml --sorted-magnitudes
    python experiments/bench_merge.py --size small --repeats 2 --disk-repeats 1     # quick smoke run
    python experiments/bench_merge.py --zoo /work/cache/realzoo-merge --build-real-zoo \
        --mergekit-bin /work/mkvenv/bin/mergekit-yaml --threads 1 --results experiments/results/merge_real.md

It prints a markdown report and writes it to ``experiments/results/bench_merge.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.io import ModelFolder, ModelWriter  # noqa: E402
from evomerge.merge.kernels import fused_kernels, set_cache_dir  # noqa: E402
from evomerge.merge.materialize import InPlaceMerger, ResidentSources  # noqa: E402
from evomerge.mergekit_compat import to_mergekit_yaml  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.testing.tokenizer import build_tokenizer  # noqa: E402

SIZES = {
    # ~55 MB: a quick smoke run
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
    # ~620 MB (155M parameters, float32)
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
}
DELTAS = ("ft1", "ft2", "ft3")
SORTED_METHODS = ("ties",)  # methods whose thresholds the sorted-magnitude cache serves
MiB = 2**20


# ----------------------------------------------------------------------------------------- sources
def llama_config(size: str) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SIZES[size], tie_word_embeddings=False, max_position_embeddings=2048,
                      torch_dtype="float32").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    return cfg


def live_model(config: dict, device: str = "cpu") -> torch.nn.Module:
    """An uninitialized ``LlamaForCausalLM`` (parameters allocated, never random-initialized)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    return model.to_empty(device=device).eval().requires_grad_(False)


def build_sources(folder: Path, size: str, seed: int = 0) -> dict[str, Path]:
    """Write ``base`` (random weights, norms at 1) and ``ft1..3`` = base + noise of std 2e-3 as HF folders."""
    config = llama_config(size)
    shapes = {n: p.shape for n, p in live_model(config).named_parameters()}
    tok_dir = folder / "tokenizer"
    build_tokenizer().save_pretrained(tok_dir)
    paths = {}
    for k, name in enumerate(("base", *DELTAS)):
        gen = torch.Generator().manual_seed(seed)
        noise = torch.Generator().manual_seed(seed + 1000 + k)
        with ModelWriter(folder / name, max_shard_bytes=2e9) as writer:
            for tname, shape in shapes.items():
                t = torch.ones(shape) if tname.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
                if k:
                    t += torch.randn(shape, generator=noise) * 2e-3
                writer.add(tname, t)
            paths[name] = writer.finish(config, tokenizer_from=tok_dir)
    return paths


def recipes(paths: dict[str, Path], deltas: tuple[str, ...] = DELTAS) -> dict[str, Recipe]:
    """3-source recipes with per-layer weights and densities (only the parameters each method reads);
    ``deltas`` names the three fine-tunes in ``paths`` (the base is ``base``)."""
    weights = dict(zip(deltas, ([0.2, 0.6], [0.5, 0.3], [0.4, 0.4, 0.8]), strict=True))
    densities = dict(zip(deltas, ([0.3, 0.7], [0.6, 0.4], 0.5), strict=True))
    out = {}
    for method, dense in [("ties", True), ("dare_ties", True), ("task_arithmetic", False), ("linear", False)]:
        models = [{"model": m, "parameters": {"weight": weights[m], **({"density": densities[m]} if dense else {})}}
                  for m in deltas]
        out[method] = Recipe.model_validate({
            "method": method, "models": models, "base_model": "base", "dtype": "float32", "seed": 7,
            "sources": {k: str(v) for k, v in paths.items()},
        })
    return out


# ----------------------------------------------------------------------------------------- timing
def best_of(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 256 * MiB, repeats: int = 5, device: str = "cpu") -> float:
    """Memory-copy bandwidth in bytes/s, counting read + write: ``2 * nbytes / best copy_ time``."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / min(best_of(lambda: dst.copy_(src), repeats))


def touched_bytes(sources: ResidentSources) -> int:
    """Bytes touched by one merge: resident base + every task vector read once, live parameter written once."""
    return sum(b.numel() * b.element_size() * (sources.deltas[n].shape[0] + 2) for n, b in sources.base.items())


def bench_in_place(
    sources: ResidentSources, model: torch.nn.Module, recipe: Recipe, repeats: int
) -> tuple[float, list[float]]:
    """(seconds of the first merge — it compiles the fused kernels it needs —, seconds of each timed merge)."""
    merger = InPlaceMerger(sources, model)
    t0 = time.perf_counter()
    merger.apply(recipe)
    first = time.perf_counter() - t0
    return first, best_of(lambda: merger.apply(recipe), repeats, warmup=0)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ----------------------------------------------------------------------------------------- where TIES time goes
def profile_merge(sources: ResidentSources, model: torch.nn.Module, recipe: Recipe, top: int = 10) -> list[tuple]:
    """Self CPU time per aten operation over one in-place merge: ``[(op, seconds, calls, share)]``."""
    from torch.profiler import ProfilerActivity, profile

    merger = InPlaceMerger(sources, model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        merger.apply(recipe)
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    rows.sort(key=lambda r: -r[1])
    return [(k, s, c, s / total) for k, s, c in rows[:top]]


def stage_split(sources: ResidentSources, model: torch.nn.Module, recipe: Recipe) -> dict[str, float]:
    """Seconds per stage of one TIES merge of every tensor, each stage timed on its own (best of 2 sweeps).

    ``threshold`` = magnitudes + exact top-k mask of each row (``largest_mask``); ``sparsify`` = the whole
    sparsification (copy of the deltas, threshold, mask multiply); ``method`` = the whole ``ties`` call
    (sparsify + sign election + mix + add base); ``finite`` = ``merge_tensor``'s NaN/inf check (a finite sum,
    the elementwise check only when the sum is not finite); ``copy`` =
    writing into the live parameter.
    """
    from evomerge.merge.materialize import MergePlan
    from evomerge.merge.methods.sparsify import largest_mask, sparsify
    from evomerge.merge.tensor_params import tensor_params

    plan = MergePlan.build(recipe, sources.num_layers)
    params = dict(model.named_parameters())
    best: dict[str, float] = {}
    for _ in range(2):
        cur = dict.fromkeys(("threshold", "sparsify", "method", "finite", "copy"), 0.0)
        for name in sources.names:
            base, deltas = sources.group(name, None)
            tp = tensor_params(plan.recipe, plan.method, sources.roles[name], plan.num_layers, plan.order)
            dens = tp.sp["density"]
            t0 = time.perf_counter()
            for i, d in enumerate(dens):
                if d < 1:
                    largest_mask(deltas[i].reshape(-1).abs(), max(1, int(d * base.numel())))
            t1 = time.perf_counter()
            sparsify(deltas, "magnitude", dens)
            t2 = time.perf_counter()
            out = plan.method.fn(base, deltas, tp.sp, tp.gp, ref_sp=tp.ref_sp)
            t3 = time.perf_counter()
            bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all())
            t4 = time.perf_counter()
            params[name].data.copy_(out)
            t5 = time.perf_counter()
            for k, dt in zip(cur, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                cur[k] += dt
        best = {k: min(v, best.get(k, v)) for k, v in cur.items()}
    return best


# ----------------------------------------------------------------------------------------- to disk
def _proc_rss(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of process ``pid`` from /proc (0, 0 when unreadable)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def _child(pid: int) -> int:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pid
    return int(kids[0]) if kids else pid


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; return wall seconds, peak RSS and peaks of its anonymous and file-backed (memory-mapped
    files) RSS sampled every 10 ms. Peak RSS is what ``/usr/bin/time -v`` reports (else the child's own
    ``wait4`` rusage, which can include this process's size at the fork). Raises on a non-zero exit."""
    timer = Path("/usr/bin/time").exists()
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd] if timer else cmd, env=env, stdout=log, stderr=log)
        anon = file = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            a, f = _proc_rss(_child(proc.pid) if timer else proc.pid)
            anon, file = max(anon, a), max(file, f)
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        log.seek(0)
        text = log.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{text[-3000:]}")
    rss = usage.ru_maxrss * 1024
    for line in text.splitlines():
        if "Maximum resident set size" in line:
            rss = int(line.rsplit(":", 1)[1]) * 1024
    return {"s": seconds, "rss": rss, "anon": anon, "file": file}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def threshold_ties(sources: ResidentSources, recipe: Recipe, nonzero: bool = False) -> dict[str, torch.Tensor]:
    """Per tensor, the flat entries where a task vector's magnitude equals its exact top-k threshold.

    Which of several equal magnitudes at the threshold are kept is defined by evomerge (lower index first) but
    implementation-defined in mergekit (``torch.topk``): outputs may differ there and only there. With
    ``nonzero``, ties at a threshold of 0 are left out: a zero entry kept or dropped changes no output (a
    fine-tune leaves the embedding rows of tokens it never saw exactly at the base).
    """
    from evomerge.merge.materialize import MergePlan
    from evomerge.merge.methods.sparsify import kth_smallest
    from evomerge.merge.tensor_params import tensor_params

    plan = MergePlan.build(recipe, sources.num_layers)
    out = {}
    for name in sources.names:
        tp = tensor_params(plan.recipe, plan.method, sources.roles[name], plan.num_layers, plan.order)
        flat = sources.deltas[name].reshape(len(plan.order), -1)
        m = flat.shape[1]
        tie = torch.zeros(m, dtype=torch.bool)
        for i, density in enumerate(tp.sp.get("density", [])):
            if density < 1:
                mag = flat[i].abs()
                threshold = kth_smallest(mag, m - max(1, int(density * m)) + 1)
                if not (nonzero and float(threshold) == 0):
                    tie |= mag == threshold
        out[name] = tie
    return out


def agreement(a: Path, b: Path, ties: dict[str, torch.Tensor]) -> dict:
    """Compare two output folders entry by entry, apart from and at the threshold ties."""
    ta, tb = read_folder(a), read_folder(b)
    res = {"only": sorted(set(ta) ^ set(tb)), "max": 0.0, "max_outside": 0.0, "bad": 0, "bad_outside": 0,
           "ties": 0, "same": True, "entries": 0, "mismatch": [], "where": []}
    for n in sorted(set(ta) & set(tb)):
        if (ta[n].dtype, ta[n].shape) != (tb[n].dtype, tb[n].shape):
            res["mismatch"].append(f"{n}: {ta[n].dtype} {tuple(ta[n].shape)} vs {tb[n].dtype} {tuple(tb[n].shape)}")
            res["same"] = False
            continue
        x, y = ta[n].float().reshape(-1), tb[n].float().reshape(-1)
        tie = ties.get(n, torch.zeros(x.numel(), dtype=torch.bool))
        diff = (x - y).abs()
        bad = ~torch.isclose(x, y, rtol=1e-5, atol=1e-7)
        res["max"] = max(res["max"], float(diff.max()))
        res["max_outside"] = max(res["max_outside"], float(diff[~tie].max()) if bool((~tie).any()) else 0.0)
        res["bad"] += int(bad.sum())
        res["bad_outside"] += int((bad & ~tie).sum())
        for i in torch.nonzero(bad & ~tie).view(-1)[: max(0, 5 - len(res["where"]))].tolist():
            res["where"].append((n, i, float(x[i]), float(y[i])))  # the first differing entries away from ties
        res["ties"] += int(tie.sum())
        res["entries"] += x.numel()
        res["same"] &= torch.equal(ta[n], tb[n])
    return res


SEEDED = "mergekit (evomerge's masks)"  # mergekit run through experiments/mergekit_seeded.py


def bench_disk(work: Path, recipe: Recipe, args: argparse.Namespace, shard_bytes: int | None,
               imports: dict[tuple[str, ...], dict] | None = None) -> dict:
    """Time and memory of ``evomerge merge`` (default shards, and shards of ``shard_bytes`` unless None) and,
    when available, ``mergekit-yaml`` on ``recipe``; each tool's import-only cost is measured alike (once per
    command line in ``imports``, which is filled in).

    For a randomized method (DARE) mergekit runs seeded from the recipe's seed (``--random-seed``), and also
    as :data:`SEEDED`: through ``experiments/mergekit_seeded.py``, which draws mergekit's masks from
    evomerge's per-tensor stream, so that its output compares with evomerge's entry by entry."""
    from evomerge.merge.methods import METHODS

    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if args.disk_threads:
        env["OMP_NUM_THREADS"] = str(args.disk_threads)
    (work / "recipe.yaml").write_text(recipe.to_yaml())
    (work / "mergekit.yaml").write_text(to_mergekit_yaml(recipe))
    evo = [sys.executable, "-m", "evomerge.cli", "merge", str(work / "recipe.yaml")]
    evo_imports = [sys.executable, "-c", "import evomerge.cli, evomerge.merge.materialize"]
    tools = {"evomerge": (lambda out: [*evo, "--out", str(out)], evo_imports)}
    if shard_bytes is not None:
        mb = -(-shard_bytes // 10**6)
        tools[f"evomerge --shard-size {mb}MB"] = (
            lambda out: [*evo, "--out", str(out), "--shard-size", f"{mb}MB"], evo_imports)
    res: dict = {"skipped": None, "threads": args.disk_threads, "tools": []}
    mk = args.mergekit_bin
    if mk and Path(mk).is_file():
        mk_python = str(Path(mk).parent / "python")
        mk_imports = [mk_python, "-c", "import mergekit.scripts.run_yaml, mergekit.merge"]
        seed = ["--random-seed", str(recipe.seed)] if METHODS.get(recipe.method).randomized else []
        tools["mergekit"] = (lambda out: [mk, str(work / "mergekit.yaml"), str(out), *seed], mk_imports)
        if seed:
            tools[SEEDED] = (lambda out: [mk_python, str(ROOT / "experiments" / "mergekit_seeded.py"), "--seed",
                                          str(recipe.seed), str(work / "mergekit.yaml"), str(out)], mk_imports)
    else:
        res["skipped"] = "no --mergekit-bin given" if not mk else f"{mk} not found"
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(args.disk_repeats):  # alternate the tools so that load from other jobs hits them alike
        for k, (tool, (cmd, _)) in enumerate(tools.items()):
            out = work / f"out-{k}"
            shutil.rmtree(out, ignore_errors=True)
            runs[tool].append(run_measured(cmd(out), env))
            print(f"  {tool} run {r + 1}: {runs[tool][-1]['s']:.2f}s, peak RSS {runs[tool][-1]['rss'] / MiB:.0f} MiB",
                  flush=True)
    imports = {} if imports is None else imports
    for k, (tool, (_, imp)) in enumerate(tools.items()):
        if tuple(imp) not in imports:
            imports[tuple(imp)] = min((run_measured(imp, env) for _ in range(2)), key=lambda x: x["s"])
        res[tool] = {"times": [x["s"] for x in runs[tool]], "out": work / f"out-{k}", "imports": imports[tuple(imp)],
                     **{key: max(x[key] for x in runs[tool]) for key in ("rss", "anon", "file")}}
        res["tools"].append(tool)
    return res


# ----------------------------------------------------------------------------------------- existing models
def real_merge_size():  # -> evomerge.testing.real.RealSize
    """The real zoo cut to what a merge comparison needs: the whole 30-layer SmolLM2-135M-Instruct as the base
    and genuine full fine-tunes of it, but 4 AdamW steps per expert (batch 16, lr 5e-5), no multitask steps
    and 4 examples per task and split for the reference table (~6 min on 2 cores instead of ~27)."""
    from evomerge.testing.real import RealSize

    return RealSize(name="merge-bench", num_layers=None, batch_size=16, expert_steps=4, expert_lr=5e-5,
                    multitask_steps=0, multitask_lr=5e-5, eval_examples=4, eval_batch_size=12)


def zoo_sources(zoo: Path) -> tuple[dict[str, Path], tuple[str, ...]]:
    """``base`` and three experts of a zoo folder: the manifest's experts (``zoo.json``), else the first three
    ``expert_*`` folders by name."""
    if (zoo / "zoo.json").is_file():
        experts = tuple(json.loads((zoo / "zoo.json").read_text())["experts"].values())
    else:
        experts = tuple(sorted(p.name for p in zoo.glob("expert_*") if p.is_dir()))
    if len(experts) < 3 or not (zoo / "base").is_dir():
        raise SystemExit(f"--zoo {zoo}: needs base/ and three expert folders, found {list(experts)}")
    return {"base": zoo / "base", **{e: zoo / e for e in experts[:3]}}, experts[:3]


def delta_stats(a: Path, b: Path, base: Path) -> dict[str, float]:
    """Norms of ``a - base`` and ``b - base`` over every shared tensor, and their cosine."""
    ta, tb, t0 = read_folder(a), read_folder(b), read_folder(base)
    aa = bb = ab = 0.0
    for n in sorted(set(ta) & set(tb) & set(t0)):
        x, y = (ta[n].double() - t0[n].double()).reshape(-1), (tb[n].double() - t0[n].double()).reshape(-1)
        aa, bb, ab = aa + float(x @ x), bb + float(y @ y), ab + float(x @ y)
    return {"a": aa**0.5, "b": bb**0.5, "cos": ab / max((aa * bb) ** 0.5, 1e-300)}


def real_prompts() -> list[str]:
    """The first test prompt of each skill of ``builtin:real`` (fitness/real/)."""
    return [json.loads((ROOT / "fitness" / "real" / f"{s}.test.jsonl").read_text().splitlines()[0])["prompt"]
            for s in ("add", "order", "unit")]


def load_and_generate(folder: Path, prompts: list[str], max_new_tokens: int = 12) -> dict:
    """Load ``folder`` with transformers (model and tokenizer), greedy-generate from each prompt; the
    last-position logits of each prompt, whether the output projection is the input embedding, the chat
    template and the files of the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out: dict = {"files": sorted(p.name for p in folder.iterdir()), "tokens": [], "text": [], "logits": [],
                 "tied": model.get_output_embeddings().weight.data_ptr()
                 == model.get_input_embeddings().weight.data_ptr(),
                 "chat_template": tok.chat_template, "dtype": str(next(model.parameters()).dtype),
                 "config": json.loads((folder / "config.json").read_text())}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out["logits"].append(model(ids).logits[0, -1])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out["tokens"].append(gen[0, ids.shape[1]:].tolist())
            out["text"].append(tok.decode(out["tokens"][-1], skip_special_tokens=True))
    return out


def zoo_main(args: argparse.Namespace) -> int:
    """``--zoo DIR``: merge to disk with both tools on a zoo's models, one recipe per method; compare."""
    from evomerge.merge.methods import METHODS

    if args.build_real_zoo:
        from evomerge.testing.real import build_real_zoo

        t0 = time.perf_counter()
        build_real_zoo(args.zoo, size=real_merge_size(), seed=0)  # returns at once when already built
        print(f"real zoo in {args.zoo} ({time.perf_counter() - t0:.0f}s)", flush=True)
    paths, experts = zoo_sources(args.zoo)
    recs = recipes(paths, experts)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.workdir))
    set_cache_dir(work / "kernels")
    try:
        with ModelFolder.open(paths["base"]) as ref:
            infos = [ref.info(n) for n in ref.tensor_names]
            largest, model_bytes = max(i.nbytes for i in infos), sum(i.nbytes for i in infos)
            tied, n_layers, names = ref.tied_embeddings, ref.num_layers, list(ref.tensor_names)
        config = json.loads((paths["base"] / "config.json").read_text())
        src = ResidentSources.load(paths, "base", list(experts))
        n_params = sum(b.numel() for b in src.base.values())
        ties = threshold_ties(src, recs["ties"]) if "ties" in args.methods else {}
        ties_nz = threshold_ties(src, recs["ties"], nonzero=True) if "ties" in args.methods else {}
        manifest = json.loads((args.zoo / "zoo.json").read_text()) if (args.zoo / "zoo.json").is_file() else {}
        head = [f"- sources: `{args.zoo}`: base + {', '.join(experts)} ({config.get('architectures')}, "
                f"{n_layers} layers, hidden {config.get('hidden_size')}, {config.get('num_attention_heads')} heads / "
                f"{config.get('num_key_value_heads')} KV heads, vocab {config.get('vocab_size')}, tied embeddings "
                f"{tied}); {len(names)} tensors, {n_params / 1e6:.1f}M parameters, {model_bytes / 1e6:.0f} MB per "
                f"model ({infos[0].dtype})"
                + (f"; zoo size preset {json.dumps(manifest['size'])}, steps {manifest.get('steps')}" if manifest else ""),
                "- recipes: 3 experts, per-layer weights (and densities for ties / dare_ties) as in the synthetic "
                "benchmark, `dtype: float32`, seed 7; mergekit gets the same recipe from `to_mergekit_yaml`", ""]
        imports: dict[tuple[str, ...], dict] = {}
        rows, notes, checks = [], [], []
        prompts = real_prompts()
        base_gen = load_and_generate(paths["base"], prompts)
        for method in args.methods:
            mwork = work / method
            mwork.mkdir()
            print(f"{method}:", flush=True)
            res = bench_disk(mwork, recs[method], args, None, imports)
            e = res["evomerge"]
            evo_gen = load_and_generate(e["out"], prompts)
            checks.append((method, "evomerge", evo_gen))
            if res["skipped"]:
                rows.append([method, " / ".join(f"{t:.2f}" for t in e["times"]), "—", "—", f"{e['rss'] / MiB:.0f}",
                             *["—"] * 8])
                shutil.rmtree(mwork, ignore_errors=True)
                continue
            m = res["mergekit"]
            randomized = METHODS.get(method).randomized
            ref_tool = SEEDED if randomized else "mergekit"
            tie = ties if method == "ties" else {}
            g = agreement(e["out"], res[ref_tool]["out"], tie)
            nz = agreement(e["out"], res[ref_tool]["out"], ties_nz)["bad_outside"] if method == "ties" else None
            mk_gen = load_and_generate(res[ref_tool]["out"], prompts)
            checks.append((method, ref_tool, mk_gen))
            logit_diff = max(float((a - b).abs().max()) for a, b in zip(evo_gen["logits"], mk_gen["logits"],
                                                                          strict=True))
            same_tokens = evo_gen["tokens"] == mk_gen["tokens"]
            rows.append([method, " / ".join(f"{t:.2f}" for t in e["times"]),
                         " / ".join(f"{t:.2f}" for t in m["times"]), f"**{min(m['times']) / min(e['times']):.2f}**",
                         f"{e['rss'] / MiB:.0f} ({e['anon'] / MiB:.0f} / {e['file'] / MiB:.0f})",
                         f"{m['rss'] / MiB:.0f} ({m['anon'] / MiB:.0f} / {m['file'] / MiB:.0f})",
                         f"**{e['rss'] / m['rss']:.2f}**", ref_tool,
                         f"{g['max']:.2e}", f"{g['bad']} of {g['entries']}",
                         f"{g['ties']} / {sum(int(t.sum()) for t in ties_nz.values())}" if method == "ties" else "—",
                         f"{g['bad_outside']}" + (f" / {nz}" if nz is not None else ""), g["same"]])
            notes.append(f"- {method}: tensor names {'identical' if not g['only'] else 'differ: ' + str(g['only'])}"
                         f" ({g['entries']} entries){'; dtype/shape differ: ' + str(g['mismatch']) if g['mismatch'] else ''}"
                         f"; last-position logits of the 3 prompts, evomerge vs {ref_tool}: max abs diff "
                         f"{logit_diff:.2e}; greedy tokens identical: {same_tokens}"
                         + ("; first entries differing away from ties (tensor, flat index, evomerge, "
                            f"{ref_tool}): {g['where']}" if g["where"] else ""))
            if randomized:
                ds = delta_stats(e["out"], m["out"], paths["base"])
                dsame = delta_stats(e["out"], res[SEEDED]["out"], paths["base"])
                gp = agreement(e["out"], m["out"], {})
                notes.append(
                    f"  - {method}, mergekit's own masks (`--random-seed {recs[method].seed}`, "
                    f"{' / '.join(f'{t:.2f}' for t in m['times'])} s; {SEEDED}: "
                    f"{' / '.join(f'{t:.2f}' for t in res[SEEDED]['times'])} s, peak RSS "
                    f"{res[SEEDED]['rss'] / MiB:.0f} MiB): {gp['bad']} of {gp['entries']} entries differ from "
                    f"evomerge's (max abs diff {gp['max']:.2e}); merged-delta norm ||out - base|| evomerge "
                    f"{ds['a']:.4f}, mergekit {ds['b']:.4f} (ratio {ds['b'] / ds['a']:.4f}), cosine of the two "
                    f"merged deltas {ds['cos']:.4f} (with evomerge's masks: {dsame['cos']:.6f})")
            shutil.rmtree(mwork, ignore_errors=True)
        imp_rows = [[" ".join(Path(c).name if i == 0 else c for i, c in enumerate(k)), f"{v['s']:.2f}",
                     f"{v['rss'] / MiB:.0f}"] for k, v in imports.items()]
        lines = ["## Merge to disk on the zoo's models (subprocess, end to end, "
                 f"OMP_NUM_THREADS={args.disk_threads or 'tool default'})", "",
                 f"Runs alternate between the tools ({args.disk_repeats} per tool); peak RSS from `/usr/bin/time -v` "
                 "(max over runs), with the peaks of its anonymous and file-backed (memory-mapped sources) parts "
                 f"sampled every 10 ms; one model is {model_bytes / MiB:.0f} MiB, the largest tensor "
                 f"{largest / MiB:.0f} MiB. Agreement compares every entry of the two outputs (allclose rtol 1e-5, "
                 "atol 1e-7); for ties, entries whose magnitude ties a top-k threshold are counted apart (all / "
                 "those at a nonzero threshold, the only ones that can change an output), and 'outside ties' "
                 "counts differing entries away from them (all ties / nonzero ties). For dare_ties the entry-"
                 f"by-entry comparison is with {SEEDED} (`experiments/mergekit_seeded.py`: mergekit's code, with "
                 "`torch.bernoulli` drawing from evomerge's per-tensor generator); mergekit's own masks are "
                 "compared below by the norm and direction of the merged deltas.", ""]
        lines += fmt_table(["method", "evomerge s (runs)", "mergekit s (runs)", "mergekit ÷ evomerge",
                            "evomerge peak RSS MiB (anon / file)", "mergekit peak RSS MiB (anon / file)",
                            "evomerge ÷ mergekit RSS",
                            "compared with", "max abs diff", "entries outside allclose", "ties (all / nonzero)",
                            "outside ties", "bit-identical"], rows)
        lines += ["", "Import-only cost (the same interpreter importing the tool and exiting, best of 2):", ""]
        lines += fmt_table(["command", "s", "peak RSS MiB"], imp_rows)
        lines += ["", "Checks:", "", *notes]
        lines += ["", f"Loading with transformers and generating (greedy, 12 new tokens) from {prompts}:", ""]
        crow = [["base (source)", base_gen["tied"], base_gen["dtype"], " \| ".join(repr(t) for t in base_gen["text"]),
                 "—", "—"]]
        for method, tool, gen in checks:
            cfg_diff = sorted(k for k in set(gen["config"]) | set(base_gen["config"])
                              if gen["config"].get(k) != base_gen["config"].get(k))
            crow.append([f"{method}: {tool}", gen["tied"], gen["dtype"], " \| ".join(repr(t) for t in gen["text"]),
                         ", ".join(f for f in gen["files"] if not f.endswith(".safetensors")),
                         ", ".join(cfg_diff) or "none"])
        lines += fmt_table(["model", "lm_head is embed_tokens", "dtype", "generated", "files besides shards",
                            "config.json keys differing from the base's"], crow)
        chat = {tool: gen["chat_template"] == base_gen["chat_template"] for _, tool, gen in checks}
        lines += ["", f"Chat template the same as the base's: {chat}."]
        if args.profile and "ties" in args.methods:
            model = live_model(config)
            t0 = time.perf_counter()
            InPlaceMerger(src, model).apply(recs["ties"])  # compiles the fused kernels, outside the profile
            lines += ["", f"In-place TIES: first merge (compiles the fused kernels) {time.perf_counter() - t0:.1f}s, "
                          f"then {min(best_of(lambda: InPlaceMerger(src, model).apply(recs['ties']), 2, 0)):.2f}s "
                          "(best of 2); the profile below is of a merge after those."]
            lines += ties_section(src, model, recs["ties"], args)
        text = "\n".join(["# Merge benchmark on existing models (`experiments/bench_merge.py --zoo`)", "",
                          *machine_lines(args), *head, *lines]) + "\n"
        print("\n" + text)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
        print(f"wrote {args.results}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ----------------------------------------------------------------------------------------- report
def fmt_table(head: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def in_place_section(src: ResidentSources, model: torch.nn.Module, recs: dict[str, Recipe], args,
                     sorted_src: ResidentSources | None = None) -> list[str]:
    """One row per thread count and method; with ``sorted_src`` (sources loaded with
    ``sorted_magnitudes=True``), also a row per magnitude-sparsified method merged from it."""
    touched = touched_bytes(src)
    lines = ["## In-place merge (resident sources, `InPlaceMerger.apply`)", "",
             f"Bytes touched per merge: {touched / 1e6:.0f} MB = for each of {len(src.names)} tensors, the "
             f"resident base and each of the {len(DELTAS)} task vectors read once + the live parameter written "
             "once ((N + 2) x tensor bytes). Memory-copy bandwidth: `Tensor.copy_` of a 256 MiB float32 buffer, "
             "best of 5, read + write bytes, measured in the same process at the same thread count. "
             f"Best of {args.repeats} merges after one warm-up; minor page faults are per merge.", ""]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        bw = copy_bandwidth(device=args.device)
        runs = [(m, m, src, True) for m in args.methods]
        if sorted_src is not None:
            runs += [(m, f"{m} (sorted magnitudes)", sorted_src, True) for m in args.methods if m in SORTED_METHODS]
        if args.eager:
            runs += [(m, f"{m} (eager, fused kernels off)", src, False) for m in args.methods]
        for method, label, source, fused in runs:
            f0 = minor_faults()
            with fused_kernels(fused):
                first, times = bench_in_place(source, model, recs[method], args.repeats)
            faults = (minor_faults() - f0) // (args.repeats + 1)
            rate = touched / min(times)
            rows.append([threads, label, f"{min(times):.3f}", f"{statistics.median(times):.3f}", f"{first:.2f}",
                         f"{rate / 1e9:.2f}", f"{bw / 1e9:.1f}", f"**{rate / bw:.3f}**",
                         f"{faults} ({faults * 4096 / 1e9:.2f} GB)"])
            print(" | ".join(map(str, rows[-1])), flush=True)
    return lines + fmt_table(["torch threads", "method", "best s/merge", "median s", "first merge s",
                              "touched GB/s", "memcpy GB/s", "ratio (goal >= 0.5)", "page faults (zeroed)"], rows)


def ties_section(src: ResidentSources, model: torch.nn.Module, recipe: Recipe, args) -> list[str]:
    torch.set_num_threads(args.threads[0])
    split = stage_split(src, model, recipe)
    whole = split["method"] + split["finite"] + split["copy"]
    lines = ["", f"## Where an eager TIES merge spends its time ({args.threads[0]} thread(s))", "",
             "Stages timed one by one over every tensor (best of 2 sweeps); shares of method + check + copy.", ""]
    named = [("threshold: magnitudes + exact top-k mask per row (`largest_mask`)", split["threshold"]),
             ("sparsify total (copy of deltas + threshold + mask multiply)", split["sparsify"]),
             ("sign election + mix + normalize + add base (method - sparsify)", split["method"] - split["sparsify"]),
             ("`merge_tensor` NaN/inf check (`isfinite(out.sum())`, elementwise only if that fails)", split["finite"]),
             ("copy into the live parameter", split["copy"])]
    lines += fmt_table(["stage", "seconds", "share"], [[n, f"{s:.3f}", f"{s / whole:.0%}"] for n, s in named])
    if args.profile:
        lines += ["", "Top operations by self CPU time over one in-place TIES merge as the library runs it "
                  "(fused kernels; `torch.profiler`):", ""]
        lines += fmt_table(["op", "self s", "calls", "share"],
                           [[f"`{k}`", f"{s:.3f}", c, f"{f:.0%}"] for k, s, c, f in profile_merge(src, model, recipe)])
    return lines


def disk_section(res: dict, model_bytes: int, largest: int, n_sources: int, ties: dict | None) -> list[str]:
    bound = largest * (n_sources + 2)
    lines = ["", f"## Merge to disk (subprocess, end to end, OMP_NUM_THREADS={res['threads'] or 'tool default'})", "",
             f"bound = largest tensor ({largest / MiB:.0f} MiB) x (sources {n_sources} + 2) = {bound / MiB:.0f} MiB; "
             f"one model is {model_bytes / MiB:.0f} MiB. Peak RSS from `/usr/bin/time -v`; anonymous and "
             "file-backed (memory-mapped source files) peaks sampled every 10 ms; 'imports' = the same interpreter "
             "importing the tool and exiting.", ""]
    rows = []
    for tool in res["tools"]:
        r, imp = res[tool], res[tool]["imports"]
        rows.append([tool, f"{min(r['times']):.2f}", " / ".join(f"{t:.2f}" for t in r["times"]), f"{imp['s']:.2f}",
                     f"{r['rss'] / MiB:.0f}", f"{r['anon'] / MiB:.0f}", f"{r['file'] / MiB:.0f}",
                     f"{imp['rss'] / MiB:.0f}", f"{imp['anon'] / MiB:.0f}", f"{r['rss'] / bound:.2f}",
                     f"{(r['anon'] - imp['anon']) / bound:.2f}"])
    lines += fmt_table(["tool", "best s", "runs s", "imports s", "peak RSS MiB", "peak anon MiB", "peak file MiB",
                        "imports RSS MiB", "imports anon MiB", "peak RSS / bound", "(anon - imports anon) / bound"],
                       rows)
    if res["skipped"]:
        lines.append(f"\nmergekit comparison skipped: {res['skipped']}.")
        return lines
    e, m = res["evomerge"], res["mergekit"]
    g = agreement(e["out"], m["out"], ties or {})
    lines += ["", f"mergekit time / evomerge time: **{min(m['times']) / min(e['times']):.2f}** (goal >= 2); "
                  f"evomerge peak RSS / mergekit peak RSS: **{e['rss'] / m['rss']:.2f}** (goal <= 1); without "
                  f"imports: time {(min(m['times']) - m['imports']['s']) / (min(e['times']) - e['imports']['s']):.2f}"
                  f", anon RSS {(e['anon'] - e['imports']['anon']) / (m['anon'] - m['imports']['anon']):.2f}.",
              "", f"Outputs ({g['entries']} entries): max abs diff {g['max']:.2e}; {g['bad']} entries outside "
                  f"allclose(rtol 1e-5, atol 1e-7), {g['bad_outside']} of them away from the {g['ties']} entries "
                  f"whose magnitude ties a top-k threshold (kept set implementation-defined in mergekit); away "
                  f"from those entries max abs diff {g['max_outside']:.2e}; bit-identical {g['same']}"
                  + (f"; tensors in one output only: {g['only']}" if g["only"] else "")
                  + (f"; dtype or shape differs: {g['mismatch']}" if g["mismatch"] else "") + "."]
    return lines


def machine_lines(args) -> list[str]:
    return [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, torch threads {','.join(map(str, args.threads))} "
            f"(default {args.default_threads})",
            f"- load average (1 min) at start {args.load[0]:.1f}, at end {os.getloadavg()[0]:.1f}: the machine is "
            "shared with other jobs, so every figure is a best of N",
            f"- command: `{' '.join(['python', *sys.argv])}`"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--device", default="cpu", help="device of the resident sources and the live model (cpu, cuda)")
    p.add_argument("--repeats", type=int, default=5, help="timed in-place merges per method (after 1 warm-up)")
    p.add_argument("--disk-repeats", type=int, default=2, help="merge-to-disk runs per tool")
    p.add_argument("--threads", default="1,2", help="torch threads for the in-place merges, a comma list")
    p.add_argument("--disk-threads", type=int, default=1,
                   help="OMP_NUM_THREADS for both merge-to-disk tools (0: leave each tool's default)")
    p.add_argument("--methods", default="ties,dare_ties,task_arithmetic,linear")
    p.add_argument("--mergekit-bin", default=None, help="path of mergekit-yaml (e.g. /work/mkvenv/bin/mergekit-yaml)")
    p.add_argument("--no-disk", dest="disk", action="store_false", help="skip the merge-to-disk comparison")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler table")
    p.add_argument("--sorted-magnitudes", action="store_true",
                   help="also time magnitude-sparsified methods over sources loaded with sorted_magnitudes=True")
    p.add_argument("--no-eager", dest="eager", action="store_false",
                   help="skip the rows that time the eager methods (fused kernels off)")
    p.add_argument("--workdir", type=Path, default=None, help="where to build the sources (default: a temp dir)")
    p.add_argument("--zoo", type=Path, default=None,
                   help="merge to disk on the models of this zoo folder (base/ and three expert folders) instead of "
                        "building synthetic sources: every method of --methods, evomerge against mergekit, with "
                        "checks that the outputs load and generate (no in-place rows; the TIES profile unless "
                        "--no-profile)")
    p.add_argument("--build-real-zoo", action="store_true",
                   help="with --zoo: first build (or reuse) a real zoo there, the whole SmolLM2-135M-Instruct and "
                        "experts of 4 fine-tuning steps (real_merge_size; needs evomerge[real])")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results" / "bench_merge.md")
    args = p.parse_args(argv)
    args.default_threads = torch.get_num_threads()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.methods = args.methods.split(",")
    args.load = os.getloadavg()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zoo is not None:
        return zoo_main(args)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=args.workdir))
    set_cache_dir(work / "kernels")  # compiled kernels live and die with the work folder
    try:
        t0 = time.perf_counter()
        paths = build_sources(work, args.size)
        recs = recipes(paths)
        print(f"built sources in {work} ({time.perf_counter() - t0:.1f}s)", flush=True)
        with ModelFolder.open(paths["base"]) as ref:
            largest = max(ref.info(n).nbytes for n in ref.tensor_names)
        disk = bench_disk(work, recs["ties"], args, 2 * largest) if args.disk else None
        src = ResidentSources.load(paths, "base", list(DELTAS), device=args.device)
        model = live_model(llama_config(args.size), args.device)
        model_bytes = sum(b.numel() * b.element_size() for b in src.base.values())
        head = [f"- sources: random Llama ({args.size}: {json.dumps(SIZES[args.size])}), float32, "
                f"{model_bytes / 1e6:.0f} MB per model, base + 3 fine-tunes (base + N(0, 2e-3) noise); "
                f"recipes: 3 sources, per-layer weights and densities, `dtype: float32`", ""]
        sorted_src = None
        if args.sorted_magnitudes:
            t0 = time.perf_counter()
            sorted_src = ResidentSources.load(paths, "base", list(DELTAS), sorted_magnitudes=True,
                                              device=args.device)
            load_s = time.perf_counter() - t0
            merger = InPlaceMerger(src, model)
            merger.apply(recs["ties"])
            plain = {n: p.clone() for n, p in merger.targets.items()}
            InPlaceMerger(sorted_src, model).apply(recs["ties"])
            same_sorted = all(torch.equal(p, plain[n]) for n, p in merger.targets.items())
        lines = in_place_section(src, model, recs, args, sorted_src)
        if sorted_src is not None:
            lines += ["", f"Sources with `sorted_magnitudes=True`: loaded in {load_s:.1f}s, "
                          f"{sorted_src.nbytes / 1e6:.0f} MB resident (vs {src.nbytes / 1e6:.0f} MB); "
                          f"TIES output bit-identical to the plain sources: {same_sorted}."]
        if "ties" in args.methods:
            lines += ties_section(src, model, recs["ties"], args)
        if disk is not None:
            ties = threshold_ties(src, recs["ties"]) if "mergekit" in disk else None
            lines += disk_section(disk, model_bytes, largest, 1 + len(DELTAS), ties)
            InPlaceMerger(src, model).apply(recs["ties"])
            on_disk = read_folder(disk["evomerge"]["out"])
            same = all(torch.equal(p, on_disk[n]) for n, p in InPlaceMerger(src, model).targets.items())
            lines.append(f"In-place TIES and `evomerge merge` output bit-identical: {same}.")
        text = "\n".join(["# Merge benchmark (`experiments/bench_merge.py`)", "", *machine_lines(args), *head, *lines])
        text += "\n"
        print("\n" + text)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
        print(f"wrote {args.results}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
