"""Session-wide test settings and fixtures.

* Hugging Face libraries are forced offline for the whole session: nothing may be downloaded.
* ``zoo_test``: the manifest of a ``test``-size tiny model zoo (base, one expert per skill, multitask),
  built once per session. Set ``EVOMERGE_ZOO_CACHE`` to a folder to keep it between sessions; it is
  rebuilt there only when the zoo recipe, size or seed changes.
* ``isolated_hf``: ``HF_HOME`` in a temporary folder (lm-eval caches datasets there) and one torch thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
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
