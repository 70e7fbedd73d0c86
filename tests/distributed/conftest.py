"""Session fixtures: ONE spawn per world size runs every layer-parity case and every training run.

world2: 2 ranks; layer parity with EP=2 and EP=1; training from scratch with (topk, EP=1), (topk, EP=2),
        (switch, EP=2), saving the EP=2 runs' gathered checkpoints; moeflow.train.Trainer with DistributedHooks.
world4: 4 ranks; layer parity with EP=4 and EP=2 x EDP=2; resuming those checkpoints with (topk, EP=4),
        (topk, EP=2), (switch, EP=4).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dist_harness import run_world
from ep_workers import combined_worker


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """References in this process use one thread: the spawned ranks already occupy the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the world-2 run writes its logical checkpoints."""
    return tmp_path_factory.mktemp("ep_ckpt")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text corpus for the Trainer run (stdlib sources, as in tests/test_train.py)."""
    import inspect
    import json
    import textwrap
    f = tmp_path_factory.mktemp("ep_corpus") / "corpus.txt"
    f.write_text((inspect.getsource(json) + inspect.getsource(textwrap)) * 2)
    return f


@pytest.fixture(scope="session")
def world2(ckpt_dir: Path, corpus: Path) -> list[dict]:
    """Per-rank results of the 2-rank spawn (including a Trainer run with DistributedHooks)."""
    return run_world(combined_worker, 2, [2, 1], [("topk", 1), ("topk", 2), ("switch", 2)], str(ckpt_dir), False,
                     str(corpus))


@pytest.fixture(scope="session")
def world4(world2: list[dict], ckpt_dir: Path) -> list[dict]:
    """Per-rank results of the 4-rank spawn (needs world2's checkpoints)."""
    return run_world(combined_worker, 4, [4, 2], [("topk", 4), ("topk", 2), ("topk", 1), ("switch", 4)],
                     str(ckpt_dir), True)
