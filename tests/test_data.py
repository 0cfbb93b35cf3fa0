"""Fashion-MNIST offline: the real Debian files, the fingerprint of the real pixels, the clear
error when there is no data, DDPM_DATA_DIR / --data (a wrong one is an error, never replaced by
another copy), and corrupt files ("found but corrupt"). No test here touches the network."""
import gzip
import re
import shutil
import struct

import pytest
import torch

import ddpm_tutorial.data as data
from ddpm_tutorial.data import (IDX_FILES, DataCorruptError, DataNotFoundError, load_fashion_mnist,
                                prepare_root, to_unit)

pytestmark = pytest.mark.skipif(
    not all((data.DEBIAN_DIR / f"{n}.gz").exists() for n in IDX_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({data.DEBIAN_DIR} missing); "
           "install it with: apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="session")
def _shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg_cache")


@pytest.fixture
def cache(_shared_cache, monkeypatch):
    """A private cache (XDG_CACHE_HOME) shared by this module's tests, no DDPM_DATA_DIR."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_shared_cache))
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    return _shared_cache


@pytest.mark.xdist_group("fashion_mnist_cache")   # decompress once per run, not per worker
def test_test_split_from_debian(cache):
    x, y = load_fashion_mnist(train=False, subset=200, download=False)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (200,) and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1                    # uint8 0 and 255 map to the ends
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10
    # decompressed into the cache, never into the system folder
    assert (cache / "ddpm_tutorial" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    assert prepare_root(download=False) == cache / "ddpm_tutorial"
    full, labels = load_fashion_mnist(train=False, download=False)
    assert full.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * 10    # the test split is balanced
    assert torch.equal(full[:200], x)


@pytest.mark.slow
@pytest.mark.xdist_group("fashion_mnist_cache")
def test_train_split_fingerprint(cache):
    x, y = load_fashion_mnist(train=True, download=False)
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    u = to_unit(x)
    assert u.mean().item() == pytest.approx(data.TRAIN_MEAN, abs=5e-4) == pytest.approx(0.2860, abs=5e-4)
    assert u.std().item() == pytest.approx(data.TRAIN_STD, abs=5e-4) == pytest.approx(0.3530, abs=5e-4)
    assert torch.bincount(y).tolist() == [6000] * 10


def test_no_data_gives_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "debian").mkdir()
    (tmp_path / "xdg").mkdir()
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist(train=False, download=False)
    msg = str(info.value)
    assert "DDPM_DATA_DIR" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "internet" in msg
    assert str(tmp_path / "debian") in msg                    # says where it looked
    # an explicit DDPM_DATA_DIR that holds nothing is named too
    monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataNotFoundError, match=r"data folder .*empty \(DDPM_DATA_DIR\) does not exist"):
        load_fashion_mnist(train=False, download=False)


def test_ddpm_data_dir_with_gz_files(tmp_path, monkeypatch):
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for name in IDX_FILES:
        shutil.copy(data.DEBIAN_DIR / f"{name}.gz", folder / f"{name}.gz")
    (tmp_path / "nodebian").mkdir()
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nodebian")   # only DDPM_DATA_DIR can serve
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("DDPM_DATA_DIR", str(folder))
    x, y = load_fashion_mnist(train=False, subset=16, download=False)
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)
    assert (folder / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()   # decompressed in place
    assert not (tmp_path / "xdg").exists()
    # same pixels through the root argument (which wins over the environment variable)
    monkeypatch.setenv("DDPM_DATA_DIR", str(tmp_path / "nowhere"))
    x2, _ = load_fashion_mnist(train=False, root=folder, subset=16, download=False)
    assert torch.equal(x, x2)


@pytest.mark.xdist_group("fashion_mnist_cache")
def test_subset_and_to_unit(cache):
    with pytest.raises(ValueError, match="subset must be >= 0, got -1"):
        load_fashion_mnist(train=False, subset=-1, download=False)
    torch.testing.assert_close(to_unit(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


# --- a wrong --data / DDPM_DATA_DIR, corrupt files ---------------------------------------------

SHAPES = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
          "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}


def fake_idx(path, name):
    """A well-formed idx file of the right size, written sparse (all pixels 0): instant to make."""
    shape = SHAPES[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(f">{1 + len(shape)}I", 0x0800 + len(shape), *shape))
        f.truncate(4 + 4 * len(shape) + int(torch.Size(shape).numel()))


def fake_folder(folder, layout="flat"):
    for name in IDX_FILES:
        fake_idx(folder / name if layout == "flat" else folder / "FashionMNIST" / "raw" / name, name)
    return folder


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private cache, no DDPM_DATA_DIR, and the real Debian folder still in place (so a test
    shows that a wrong folder is an error even though another copy could have been used)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DDPM_DATA_DIR", raising=False)
    return tmp_path


@pytest.mark.parametrize("how", ["root", "env"])
def test_a_wrong_data_folder_is_an_error_not_another_copy(isolated, monkeypatch, how):
    def load(folder):
        if how == "env":
            monkeypatch.setenv("DDPM_DATA_DIR", str(folder))
            return load_fashion_mnist(train=False, subset=2)
        return load_fashion_mnist(train=False, subset=2, root=folder)

    why = r"\(DDPM_DATA_DIR\)" if how == "env" else r"\(--data / root=\)"
    undo = "unset DDPM_DATA_DIR" if how == "env" else "leave out --data / root="
    with pytest.raises(DataNotFoundError, match=rf"data folder .*nowhere {why} does not exist: .*{undo}"):
        load(isolated / "nowhere")
    (isolated / "afile").write_text("x")
    with pytest.raises(DataNotFoundError, match=rf"afile {why} is a file"):
        load(isolated / "afile")
    (isolated / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=rf"empty {why} does not hold Fashion-MNIST: none of its files"):
        load(isolated / "empty")
    partial = fake_folder(isolated / "partial")
    (partial / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load(partial)
    assert str(info.value).startswith(f"the data folder {partial} ")
    assert "missing t10k-labels-idx1-ubyte (.gz or not)" in str(info.value)
    assert "train-images" not in str(info.value).split("missing")[1].split(";")[0]
    assert not (isolated / "xdg").exists()            # nothing was read from or decompressed to the cache


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_a_named_folder_of_uncompressed_files_is_used(isolated, layout):
    folder = fake_folder(isolated / "mine", layout)
    assert prepare_root(folder, download=False) == folder
    assert all((folder / "FashionMNIST" / "raw" / n).is_file() for n in IDX_FILES)
    x, y = load_fashion_mnist(train=False, root=folder, subset=3)
    assert x.shape == (3, 1, 28, 28) and (x == -1).all() and (y == 0).all()   # the fake all-zero pixels


def fake_gz_folder(folder):
    """The four fake idx files as .gz, as Debian ships them."""
    folder.mkdir(parents=True)
    for name in IDX_FILES:
        fake_idx(folder / ".src" / name, name)
        with open(folder / ".src" / name, "rb") as fin, gzip.open(folder / f"{name}.gz", "wb", compresslevel=1) as f:
            shutil.copyfileobj(fin, f)
    shutil.rmtree(folder / ".src")
    return folder


def test_a_read_only_named_folder_gets_its_own_cache_copy(isolated, monkeypatch):
    folder = fake_gz_folder(isolated / "ro")
    monkeypatch.setattr(data.os, "access", lambda *args, **kwargs: False)   # as for a user who may not write there
    root = prepare_root(folder, download=False)
    assert root.parent == isolated / "xdg" / "ddpm_tutorial" / "copies"       # not the folder Debian's copy uses
    assert not (folder / "FashionMNIST").exists()
    assert prepare_root(folder, download=False) == root                         # the same copy next time


def corrupt(path, how):
    b = path.read_bytes()
    if how == "truncated":
        path.write_bytes(b[:len(b) - 100])
    elif how == "magic":
        path.write_bytes(b"\x00\x00\x08\x05" + b[4:])
    elif how == "shape":
        path.write_bytes(b[:4] + struct.pack(">I", 123) + b[8:])
    elif how == "header":
        path.write_bytes(b[:5])
    elif how == "gzipped":
        path.write_bytes(gzip.compress(b[:1000]))


@pytest.mark.parametrize("how, problem", [
    ("truncated", r"it has \d+ bytes, expected \d+ \(truncated\)"),
    ("magic", r"wrong magic number 0x00000805, expected 0x00000801"),
    ("shape", r"its header says shape \(123,\), expected \(10000,\)"),
    ("header", "less than an idx header"),
    ("gzipped", "still gzip-compressed"),
])
def test_corrupt_file_in_a_named_folder(isolated, how, problem):
    folder = fake_folder(isolated / "mine", "torchvision")
    bad = folder / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    corrupt(bad, how)
    with pytest.raises(DataCorruptError) as info:
        load_fashion_mnist(train=False, root=folder)
    msg = str(info.value)
    assert msg.startswith(f"Fashion-MNIST file {bad} was found but is corrupt: ")
    assert re.search(problem, msg), msg
    assert "To fix: replace it with a good copy" in msg and "dataset-fashion-mnist" in msg
    assert "\n" not in msg


def test_corrupt_cached_copy_says_delete_it(isolated, monkeypatch):
    debian = fake_gz_folder(isolated / "debian")       # a stand-in for Debian's folder
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    cache = prepare_root(download=False)                     # decompressed into the cache
    cached = cache / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    corrupt(cached, "truncated")
    with pytest.raises(DataCorruptError) as info:
        load_fashion_mnist(train=False, download=False)
    msg = str(info.value)
    assert f"{cached} was found but is corrupt" in msg
    assert f"To fix: delete the cached copy at {cached} and run again (it is made again from {debian})" in msg
    cached.unlink()                                          # what the message says to do
    assert load_fashion_mnist(train=False, subset=1, download=False)[0].shape == (1, 1, 28, 28)


@pytest.mark.parametrize("how, problem", [
    ("not gzip", r"it does not decompress \(BadGzipFile"),
    ("cut", r"it does not decompress \(EOFError"),
    ("bad content", r"it decompresses to a bad idx file: its header says shape \(0, 0, 0\)"),
])
def test_corrupt_debian_gz_says_reinstall(isolated, monkeypatch, how, problem):
    debian = isolated / "debian"
    debian.mkdir()
    for name in IDX_FILES:
        (debian / f"{name}.gz").write_bytes(b"")          # the first file fails before these matter
    first = debian / f"{IDX_FILES[0]}.gz"
    payload = gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 5000)
    first.write_bytes({"not gzip": b"hello", "cut": payload[:20], "bad content": payload}[how])
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    with pytest.raises(DataCorruptError) as info:
        load_fashion_mnist(train=False, download=False)
    msg = str(info.value)
    assert msg.startswith(f"Fashion-MNIST file {first} was found but is corrupt: ")
    assert re.search(problem, msg), msg
    assert "sudo apt-get install --reinstall dataset-fashion-mnist" in msg
    assert not list((isolated / "xdg").rglob("train-images-idx3-ubyte"))   # no bad copy left in the cache
