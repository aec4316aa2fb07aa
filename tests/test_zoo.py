"""The tiny model zoo: data, training data hygiene, evaluation, model quality, reloading, determinism."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError, TaskDataError
from evomerge.testing import skills as sk
from evomerge.testing.tokenizer import build_tokenizer
from evomerge.testing.train import IGNORE, draw_batch, encode_pairs
from evomerge.testing.zoo import SIZES, ZooManifest, build_zoo, exact_match

SHIPPED = Path(__file__).resolve().parents[1] / "fitness" / "zoo"


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and a shared machine does not slow them down as much."""
    with _threads(1):
        yield


def _solve(skill: str, prompt: str) -> str:
    """Answer a prompt independently of the samplers."""
    body = prompt[:-1].split(":", 1)[-1]
    if skill == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if skill == "rev":
        return body[::-1]
    return "".join(sorted(body))


# --- evaluation data -------------------------------------------------------------------------


def test_shipped_data_equals_regenerated(tmp_path: Path) -> None:
    written = sk.write_eval_data(tmp_path)
    assert len(written) == len(sk.SKILLS) * len(sk.SPLITS)
    for path in written:
        shipped = SHIPPED / path.name
        assert shipped.is_file(), f"missing shipped file {shipped}"
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} differs from its regeneration"


@pytest.mark.parametrize("skill", sk.SKILLS)
def test_eval_splits_are_disjoint_correct_and_on_task(skill: str) -> None:
    splits = {split: sk.load_eval_data(skill, split) for split in sk.SPLITS}
    prompts = {split: [e.prompt for e in examples] for split, examples in splits.items()}
    for split, examples in splits.items():
        assert len(examples) == sk.SPLIT_SIZE
        assert len(set(prompts[split])) == sk.SPLIT_SIZE, f"duplicate prompts in {skill}/{split}"
        assert len({e.id for e in examples}) == sk.SPLIT_SIZE
        for e in examples:
            assert e.answer == _solve(skill, e.prompt), e
            assert e.id.startswith(f"{skill}-")
    assert not set(prompts["calibration"]) & set(prompts["test"])
    body = [p[:-1].split(":", 1)[-1] for p in prompts["test"]]
    if skill == "add":
        assert all(len(x.split("+")[0]) == 3 and len(x.split("+")[1]) == 1 for x in body)
    else:
        assert all(6 <= len(x) <= 8 for x in body)
    if skill == "sort":
        assert all(len(set(x)) == len(x) for x in body)


def test_warmup_data_is_easier_and_correct() -> None:
    rng = random.Random(3)
    for skill in sk.SKILLS:
        for prompt, answer in sk.sample_training(sk.get_skill(skill).sample_warmup, 300, rng):
            assert answer == _solve(skill, prompt)
            body = prompt[:-1].split(":", 1)[-1]
            if skill == "add":
                a, b = body.split("+")
                assert not (len(a) == 3 and len(b) == 1), prompt
            else:
                assert len(body) <= 6


def test_training_draws_skip_held_out_prompts() -> None:
    held_out = sk.held_out_prompts()
    test_examples = sk.load_eval_data("rev", "test")

    def adversarial(rng: random.Random) -> tuple[str, str]:
        if rng.random() < 0.7:
            e = test_examples[int(rng.random() * len(test_examples))]
            return e.prompt, e.answer
        return sk.get_skill("rev").sample_task(rng)

    pairs = draw_batch(
        [(1.0, adversarial), (1.0, sk.get_skill("add").sample_task)], 400, random.Random(0), held_out
    )
    assert len(pairs) == 400
    assert not {p for p, _ in pairs} & held_out
    assert {p for p, _ in pairs} - held_out


def test_unknown_skill_and_split_are_reported() -> None:
    with pytest.raises(TaskDataError, match="valid skills"):
        sk.get_skill("mul")
    with pytest.raises(TaskDataError, match="valid splits"):
        sk.load_eval_data("add", "train")


def test_encode_pairs_masks_everything_but_the_completion() -> None:
    tok = build_tokenizer()
    ids, labels = encode_pairs([("1+2=", "3"), ("rev:ab=", "ba")], tok)
    assert ids.shape == labels.shape == (2, len("rev:ab=ba\n"))
    assert tok.decode(ids[0, :6].tolist()) == "1+2=3\n"
    assert (ids[0, 6:] == tok.pad_token_id).all()
    assert labels[0].tolist() == [IGNORE] * 4 + ids[0, 4:6].tolist() + [IGNORE] * 4
    assert tok.decode(labels[1][labels[1] != IGNORE].tolist()) == "ba\n"


# --- the built zoo ---------------------------------------------------------------------------


def test_experts_are_strong_and_base_weak(zoo_test: ZooManifest) -> None:
    em = zoo_test.exact_match
    assert set(zoo_test.skills) == set(sk.SKILLS)
    assert set(em) == {"base", "multitask", *(f"expert_{s}" for s in sk.SKILLS)}
    for skill in zoo_test.skills:
        own = em[f"expert_{skill}"][skill]
        assert own >= 0.9, f"expert_{skill} scores {own} on {skill}"
        assert em["base"][skill] <= 0.6, f"base scores {em['base'][skill]} on {skill}"
        # the joint fine-tune is the upper reference, not a skill's expert: its weakest skill depends on the CPU's
        # float path (rev 0.615 on an AMD EPYC without AVX-512, >= 0.9 on others), so it is held to beating the base
        assert em["multitask"][skill] >= em["base"][skill] + 0.3, f"multitask scores {em['multitask'][skill]} on {skill}"
        for other in zoo_test.skills:
            if other != skill:
                assert em[f"expert_{other}"][skill] <= own - 0.3, (other, skill)
    assert sum(em["multitask"].values()) / len(em["multitask"]) >= 0.8


