"""Pure parts of the router: specs from flags/env/files, registry snapshots, replica choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.router.pool import Pool
from services.router.registry import (
    Discovered,
    Endpoint,
    Registry,
    RegistryError,
    Replica,
    Teacher,
    parse_flag,
    read_registry_file,
    refreshed,
)
from services.router.settings import RouterSettings


def _teacher(name: str, centers: torch.Tensor | None = None, n: int = 1) -> Teacher:
    return Teacher(
        name, [Replica(Endpoint(f"http://h{i}:1", name)) for i in range(n)], centers=centers
    )


def test_flags_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_flag("a=http://h:1,http://h:2/#teacher-a")
    assert spec.name == "a" and spec.endpoints == (
        Endpoint("http://h:1"),
        Endpoint("http://h:2", "teacher-a"),
    )
    for bad in ("a", "a=", "a=ftp://x", "opd-router=http://h:1", "bad name=http://h:1"):
        with pytest.raises(RegistryError):
            parse_flag(bad)
    monkeypatch.setenv("OPD_ROUTER_TEACHER", "a=http://h:1;b=http://h:2,http://h:3")
    assert RouterSettings().teacher == ["a=http://h:1", "b=http://h:2,http://h:3"]
    f = tmp_path / "reg.yaml"
    f.write_text(
        "policy: label\nteachers:\n  a: http://h:1\n  b: {endpoints: [http://h:2], modes: [1, 3]}\n"
        "anchors:\n  base: [http://h:4]\n"
    )
    specs, policy = read_registry_file(f)
    assert policy == "label" and [s.name for s in specs] == ["a", "b", "base"]
    assert specs[1].modes == (1, 3) and specs[2].role == "anchor"
    f.write_text("teachers:\n  a: {endpoints: [http://h:1], colour: red}\n")
    with pytest.raises(RegistryError, match="unknown keys"):
        read_registry_file(f)
    f.write_text("teachers: [\n")
    with pytest.raises(RegistryError, match=r"reg.yaml is not valid YAML: line 2, column 1: "):
        read_registry_file(f)


def test_snapshots_and_nearest_needs_centers() -> None:
    c = torch.zeros(1, 2)
    reg = Registry((_teacher("a", c), _teacher("b", c)), (), "nearest")
    reg.check()
    with pytest.raises(RegistryError, match="needs mode centers.*c has none"):
        reg.with_teacher(_teacher("c"))
    label = Registry(reg.teachers, (), "label").with_teacher(_teacher("c"))
    assert label.names == ["a", "b", "c"]
    swapped = reg.with_teacher(_teacher("a", c, n=2))
    assert swapped.names == ["a", "b"] and len(swapped.teachers[0].replicas) == 2
    assert len(reg.teachers[0].replicas) == 1  # the old snapshot is untouched
    assert reg.without("a").names == ["b"]


def test_pick_prefers_live_least_loaded_then_ejected() -> None:
    t = _teacher("a", n=3)
    r0, r1, r2 = t.replicas
    r0.inflight, r1.inflight, r2.inflight = 2, 0, 1
    assert Pool.pick(t, set()) is r1
    r1.eject("refused")
    assert Pool.pick(t, set()) is r2
    assert Pool.pick(t, {id(r2), id(r0)}) is r1  # no live one left untried: try the ejected
    assert Pool.pick(t, {id(r0), id(r1), id(r2)}) is None


def test_refreshed_follows_a_new_checkpoint_once_replicas_agree() -> None:
    t = _teacher("a", torch.zeros(2, 2), n=2)
    t.digest, t.modes = "old", [0, 2]
    for r in t.replicas:
        r.version, r.digest = "1", "old"
    new_centers = torch.ones(2, 2)

    def found(replica: Replica) -> Discovered:
        return Discovered(Replica(replica.endpoint, "2", "new"), [1, 3], new_centers, 2)

    # one replica swapped, the other not: a rolling swap, the teacher is left as it is
    assert refreshed(t, t.replicas[0], found(t.replicas[0])) is None
    assert t.replicas[0].version == "2" and t.replicas[0].digest == "new"
    assert t.live_digests == ["new", "old"] and t.describe()["live_digests"] == ["new", "old"]
    # the other replica ejected: the live ones agree on the new checkpoint
    t.replicas[1].eject("down")
    new = refreshed(t, t.replicas[0], found(t.replicas[0]))
    assert new is not None and new is not t
    assert new.digest == "new" and new.modes == [1, 3] and torch.equal(new.centers, new_centers)
    assert t.digest == "old" and t.modes == [0, 2]  # the old snapshot's teacher is untouched
    # same digest again (a reload of the same file): nothing to publish
    assert refreshed(new, new.replicas[0], found(new.replicas[0])) is new
    # modes pinned by the registry entry stay; only the digest follows
    t.pinned = True
    pinned = refreshed(t, t.replicas[0], found(t.replicas[0]))
    assert pinned is not None and pinned.digest == "new" and pinned.modes == [0, 2]
