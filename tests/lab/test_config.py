import pytest

from mechrecall.lab.config import PRESETS, get_preset


def test_presets_validate():
    for name in PRESETS:
        assert get_preset(name).name == name


def test_overrides_apply_and_validate():
    p = get_preset("micro", ["mixed.steps=7", "seed=3", "data.name_style=multi_token"])
    assert (p.mixed.steps, p.seed, p.data.name_style) == (7, 3, "multi_token")


@pytest.mark.parametrize(
    "override, match",
    [
        ("mixed.stepz=3", "unknown key 'stepz'"),
        ("mixed.steps=-1", "greater than or equal"),
        ("nosection.x=1", "not a config section"),
        ("mixed.steps", "not of the form"),
        ("model.n_heads=3", "must divide"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises((KeyError, ValueError), match=match):
        get_preset("micro", [override])


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown preset 'nope'"):
        get_preset("nope")