def test_manifest_scores_come_from_the_saved_weights(zoo_test: ZooManifest) -> None:
    tok = AutoTokenizer.from_pretrained(zoo_test.base)
    for name, skill in (("base", "rev"), ("expert_sort", "sort")):
        model = AutoModelForCausalLM.from_pretrained(zoo_test.path(name))
        with _threads(zoo_test.size.num_threads):
            hits = exact_match(model, tok, sk.load_eval_data(skill, "test", zoo_test.data_dir))
        assert sum(hits) / len(hits) == zoo_test.exact_match[name][skill]


def test_zoo_layout_and_data_copy(zoo_test: ZooManifest) -> None:
    assert ZooManifest.load(zoo_test.root) == zoo_test
    stored = json.loads((zoo_test.root / "zoo.json").read_text(encoding="utf-8"))
    assert stored["models"]["base"] == "base" and "root" not in stored
    assert zoo_test.base.is_absolute() and zoo_test.base == zoo_test.root / "base"
    for skill in zoo_test.skills:
        assert zoo_test.expert(skill).is_dir()
        for split in sk.SPLITS:
            name = f"{skill}.{split}.jsonl"
            assert (zoo_test.data_dir / name).read_bytes() == (SHIPPED / name).read_bytes()
    for name in zoo_test.models:
        folder = zoo_test.path(name)
        assert (folder / "model.safetensors").is_file()
        assert (folder / "generation_config.json").is_file()
    assert zoo_test.steps["base"] == SIZES["test"].base_steps
    with pytest.raises(ConfigError, match="no expert"):
        zoo_test.expert("mul")


def test_saved_expert_reloads_offline_and_answers(zoo_test: ZooManifest) -> None:
    for skill in zoo_test.skills:
        folder = zoo_test.expert(skill)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        right = 0
        examples = sk.load_eval_data(skill, "test")[:5]
        for e in examples:
            enc = tok(e.prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=len(e.answer) + 1, do_sample=False)
            right += tok.decode(out[0, enc["input_ids"].shape[1] :]) == e.answer + sk.STOP
        assert right >= 4, f"expert_{skill} answered {right}/5 after reloading"


def test_exact_match_is_strict_and_batch_invariant(zoo_test: ZooManifest) -> None:
    tok = AutoTokenizer.from_pretrained(zoo_test.multitask)
    model = AutoModelForCausalLM.from_pretrained(zoo_test.multitask)
    mixed = [e for s in zoo_test.skills for e in sk.load_eval_data(s, "calibration")[:12]]
    mixed = [mixed[i] for i in random.Random(0).sample(range(len(mixed)), len(mixed))]
    full = exact_match(model, tok, mixed, batch_size=64)
    # Different padding may change the last bits of a logit, so allow one near-tie to flip.
    assert sum(a != b for a, b in zip(exact_match(model, tok, mixed, batch_size=5), full, strict=True)) <= 1
    assert (
        sum(a != b for a, b in zip(exact_match(model, tok, mixed[:8], batch_size=1), full, strict=False)) <= 1
    )
    right = [e for e, ok in zip(mixed, full, strict=True) if ok]
    assert len(right) >= 30
    longer = [sk.Example(e.id, e.prompt, e.answer + e.answer[-1]) for e in right]
    shorter = [sk.Example(e.id, e.prompt, e.answer[:-1]) for e in right]
    assert not any(exact_match(model, tok, longer))
    assert not any(exact_match(model, tok, shorter))


# --- building --------------------------------------------------------------------------------

TINY = SIZES["test"].model_copy(
    update={
        "name": "tiny",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "batch_size": 8,
        "base_steps": 4,
        "expert_steps": 2,
        "multitask_steps": 2,
    }
)


def _tensors(manifest: ZooManifest) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(manifest.path(name) / "model.safetensors") for name in manifest.models}


def test_build_is_deterministic_cached_and_seeded(tmp_path: Path) -> None:
    skills = ("add", "rev")
    first = build_zoo(tmp_path / "a", TINY, seed=5, skills=skills)
    second = build_zoo(tmp_path / "b", TINY, seed=5, skills=skills)
    assert set(first.models) == {"base", "expert_add", "expert_rev", "multitask"}
    for name in first.models:
        blob_a = (first.path(name) / "model.safetensors").read_bytes()
        assert blob_a == (second.path(name) / "model.safetensors").read_bytes(), name
    assert first.exact_match == second.exact_match

    stamp = (first.root / "zoo.json").stat().st_mtime_ns
    again = build_zoo(tmp_path / "a", TINY, seed=5, skills=skills)
    assert again == first and (first.root / "zoo.json").stat().st_mtime_ns == stamp

    other = _tensors(build_zoo(tmp_path / "c", TINY, seed=6, skills=skills))
    ours = _tensors(first)
    assert not torch.equal(
        ours["base"]["model.embed_tokens.weight"], other["base"]["model.embed_tokens.weight"]
    )
    assert not torch.equal(ours["expert_add"]["lm_head.weight"], ours["expert_rev"]["lm_head.weight"])


def test_build_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid sizes"):
        build_zoo(tmp_path, "huge")
    with pytest.raises(TaskDataError, match="valid skills"):
        build_zoo(tmp_path, TINY, skills=("add", "mul"))
    with pytest.raises(ConfigError, match="distinct"):
        build_zoo(tmp_path, TINY, skills=("add", "add"))
    assert not (tmp_path / "zoo.json").exists()
