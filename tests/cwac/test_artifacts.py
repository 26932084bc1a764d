from __future__ import annotations

import pytest

from cwac.artifacts import ArtifactStore


def test_built_once_reused_and_rebuilt_on_key_change(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(d):
        calls.append(d)
        (d / "x.txt").write_text("hi")
        return {"n": 1}

    p1 = store.get_or_build("k", {"a": 1}, build)
    p2 = store.get_or_build("k", {"a": 1}, build)
    p3 = store.get_or_build("k", {"a": 2}, build)
    assert p1 == p2 != p3 and len(calls) == 2
    assert (p1 / "x.txt").read_text() == "hi" and ArtifactStore.meta(p1)["meta"] == {"n": 1}
    assert ArtifactStore.meta(p1)["host"]["cpus"] >= 1  # build_seconds says on what it was measured


def test_failed_build_leaves_nothing_usable(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(d):
        (d / "half.bin").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        store.get_or_build("k", {"a": 1}, boom)
    assert not store.exists("k", {"a": 1})
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in (tmp_path / "k").iterdir())


def test_a_killed_builders_folder_is_removed_by_the_next_build(tmp_path):
    """A SIGKILLed build cannot clean up; the next builder (holding the lock) removes its folder."""
    store = ArtifactStore(tmp_path)
    final = store.path_for("k", {"a": 1})
    dead = final.parent / f".{final.name}.tmp-999999"
    dead.mkdir(parents=True)
    (dead / "half.bin").write_text("partial")
    store.get_or_build("k", {"a": 1}, lambda d: (d / "x.txt").write_text("ok") and None)
    assert not dead.exists() and (final / "x.txt").read_text() == "ok"
    assert [p.name for p in (tmp_path / "k").iterdir() if p.name.startswith(".")] == []


def test_metadata_and_records_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from cwac.utils import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "record.json", {"a": 1})
        path = ArtifactStore(tmp_path / "art").get_or_build("k", {"x": 1}, lambda out: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "record.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((path / "artifact.json").stat().st_mode) == 0o644


def test_artifact_files_are_readable_per_the_umask(tmp_path):
    """safetensors (like mkstemp) writes 0600; a shared CWAC_ARTIFACTS needs 0644 under umask 022."""
    import os
    import stat

    from cwac.artifacts import ArtifactStore

    def build(d):
        fd = os.open(d / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        (d / "sub").mkdir(mode=0o700)
        (d / "sub" / "x.json").write_text("{}")
        os.chmod(d / "sub" / "x.json", 0o600)

    old = os.umask(0o022)
    try:
        out = ArtifactStore(tmp_path).get_or_build("kind", {"k": 1}, build)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes == {".": 0o755, "model.safetensors": 0o644, "sub": 0o755, "sub/x.json": 0o644, "artifact.json": 0o644}
