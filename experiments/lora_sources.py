"""LoRA adapter sources and pool selection: what is resident, what loading and choosing cost.

Builds a random Llama base, one full fine-tune (base + noise) and one peft LoRA adapter (rank ``--rank`` on
every linear layer of the blocks), then measures in one process:

* the resident bytes of ``ResidentSources`` for base + full source and base + adapter held dense (the same
  bytes) and the adapter's file;
* the load time of each;
* the same with ``factored_adapters=True`` (``resources.adapter_residency: factored``), and one in-place
  task-arithmetic merge with each (a factored adapter is expanded again on every merge);
* the Gram matrix of a pool (``--pool`` sources: full fine-tunes and adapters) streamed in blocks, its time and
  its transient bytes (``evomerge.merge.selection.transient_bytes``).

    python experiments/lora_sources.py --out experiments/results/lora_sources.md
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch


def build(root: Path, hidden: int, layers: int, vocab: int, rank: int, pool: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192), vocab_size=vocab,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    sd = base.state_dict()
    g = torch.Generator().manual_seed(1)
    for i in range(pool):
        name = f"full{i}" if i % 2 == 0 else f"lora{i}"
        if name.startswith("full"):
            m = LlamaForCausalLM(cfg)
            m.load_state_dict({k: v + torch.randn(v.shape, generator=g) * 2e-3 for k, v in sd.items()})
            m.save_pretrained(root / name)
        else:
            torch.manual_seed(i)
            m = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), LoraConfig(
                r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.mul_(0.01)
            m.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from evomerge.io import ModelFolder
    from evomerge.merge.materialize import InPlaceMerger
    from evomerge.merge.selection import gram_matrix, transient_bytes
    from evomerge.merge.sources import ResidentSources
    from evomerge.recipe import Recipe

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        paths = build(root, args.hidden, args.layers, args.vocab, args.rank, args.pool)
        build_s = time.perf_counter() - t0
        base_bytes = ModelFolder.open(paths["base"]).nbytes
        ad = ModelFolder.open(paths["lora1"])
        adapter_file = (paths["lora1"] / "adapter_model.safetensors").stat().st_size
        full_load = best(lambda: ResidentSources.load({k: paths[k] for k in ("base", "full0")}, "base"))
        ad_load = best(lambda: ResidentSources.load({k: paths[k] for k in ("base", "lora1")}, "base"))
        res_full = ResidentSources.load({k: paths[k] for k in ("base", "full0")}, "base")
        res_ad = ResidentSources.load({k: paths[k] for k in ("base", "lora1")}, "base")
        fact_load = best(lambda: ResidentSources.load({k: paths[k] for k in ("base", "lora1")}, "base",
                                                      factored_adapters=True))
        res_fact = ResidentSources.load({k: paths[k] for k in ("base", "lora1")}, "base", factored_adapters=True)
        from transformers import AutoModelForCausalLM

        live = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        recipe = Recipe.model_validate({"method": "task_arithmetic", "base_model": "base",
                                        "models": [{"model": "lora1", "parameters": {"weight": 0.8}}]})
        merges = {}
        for label, res in (("full", res_full), ("dense", res_ad), ("factored", res_fact)):
            merger = InPlaceMerger(res, live)
            rec = recipe if label != "full" else Recipe.model_validate(
                {**recipe.model_dump(), "models": [{"model": "full0", "parameters": {"weight": 0.8}}]})
            merger.apply(rec)
            merges[label] = best(lambda m=merger, r=rec: m.apply(r), repeats=5)
        tv_ad = res_ad.nbytes - sum(t.numel() * t.element_size() for t in res_ad.base.values())
        tv_fact = res_fact.nbytes - sum(t.numel() * t.element_size() for t in res_fact.base.values())
        pool = {k: v for k, v in paths.items()}
        block = 2**20
        gram_s = best(lambda: gram_matrix(pool, "base", block_entries=block), repeats=1)
        mb = 1e6
        lines += [
            "# LoRA adapter sources and pool selection (`experiments/lora_sources.py`)",
            "",
            f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S')}",
            f"- machine: {platform.platform()}, torch {torch.__version__}, torch threads {args.threads}; shared with "
            "other jobs, so times are a best of 3",
            f"- command: `python experiments/lora_sources.py --hidden {args.hidden} --layers {args.layers} --vocab "
            f"{args.vocab} --rank {args.rank} --pool {args.pool} --threads {args.threads}`",
            f"- models: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, "
            f"{base_bytes / mb:.0f} MB; adapter: peft LoRA r={args.rank} on q/k/v/o/gate/up/down of every layer "
            f"(built in {build_s:.0f} s)",
            "",
            "| | base + full source | base + LoRA adapter, dense | base + LoRA adapter, factored |",
            "|---|---|---|---|",
            f"| resident bytes (`ResidentSources.nbytes`) | {res_full.nbytes / mb:.1f} MB | {res_ad.nbytes / mb:.1f} MB "
            f"| {res_fact.nbytes / mb:.1f} MB |",
            f"| of which the task vector | {base_bytes / mb:.1f} MB | {tv_ad / mb:.1f} MB | {tv_fact / mb:.2f} MB |",
            f"| source bytes read from disk | {base_bytes / mb:.1f} MB | {adapter_file / mb:.2f} MB (adapter file) "
            f"| {adapter_file / mb:.2f} MB |",
            f"| load (best of 3) | {full_load:.2f} s | {ad_load:.2f} s | {fact_load:.2f} s |",
            f"| in-place task-arithmetic merge (best of 5) | {merges['full']:.3f} s | {merges['dense']:.3f} s "
            f"| {merges['factored']:.3f} s |",
            "",
            f"Factored over dense, same process: {tv_fact / tv_ad:.3f} x the task-vector bytes, "
            f"{merges['factored'] / merges['dense']:.2f} x the merge time (the {len(ad.factors)} adapted tensors "
            "are expanded again on every merge). The default (`resources.adapter_residency: dense`) keeps merges "
            "as fast as with full sources; `factored` is for many adapters that would not fit dense.",
            "",
            f"Pool selection: Gram matrix of {len(pool) - 1} sources ({sum(k.startswith('lora') for k in pool)} "
            f"adapters) streamed in blocks of {block} entries: {gram_s:.2f} s, at most "
            f"{transient_bytes(len(pool) - 1, block) / mb:.1f} MB transient (the pool resident would be "
            f"{(len(pool) - 1) * base_bytes / mb:.0f} MB of task vectors).",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
