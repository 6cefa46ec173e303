"""Shared test fixtures: where the reference data lives and the tiny SD-shaped configs."""
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


def reference(name: str) -> Path:
    """A file of ../shared/reference (tests only; the package never needs it)."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"{path} is missing: put the shared reference folder beside the checkout")
    return path


def load_reference_json(name: str) -> dict:
    return json.loads(reference(name).read_text())


@pytest.fixture(scope="session")
def tiny_configs() -> dict:
    """`tiny_test_configs.json`: {'sd1': {'unet', 'vae', 'text_encoder'}, 'sd2': {...}}."""
    return load_reference_json("tiny_test_configs.json")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine (use with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
