"""Fashion-MNIST offline: the real Debian files, the fingerprint of the real pixels, the clear
error when there is no data, and DDPM_DATA_DIR. No test here touches the network."""
import shutil

import pytest
import torch

import ddpm_tutorial.data as data
from ddpm_tutorial.data import (IDX_FILES, DataNotFoundError, load_fashion_mnist, prepare_root,
                                to_unit)

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
    with pytest.raises(DataNotFoundError, match=r"DDPM_DATA_DIR: .*empty"):
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
