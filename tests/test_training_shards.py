"""Broken training shards (issue 18 item 7): random bytes, a truncated shard, a member that is not a PNG, text that
is not UTF-8 -- each a ShardError naming the shard file and, where there is one, the member."""
import io
import tarfile

import pytest
from PIL import Image

from faithful_inpaint.training.data import ShardDataset, ShardError
from faithful_inpaint.training.lar_gen import QuadrupleDataset
from faithful_inpaint.training.make_synthetic_data import write_dataset


def shard_with(path, members: dict):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png(size=(16, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_shard_of_random_bytes_is_named(tmp_path):
    folder = write_dataset(tmp_path / "d", count=2, size=16, per_shard=2)
    bad = folder / "zz-random.tar"
    bad.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ShardError, match=f"{bad}: not a readable tar shard"):
        ShardDataset(folder, resolution=16)


def test_a_truncated_shard_is_named_with_its_member(tmp_path):
    folder = write_dataset(tmp_path / "d", count=4, size=32, per_shard=4)
    shard = next(folder.glob("*.tar"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=rf"{shard}: (member \S+ is cut short|not a readable tar shard)"):
        ShardDataset(folder, resolution=16)


def test_a_shard_truncated_after_indexing_is_named_at_read_time(tmp_path):
    folder = write_dataset(tmp_path / "d", count=4, size=32, per_shard=4)
    ds = ShardDataset(folder, resolution=16)
    shard = ds.shards[0]
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(ShardError, match=rf"{shard}: member \S+ is cut short"):
        [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("member, data, what", [
    ("000000001.image.png", b"this is not a png", "not a readable image"),
    ("000000001.image.png", png()[:40], "not a readable image"),            # a PNG cut inside its data
    ("000000001.mask.png", b"\x89PNG\r\n\x1a\n garbage", "not a readable image"),
    ("000000001.global.txt", b"\xff\xfe\xfa", "not UTF-8 text"),
])
def test_a_bad_member_is_named(tmp_path, member, data, what):
    members = {"000000000.image.png": png(), "000000000.global.txt": b"a red square",
               "000000001.image.png": png(), "000000001.mask.png": png(), "000000001.global.txt": b"a red square"}
    members[member] = data
    shard_with(tmp_path / "s.tar", members)
    ds = ShardDataset(tmp_path, resolution=16)
    ds[0]
    with pytest.raises(ShardError, match=rf"{tmp_path / 's.tar'}: member {member.replace('.', '[.]')} is {what}"):
        ds[1]


def test_a_sample_without_an_image_is_named(tmp_path):
    shard_with(tmp_path / "s.tar", {"000000007.global.txt": b"a caption", "000000007.local.txt": b"x"})
    with pytest.raises(ShardError, match="s.tar: sample 000000007 lacks an image or a global caption"):
        ShardDataset(tmp_path, resolution=16)


def test_quadruple_shards_name_the_member_too(tmp_path):
    members = {"000000000.image.png": png(), "000000000.global.txt": b"g", "000000000.local.txt": b"l",
               "000000000.mask.png": png(), "000000000.subject.png": b"not a png"}
    shard_with(tmp_path / "q.tar", members)
    with pytest.raises(ShardError, match=r"q.tar: member 000000000[.]subject[.]png is not a readable image"):
        QuadrupleDataset(tmp_path, resolution=16)[0]
