"""Sinusoidal time embedding: shapes (odd dims too), values by hand, bad inputs."""
import math

import pytest
import torch

from ddpm_tutorial.embeddings import TimeEmbedding, sinusoidal_embedding

T_VALUES = torch.tensor([0, 1, 17, 500, 999])


@pytest.mark.parametrize("dim", [2, 7, 8, 33, 128])
def test_shape_and_dtype(dim):
    emb = sinusoidal_embedding(T_VALUES, dim)
    assert emb.shape == (5, dim)
    assert emb.dtype == torch.float32
    assert emb.abs().max() <= 1


@pytest.mark.parametrize("dim", [7, 33, 129])
def test_odd_dim_is_even_embedding_plus_zero_column(dim):
    emb = sinusoidal_embedding(T_VALUES, dim)
    assert torch.equal(emb[:, -1], torch.zeros(5))
    assert torch.equal(emb[:, :-1], sinusoidal_embedding(T_VALUES, dim - 1))


def test_values_by_hand():
    dim, half = 8, 4
    t = torch.tensor([0, 3, 250])
    emb = sinusoidal_embedding(t, dim)
    for row, tv in enumerate((0, 3, 250)):
        for i in range(half):
            w = 10000 ** (-i / half)
            assert emb[row, i].item() == pytest.approx(math.sin(tv * w), abs=1e-5)         # sin half first
            assert emb[row, half + i].item() == pytest.approx(math.cos(tv * w), abs=1e-5)  # then cos
    assert emb[1, 1].item() == pytest.approx(math.sin(0.3), abs=1e-6)      # w_1 = 10000^(-1/4) = 0.1
    assert emb[1, half + 2].item() == pytest.approx(math.cos(0.03), abs=1e-6)
    # max_period is honoured
    other = sinusoidal_embedding(torch.tensor([3]), dim, max_period=100.0)
    assert other[0, 1].item() == pytest.approx(math.sin(3 * 100 ** (-1 / 4)), abs=1e-6)


def test_distinct_timesteps_get_distinct_embeddings():
    emb = sinusoidal_embedding(torch.arange(1000), 32)
    d = torch.cdist(emb, emb)
    d.fill_diagonal_(float("inf"))
    assert d.min() > 1e-3


def test_float_timesteps_accepted():
    torch.testing.assert_close(sinusoidal_embedding(torch.tensor([5.0, 7.0]), 16),
                               sinusoidal_embedding(torch.tensor([5, 7]), 16))


def test_bad_t_and_dim():
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(B,\), got \(4, 1\)"):
        sinusoidal_embedding(torch.zeros(4, 1, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(B,\), got \(\)"):
        sinusoidal_embedding(torch.tensor(3), 8)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(B,\), got int"):
        sinusoidal_embedding(3, 8)
    with pytest.raises(ValueError, match="embedding dim must be >= 2, got 1"):
        sinusoidal_embedding(T_VALUES, 1)


@pytest.mark.parametrize("base_dim", [8, 9])
def test_time_mlp(base_dim):
    torch.manual_seed(0)
    mlp = TimeEmbedding(base_dim, 20)
    out = mlp(T_VALUES)
    assert out.shape == (5, 20)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        mlp(T_VALUES[:, None])
