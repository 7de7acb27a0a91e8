"""Tests of pipeline.read.tarstream (through pipeline.read.source.iter_shard, its one caller):
stream failures, compressed and remote shards, hostile tars, read limits."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shlex
import shutil
import subprocess
import tarfile
import time
import tracemalloc

import numpy as np
import pytest
from shards import (
    array_samples,
    encode_image,
    npy_bytes,
    random_image,
    write_array_shard,
    write_tar,
)
from sources import source_group

from pipeline.fs import open_input
from pipeline.read import tarstream
from pipeline.read.decoders import ArrayDecoder, ImageDecoder
from pipeline.read.source import Reject, Sample, iter_shard
from pipeline.read.tarstream import ReadLimits, ShardReadError, ShardTimeoutError


def run(path, decoder, on_error="skip") -> list[Sample | Reject]:
    return list(iter_shard(str(path), decoder, on_error))


def kinds(items) -> list[tuple[str, int, str]]:
    return [(x.key, x.index, type(x).__name__) for x in items]


# -------------------------------------------------------------------------- stream failures


def member_offsets(path) -> list[int]:
    """Byte offset of each member's header in an uncompressed tar."""
    import tarfile

    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("on_error", ["skip", "fail"])
@pytest.mark.parametrize("where", ["mid-data", "mid-header", "member-boundary", "no-end-marker"])
def test_truncated_tar_yields_complete_samples_then_raises(tmp_path, where, on_error):
    path = tmp_path / "t.tar"
    keys = write_array_shard(path, 5, shape=(4, 16, 16))
    data = path.read_bytes()
    start = member_offsets(path)[3]  # the header of the 4th sample
    end = member_offsets(path)[4]
    cut = {
        "mid-data": start + 512 + 100,
        "mid-header": start + 100,
        "member-boundary": start,
        "no-end-marker": end + (end - start),  # all 5 members, no zero blocks
    }[where]
    path.write_bytes(data[:cut])
    it = iter_shard(str(path), ArrayDecoder(), on_error)
    n_complete = 5 if where == "no-end-marker" else 3
    got = [next(it).key for _ in range(n_complete)]
    assert got == keys[:n_complete]
    with pytest.raises(ShardReadError) as info:
        next(it)
    assert str(path) in str(info.value) and info.value.url == str(path)
    assert isinstance(info.value, OSError)


