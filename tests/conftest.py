import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def micro_dataset():
    from mechrecall.lab.bios import generate
    from mechrecall.lab.config import get_preset

    preset = get_preset("micro")
    return generate(preset.data.spec(), preset.seed)


@pytest.fixture(scope="session")
def micro_tokenizer(micro_dataset):
    from mechrecall.lab.tokenizer import train_tokenizer

    return train_tokenizer(micro_dataset, "single_token")


@pytest.fixture(scope="session")
def micro_model(micro_tokenizer):
    """A randomly initialised micro-preset model (read-only: tests that change weights build their own)."""
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.models import build_model

    return build_model(get_preset("micro").model, micro_tokenizer, seed=0)


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One full ``reproduce`` of the micro preset (both regimes, every analysis), shared by the end-to-end tests."""
    from mechrecall.__main__ import main

    out = tmp_path_factory.mktemp("repro") / "micro"
    reg = out.parent / "checkpoints.yaml"
    rc = main(["reproduce", "--preset", "micro", "--out", str(out), "--registry", str(reg), "--quiet"])
    assert rc == 0
    return out, reg
