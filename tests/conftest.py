"""Session-wide test settings and fixtures.

* Hugging Face libraries are forced offline for the whole session: nothing may be downloaded.
* ``zoo_test``: the manifest of a ``test``-size tiny model zoo (base, one expert per skill, multitask),
  built once per session. Set ``EVOMERGE_ZOO_CACHE`` to a folder to keep it between sessions; it is
  rebuilt there only when the zoo recipe, size or seed changes.
* ``isolated_hf``: ``HF_HOME`` in a temporary folder (lm-eval caches datasets there) and one torch thread.
* ``real_zoo_test``: like ``zoo_test``, for the ``real-test`` size of the real zoo (skipped without ``evomerge[real]``);
  ``real_base_loader`` reads the GGUF base at most once per session.
"""

from __future__ import annotations

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

    cache = os.environ.get("EVOMERGE_ZOO_CACHE")
    root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("zoo")
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

    cache = os.environ.get("EVOMERGE_ZOO_CACHE")
    root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("realzoo")
    return build_real_zoo(root / "real-test-seed0", "real-test", 0, load_base=real_base_loader)