def test_every_truncation_point_is_detected(tmp_path):
    """Cut a shard at many offsets: it must raise unless the first end-of-archive block is
    complete, and what it yields before must be exact, in order, and include every sample whose
    members all precede the cut."""
    import tarfile

    path = tmp_path / "full.tar"
    expected = array_samples(4, (3, 50))  # 600-byte payloads: not block aligned
    write_tar(
        path, [(f"{k}.npy", npy_bytes(v)) for k, v in expected.items()] + [("s000003.cls", b"1")]
    )
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    ends = [m.offset_data + -(-m.size // 512) * 512 for m in members]
    marker = ends[-1]
    cut_path = tmp_path / "cut.tar"
    for cut in list(range(0, marker + 1024, 97)) + [e for e in ends] + [marker + 511]:
        cut_path.write_bytes(data[:cut])
        got = []
        try:
            for item in iter_shard(str(cut_path), ArrayDecoder(), "fail"):
                got.append(item)
            raised = False
        except ShardReadError:
            raised = True
        assert raised == (cut < marker + 512), cut
        for item in got:
            np.testing.assert_array_equal(item.array, expected[item.key])
        assert [x.key for x in got] == list(expected)[: len(got)]
        complete = sum(e <= cut for e in ends[:3]) + (ends[4] <= cut)  # s000003 = .npy + .cls
        assert len(got) >= complete, cut


def test_missing_shard(tmp_path):
    url = str(tmp_path / "nope.tar")
    with pytest.raises(ShardReadError, match="nope.tar"):
        list(iter_shard(url, ArrayDecoder()))


def test_empty_tar_yields_nothing_but_empty_file_is_an_error(tmp_path):
    assert run(write_tar(tmp_path / "e.tar", []), ArrayDecoder()) == []
    (tmp_path / "z.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match="z.tar"):
        run(tmp_path / "z.tar", ArrayDecoder())


def test_garbage_in_the_middle_of_a_tar(tmp_path):
    path = tmp_path / "g.tar"
    write_array_shard(path, 3)
    data = bytearray(path.read_bytes())
    offset = member_offsets(path)[1]
    data[offset : offset + 512] = os.urandom(512)
    path.write_bytes(bytes(data))
    it = iter_shard(str(path), ArrayDecoder())
    assert next(it).key == "s000000"
    with pytest.raises(ShardReadError):
        next(it)


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz"])
def test_compressed_tar(tmp_path, compress):
    members = [(f"{k}.npy", npy_bytes(v)) for k, v in array_samples(4).items()]
    path = write_tar(tmp_path / f"c.tar.{compress}", members, compress)
    assert [x.key for x in run(path, ArrayDecoder())] == list(array_samples(4))


def test_truncated_gzip(tmp_path):
    members = [(f"{k}.npy", npy_bytes(v)) for k, v in array_samples(4, (64, 64)).items()]
    path = write_tar(tmp_path / "c.tar.gz", members, "gz")
    data = path.read_bytes()
    assert gzip.decompress(data)  # valid before the cut
    path.write_bytes(data[: len(data) * 3 // 4])
    it = iter_shard(str(path), ArrayDecoder())
    with pytest.raises(ShardReadError, match="c.tar.gz"):
        for _ in range(5):
            next(it)


def test_pipe_and_file_urls(tmp_path):
    path = tmp_path / "shard 01.tar"
    keys = write_array_shard(path, 3)
    for url in (f"pipe:cat {shlex.quote(str(path))}", path.as_uri()):
        assert [x.key for x in iter_shard(url, ArrayDecoder())] == keys
    with pytest.raises(ShardReadError, match="pipe:"):
        list(iter_shard(f"pipe:cat {shlex.quote(str(tmp_path / 'missing.tar'))}", ArrayDecoder()))


def test_fsspec_urls_are_read_through_pipeline_fs(tmp_path, monkeypatch):
    """A scheme webdataset.gopen does not know (here fsspec's memory://; s3:// in
    tests/test_remote_storage.py) is opened by pipeline.fs.open_input: the stored bytes, so a
    .tar.gz is inflated here, in bounded steps, and not by the filesystem."""
    fsspec = pytest.importorskip("fsspec")
    members = [(f"{k}.npy", npy_bytes(v)) for k, v in array_samples(3).items()]
    memory = fsspec.filesystem("memory")
    root = f"memory://{tmp_path.name}"
    opened = []
    monkeypatch.setattr(tarstream, "open_input", lambda url: opened.append(url) or open_input(url))
    try:
        for name, compress in (("a.tar", ""), ("b.tar.gz", "gz")):
            with memory.open(f"{root}/{name}", "wb") as f:
                f.write(write_tar(tmp_path / name, members, compress).read_bytes())
            assert [x.key for x in iter_shard(f"{root}/{name}", ArrayDecoder())] == list(
                array_samples(3)
            )
        with open_input(f"{root}/b.tar.gz") as stream:  # pyarrow's default would inflate it
            assert stream.read(2) == b"\x1f\x8b"
        with pytest.raises(ShardReadError, match="cannot open shard memory://"):
            list(iter_shard(f"{root}/missing.tar", ArrayDecoder()))
        assert opened == [f"{root}/a.tar", f"{root}/b.tar.gz", f"{root}/missing.tar"]
    finally:
        memory.rm(f"/{tmp_path.name}", recursive=True)


def test_failing_pipe_after_valid_tar_is_an_error(tmp_path):
    path = tmp_path / "ok.tar"
    write_array_shard(path, 2)
    url = f"pipe:cat {shlex.quote(str(path))}; exit 3"
    with pytest.raises(ShardReadError, match="exit 3"):
        list(iter_shard(url, ArrayDecoder()))


def test_stopping_early_closes_the_stream(tmp_path):
    path = tmp_path / "x.tar"
    write_array_shard(path, 50)
    it = iter_shard(f"pipe:cat {shlex.quote(str(path))}", ArrayDecoder())
    next(it)
    it.close()  # must neither hang nor raise


# --------------------------------------------------------------------------- hostile shards
# Each test builds a real malformed tar; see the measured failures in the module
# docstring of pipeline/read/tarstream.py.


def tar_member(name, data: bytes = b"", fmt=tarfile.PAX_FORMAT, **attrs) -> bytes:
    """One member's header block(s) and padded data, as ``tarfile`` writes it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    pad = bytes(-len(data) % 512) if info.isreg() else b""
    return info.tobuf(fmt, "utf-8", "surrogateescape") + (data + pad if info.isreg() else b"")


def write_raw_tar(path, *members: bytes) -> str:
    path.write_bytes(b"".join(members) + bytes(1024))
    return str(path)


def gnu_sparse_member(
    name: str, real_size: int, segments: list[tuple[int, bytes]], claim: int = 0
) -> bytes:
    """An old-GNU sparse member (type ``S``, as ``tar --sparse`` writes it): ``real_size`` bytes,
    zeros but for ``segments`` ((offset, data), at most 4), which alone are stored; ``claim``:
    bytes the map says the last segment has beyond what is stored (a corrupt map)."""
    stored = b"".join(data for _, data in segments)
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = tarfile.GNUTYPE_SPARSE, len(stored), 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    for i, (offset, data) in enumerate(segments):
        pos = 386 + 24 * i
        header[pos : pos + 12] = tarfile.itn(offset, 12, tarfile.GNU_FORMAT)
        size = len(data) + (claim if i == len(segments) - 1 else 0)
        header[pos + 12 : pos + 24] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(real_size, 12, tarfile.GNU_FORMAT)  # the real size
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header) + stored + bytes(-len(stored) % 512)


def small_npy(value: float = 1.0) -> bytes:
    return npy_bytes(np.full((2, 3), value, np.float32))


def peak_bytes(fn):
    """(fn(), peak bytes allocated by Python while it ran)."""
    tracemalloc.start()
    try:
        return fn(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sparse_member_declaring_5_gib_is_rejected_unread(tmp_path):
    """A 10 KiB tar whose GNU sparse member says 5 GiB: tarfile's extractfile().read() would
    build 5 GiB of zeros. It is a Reject naming the member, its size and the key; the other
    samples of the shard are kept."""
    big = gnu_sparse_member("big.npy", 5 * 2**30, [(5 * 2**30 - 4, b"tail")])
    path = write_raw_tar(
        tmp_path / "s.tar",
        tar_member("a.npy", small_npy()),
        big,
        tar_member("big.cls", b"1"),
        tar_member("c.npy", small_npy()),
    )
    assert os.path.getsize(path) <= 10 * 1024
    items, peak = peak_bytes(lambda: run(path, ArrayDecoder()))
    assert kinds(items) == [("a", 0, "Sample"), ("big", 1, "Reject"), ("c", 2, "Sample")]
    assert items[1].reason == (
        "member 'big.npy' is 5368709120 bytes, more than source.max_member_bytes=268435456: "
        "not read (raise source.max_member_bytes if such members are expected)"
    )
    assert peak < 16 * 2**20


def test_sparse_member_under_the_cap_is_read_with_its_holes(tmp_path):
    data = [(0, b"head" * 100), (5000, b"middle"), (9000, b"end")]
    expected = bytearray(9003)
    for offset, chunk in data:
        expected[offset : offset + len(chunk)] = chunk
    path = write_raw_tar(tmp_path / "s.tar", gnu_sparse_member("x.bin", 9003, data))
    (item,) = run(path, lambda m: np.frombuffer(m["bin"], np.uint8).astype(np.float32))
    np.testing.assert_array_equal(item.array, np.frombuffer(bytes(expected), np.uint8))
    (item,) = list(iter_shard(path, lambda m: np.ones(1), limits=ReadLimits(max_member_bytes=9002)))
    assert "'x.bin' is 9003 bytes, more than source.max_member_bytes=9002" in item.reason
    lying = gnu_sparse_member("y.bin", 2**20, [(0, b"abc"), (1000, b"def")], claim=600)
    path = write_raw_tar(tmp_path / "l.tar", lying, tar_member("z.bin", b"ok"))
    items = run(path, lambda m: np.frombuffer(m["bin"], np.uint8).astype(np.float32))
    assert kinds(items) == [("y", 0, "Reject"), ("z", 1, "Sample")]
    assert (
        items[0].reason == "sparse member 'y.bin' maps more data than it stores: the tar is corrupt"
    )


def holey_npy(path, array: np.ndarray) -> None:
    """``array`` (zeros but its first and last values) saved as a file with a hole."""
    data = npy_bytes(array)
    with open(path, "wb") as f:
        f.write(data[:4096])
        f.seek(len(data) - 4096)
        f.write(data[-4096:])


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_tar_sparse_members(tmp_path, fmt):
    """``tar --sparse`` (old GNU sparse headers, or pax sparse 1.0 with --format=posix): a 5 GiB
    hole is rejected without being read, a sparse .npy under the cap decodes exactly."""
    if shutil.which("tar") is None or b"GNU tar" not in subprocess.check_output(
        ["tar", "--version"]
    ):
        pytest.skip("needs GNU tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big.npy", "wb") as f:
        f.truncate(5 * 2**30)
    array = np.zeros((1, 512, 512), np.float32)
    array.flat[0], array.flat[-1] = 1.5, -2.0
    holey_npy(src / "holey.npy", array)
    (src / "ok.npy").write_bytes(small_npy())
    shard = tmp_path / "s.tar"
    subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-cf", str(shard), "-C", str(src),
         "ok.npy", "big.npy", "holey.npy"],
        check=True,
    )  # fmt: skip
    with tarfile.open(shard) as tar:
        if not tar.getmember("holey.npy").issparse():
            pytest.skip("the file system made no hole")
    assert shard.stat().st_size < 64 * 1024
    items, peak = peak_bytes(lambda: run(shard, lambda m: ArrayDecoder()(m)))
    assert kinds(items) == [("ok", 0, "Sample"), ("big", 1, "Reject"), ("holey", 2, "Sample")]
    assert "'big.npy' is 5368709120 bytes, more than source.max_member_bytes" in items[1].reason
    np.testing.assert_array_equal(items[2].array, array)
    assert peak < 32 * 2**20


def test_gzip_bomb_member_is_rejected_and_the_rest_kept(tmp_path):
    """A .tar.gz member that inflates past the cap is skipped in bounded steps, never held."""
    members = [
        ("a.npy", small_npy()),
        ("bomb.npy", bytes(16 * 2**20)),  # 16 MiB of zeros: ~16 KiB compressed
        ("c.npy", small_npy()),
    ]
    path = write_tar(tmp_path / "b.tar.gz", members, "gz")
    assert path.stat().st_size < 64 * 1024
    limits = ReadLimits(max_member_bytes=2**20)
    items, peak = peak_bytes(lambda: list(iter_shard(str(path), ArrayDecoder(), limits=limits)))
    assert kinds(items) == [("a", 0, "Sample"), ("bomb", 1, "Reject"), ("c", 2, "Sample")]
    assert items[1].reason.startswith(
        "member 'bomb.npy' is 16777216 bytes, more than source.max_member_bytes=1048576"
    )
    assert peak < 8 * 2**20


def test_bzip2_bomb_is_inflated_in_bounded_steps(tmp_path):
    """tarfile's own stream inflates each 10 KiB read whole and copies the rest at every read:
    a 64 MiB zero member (~50 bytes of bzip2) took it seconds and 64+ MiB; 512 MiB, minutes."""
    members = [("a.npy", small_npy()), ("bomb.npy", bytes(64 * 2**20)), ("c.npy", small_npy())]
    path = write_tar(tmp_path / "b.tar.bz2", members, "bz2")
    assert path.stat().st_size < 4096
    limits = ReadLimits(max_member_bytes=2**20)
    start = time.perf_counter()
    items, peak = peak_bytes(lambda: list(iter_shard(str(path), ArrayDecoder(), limits=limits)))
    assert kinds(items) == [("a", 0, "Sample"), ("bomb", 1, "Reject"), ("c", 2, "Sample")]
    assert peak < 16 * 2**20 and time.perf_counter() - start < 20


def test_long_member_names_are_rejected_in_linear_time(tmp_path):
    """webdataset's base_plus_ext is quadratic in the slashes of a name (4 s at 40k characters,
    ~40 min at 10^6): such names are rejected before it runs; a name beyond the 1 MiB header
    bound is not even read whole."""
    slashes = "/" * 10**6 + "x"  # pax path record: 1 MB
    pairs = "a/" * 50_000 + "b.npy"  # 100k characters
    huge = "/" * (2 * 2**20) + "y.npy"  # pax header above MAX_HEADER_BYTES: skipped unread
    gnu = "/" * 10**6 + "z"  # GNU long name member
    path = write_raw_tar(
        tmp_path / "n.tar",
        tar_member("a.npy", small_npy()),
        tar_member(slashes, b"1"),
        tar_member(pairs, small_npy()),
        tar_member(huge, small_npy()),
        tar_member(gnu, b"2", fmt=tarfile.GNU_FORMAT),
        tar_member("c.npy", small_npy()),
    )
    start = time.perf_counter()
    items = run(path, ArrayDecoder())
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    assert [x.index for x in items] == list(range(6))
    assert [x.key for x in items if isinstance(x, Sample)] == ["a", "c"]
    long = [x for x in items if isinstance(x, Reject)]
    # keys: the names cut to 200 characters + "..."; the skipped pax header's member keeps the
    # 100-character name of its ustar header
    assert [len(x.key) for x in long] == [203, 203, 100, 203]
    for x, name in zip([long[0], long[1], long[3]], [slashes, pairs, gnu]):
        assert f"tar member name of {len(name)} bytes is longer than 1024 bytes" in x.reason
        assert "(max_name_bytes)" in x.reason and len(x.reason) < 600
    assert (
        "pax extended header of 2097" in long[2].reason and "(more than 1048576)" in long[2].reason
    )


def test_bad_pax_header_rejects_its_member_in_linear_time(tmp_path):
    """CPython 3.11.7 parses pax records with a backtracking regex and keeps a key per bogus
    record (CVE-2024-6232): 43 KB of "2 2 2 ..." took 2.7 s and 400 MB, 1 MiB would take hours.
    A malformed pax header now rejects the member it describes; the shard goes on."""
    body = b"2 " * 200_000 + b"=x\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(body)
    bad = pax.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)
    path = write_raw_tar(
        tmp_path / "p.tar",
        tar_member("a.npy", small_npy()),
        bad + tar_member("b.npy", small_npy(), fmt=tarfile.USTAR_FORMAT),
        tar_member("c.npy", small_npy()),
    )
    start = time.perf_counter()
    items, peak = peak_bytes(lambda: run(path, ArrayDecoder()))
    assert time.perf_counter() - start < 1.0 and peak < 16 * 2**20
    assert kinds(items) == [("a", 0, "Sample"), ("b", 1, "Reject"), ("c", 2, "Sample")]
    assert "bad pax extended header" in items[1].reason and "'b.npy'" in items[1].reason


def test_shard_timeout_with_a_slow_decoder(tmp_path):
    """The bound fails the shard as a stream fault: the samples before it were yielded."""
    path = tmp_path / "t.tar"
    keys = write_array_shard(path, 20, shape=(2, 2))

    def slow(members):
        time.sleep(0.05)
        return ArrayDecoder()(members)

    got = []
    with pytest.raises(ShardReadError) as info:
        for item in iter_shard(str(path), slow, limits=ReadLimits(shard_timeout_s=0.3)):
            got.append(item.key)
    assert 1 <= len(got) < 20 and got == keys[: len(got)]
    assert isinstance(info.value, ShardTimeoutError)
    err = pickle.loads(pickle.dumps(info.value))  # crosses Ray actors
    assert isinstance(err, ShardTimeoutError) and err.url == str(path)
    message = str(info.value)
    assert str(path) in message and "timed out" in message
    assert "source.shard_timeout_s=0.3 s" in message and info.value.url == str(path)


def test_shard_timeout_between_members(tmp_path):
    path = tmp_path / "t.tar"
    write_array_shard(path, 3)
    with pytest.raises(ShardReadError, match=r"timed out between members.*shard_timeout_s=1e-09"):
        list(iter_shard(str(path), ArrayDecoder(), limits=ReadLimits(shard_timeout_s=1e-9)))


def test_time_spent_by_the_consumer_is_not_counted(tmp_path):
    path = tmp_path / "t.tar"
    keys = write_array_shard(path, 4, shape=(2, 2))
    got = []
    for item in iter_shard(str(path), ArrayDecoder(), limits=ReadLimits(shard_timeout_s=0.5)):
        got.append(item.key)
        time.sleep(0.25)  # 1 s in all, the source's own share is milliseconds
    assert got == keys


def test_links_and_special_members_are_rejected_never_followed(tmp_path):
    """GNU tar stores a file's second name as a hard link member: those samples vanished with no
    reject. Links, devices and FIFOs are now rejected with the fix; directories are skipped."""
    if shutil.which("tar") is None:
        pytest.skip("needs tar")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    image = encode_image(random_image((12, 10)))
    (src / "a.png").write_bytes(image)
    os.link(src / "a.png", src / "b.png")  # the same file twice: a hard link member
    (src / "b.cls").write_bytes(b"1")
    secret = tmp_path / "secret.png"
    secret.write_bytes(image)
    os.symlink(secret, src / "c.png")
    os.mkfifo(src / "d.png")
    (src / "sub" / "e.png").write_bytes(image)
    path = tmp_path / "x.tar"
    names = ["a.png", "b.png", "b.cls", "c.png", "d.png", "sub"]
    subprocess.run(["tar", "-cf", str(path), "-C", str(src), *names], check=True)
    with tarfile.open(path) as tar:  # what GNU tar wrote
        assert tar.getmember("b.png").islnk() and tar.getmember("sub").isdir()
    with tarfile.open(path, "a") as tar:  # and a device, which tar would need a real one for
        device = tarfile.TarInfo("f.png")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
    items = run(path, ImageDecoder(8))
    assert kinds(items) == [
        ("a", 0, "Sample"),
        ("b", 1, "Reject"),
        ("c", 2, "Reject"),
        ("d", 3, "Reject"),
        ("sub/e", 4, "Sample"),
        ("f", 5, "Reject"),
    ]
    assert items[1].reason == (
        "hard link member 'b.png' (to 'a.png') is not supported: re-create the tar with "
        "--hard-dereference so that every member holds its data"
    )
    assert items[2].reason.startswith(f"symbolic link member 'c.png' (to {str(secret)!r}) is not")
    assert "--dereference" in items[2].reason
    assert items[3].reason.startswith("FIFO member 'd.png' is not a regular file")
    assert items[5].reason.startswith("character device member 'f.png' is not a regular file")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_non_utf8_member_name_rejects_only_its_sample(tmp_path, fmt):
    """A name that is not UTF-8 made the worker fail the whole shard (UnicodeEncodeError when
    the key was hashed and written): only its sample is rejected, named with its bytes."""
    image = encode_image(random_image((12, 10)))
    bad = b"\xff\xfe.png".decode("utf-8", "surrogateescape")
    path = write_raw_tar(
        tmp_path / "u.tar",
        tar_member("a.png", image, fmt),
        tar_member(bad, image, fmt),
        tar_member("c.png", image, fmt),
    )
    items = run(path, ImageDecoder(8))
    assert kinds(items) == [("a", 0, "Sample"), ("\\xff\\xfe", 1, "Reject"), ("c", 2, "Sample")]
    assert items[1].reason == (
        "member name b'\\xff\\xfe.png' is not valid UTF-8: keys are stored as UTF-8 text; "
        "re-create the tar with UTF-8 member names"
    )
    json.dumps(items[1].__dict__, ensure_ascii=False).encode("utf-8")  # storable as UTF-8
    items = run(path, ArrayDecoder())
    assert all(isinstance(x, Reject) for x in items) and items[1].key == "\\xff\\xfe"


def test_read_limits():
    assert ReadLimits() == ReadLimits(256 * 2**20, 1024, 3600.0)
    source = source_group("images", max_member_bytes=10, shard_timeout_s=None)
    assert ReadLimits.from_source(source) == ReadLimits(10, 1024, None)
    assert ReadLimits.from_source(source_group("arrays")) == ReadLimits()  # the same defaults
    for bad in ({"max_member_bytes": 0}, {"max_name_bytes": 1.5}, {"shard_timeout_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ReadLimits(**bad)
    with pytest.raises(TypeError, match="ReadLimits"):
        iter_shard("x.tar", ArrayDecoder(), limits={"max_member_bytes": 1})
