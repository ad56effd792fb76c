import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def micro_dataset():
    from mechrecall.config import get_preset
    from mechrecall.facts import generate

    preset = get_preset("micro")
    return generate(preset.data.spec(), preset.seed)


@pytest.fixture(scope="session")
def micro_tokenizer(micro_dataset):
    from mechrecall.tokenization import train_tokenizer

    return train_tokenizer(micro_dataset, "single_token")
