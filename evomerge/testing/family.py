"""A tiny untrained model family and a perplexity suite: fast fixtures for driver and fault tests.

``build_family`` writes a random tiny Llama base and ``n`` "fine-tunes" (base + seeded noise) as HF folders;
``write_perplexity_suite`` writes a two-task suite whose per-example scores (mean token log-likelihood) are
continuous and deterministic, so searches over the family have something to optimize within seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evomerge.testing.tokenizer import build_tokenizer


def build_family(root: str | Path, n: int = 2, *, layers: int = 2, hidden: int = 32, seed: int = 0,
                 noise: float = 0.05) -> dict[str, Path]:
    """Write ``base`` and ``m1``..``mn`` under ``root``; returns name -> folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = Path(root)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = LlamaForCausalLM(cfg)
    paths: dict[str, Path] = {}
    for i, name in enumerate(["base", *(f"m{k}" for k in range(1, n + 1))]):
        model = LlamaForCausalLM(cfg)
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        if i:
            for v in sd.values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=g) * noise)
        model.load_state_dict(sd)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def write_perplexity_suite(root: str | Path, *, per_split: int = 6) -> Path:
    """A suite with tasks ``digits`` and ``letters`` (perplexity kind); returns the suite file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for task, alphabet in (("digits", "0123456789+="), ("letters", "abcdefghij")):
        for split, offset in (("calibration", 0), ("test", 1000)):
            lines = []
            for i in range(per_split):
                idx = torch.randint(len(alphabet), (12,), generator=g).tolist()
                text = "".join(alphabet[j] for j in idx)
                lines.append(json.dumps({"id": f"{task}-{split}-{offset + i}", "text": text}))
            (root / f"{task}.{split}.jsonl").write_text("\n".join(lines) + "\n")
    suite = root / "suite.yaml"
    suite.write_text(
        "name: family\ntasks:\n"
        "  - {name: digits, kind: perplexity, data: {calibration: digits.calibration.jsonl, test: digits.test.jsonl}}\n"
        "  - {name: letters, kind: perplexity, data: {calibration: letters.calibration.jsonl, test: letters.test.jsonl}}\n"
    )
    return suite


def write_run_config(path: str | Path, family: dict[str, Path], suite: Path, *, name: str = "t", evals: int = 10,
                     optimizer: str = "cma_es", options: dict | None = None, template: str = "builtin:ties-per-layer",
                     extra: dict | None = None) -> Path:
    """A run config over ``family`` (base = ``base``) scored on ``suite``."""
    import yaml

    path = Path(path)
    doc = {
        "name": name, "seed": 0, "output_dir": str(path.parent / "runs"),
        "sources": {k: str(v) for k, v in family.items()}, "base_model": "base",
        "space": {"template": template}, "fitness": {"suite": str(suite), "scorer": "hf", "batch_size": 8},
        "optimizer": {"name": optimizer, "options": options if options is not None else {"popsize": 4}},
        "budget": {"evaluations": evals}, "resources": {"threads_per_worker": 1},
    }
    for k, v in (extra or {}).items():
        doc[k] = v
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
