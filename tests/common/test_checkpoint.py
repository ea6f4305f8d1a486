import pytest
import torch

from common.checkpoint import CheckpointError, CheckpointMeta, read_model, save_model
from common.nets import NetConfig, VelocityNet, num_parameters
from student.pretrain import pretrain_all


def test_velocity_net_has_spec_size_and_shapes():
    net = VelocityNet()
    assert num_parameters(net) == 35_714
    v = net(torch.randn(7, 2), torch.rand(7))
    assert v.shape == (7, 2)
    big = VelocityNet(NetConfig(data_dim=16, width=32, depth=2, frequencies=4))
    assert big(torch.randn(3, 16), torch.rand(3)).shape == (3, 16)


def test_roundtrip_keeps_weights_metadata_and_digest(tmp_path):
    net = VelocityNet(NetConfig(width=16, depth=2))
    meta = save_model(
        tmp_path / "m.safetensors",
        net,
        CheckpointMeta(
            name="m", role="teacher", modes=[0, 2], mode_centers=[[4.0, 0.0], [0.0, 4.0]]
        ),
    )
    loaded, got = read_model(tmp_path / "m.safetensors")
    assert got.digest == meta.digest and got.digest.startswith("sha256:")
    assert got.arch == NetConfig(width=16, depth=2) and got.modes == [0, 2]
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(loaded(x, t), net(x, t))


def test_corrupt_or_foreign_files_are_refused_with_reason(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_model(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a directory; give a .safetensors file"):
        read_model(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_model(tmp_path / "junk.safetensors")
    path = tmp_path / "m.safetensors"
    save_model(
        path, VelocityNet(NetConfig(width=8, depth=1)), CheckpointMeta(name="m", role="base")
    )
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the weights
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        read_model(path)


def test_pretrain_is_byte_identical_per_seed_and_keeps_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    pretrain_all(a, seed=0, steps=20, log=lambda *_: None)
    pretrain_all(b, seed=0, steps=20, log=lambda *_: None)
    pretrain_all(c, seed=1, steps=20, log=lambda *_: None)
    for f in ("base.safetensors", "teacher-a.safetensors", "teacher-b.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()
    _, meta = read_model(a / "teacher-b.safetensors")
    assert (
        meta.modes == [1, 3]
        and meta.role == "teacher"
        and meta.steps == 20
        and len(meta.mode_centers) == 2
    )
    before = (a / "base.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert pretrain_all(a, seed=5, steps=20, log=lines.append) == []  # kept without --force
    assert len(lines) == 3 and all(line.endswith("(exists; --force to retrain)") for line in lines)
    assert (a / "base.safetensors").stat().st_mtime_ns == before


def test_atomic_write_gives_the_mode_a_plain_open_would(tmp_path):
    import os
    import stat

    from common.checkpoint import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "x.bin", b"data")
        (tmp_path / "y.bin").write_bytes(b"data")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "x.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "y.bin").stat().st_mode) == 0o644
    assert (tmp_path / "x.bin").read_bytes() == b"data"
