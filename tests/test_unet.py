"""The U-Net: shapes in every configuration, where the skips come from, and bad inputs."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_tutorial.config import ModelConfig
from ddpm_tutorial.unet import SelfAttention, UNet, count_parameters, decoder_inputs


def tiny(**kw) -> ModelConfig:
    base = dict(base_channels=8, channel_mults=(1, 2, 2), groups=4)
    base.update(kw)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(cfg).eval()


def inputs(cfg: ModelConfig, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, t


@pytest.mark.parametrize("skip, size, attention, nrb", list(itertools.product(
    ["pre", "post", "none"], [28, 32], [False, True], [1, 2])))
def test_output_shape(skip, size, attention, nrb):
    cfg = tiny(skip=skip, image_size=size, attention=attention, num_res_blocks=nrb)
    model = build(cfg)
    x, t = inputs(cfg)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("cfg", [tiny(time_embed_dim=33), tiny(base_channels=9, groups=3),
                                 tiny(channel_mults=(1,), image_size=28), tiny(in_channels=3, image_size=32)],
                         ids=["odd_temb", "odd_sinusoid", "one_level", "rgb"])
def test_output_shape_other_configs(cfg):
    model = build(cfg)
    x, t = inputs(cfg)
    with torch.no_grad():
        assert model(x, t).shape == x.shape


def test_every_parameter_gets_a_gradient():
    cfg = tiny(attention=True, num_res_blocks=2)
    model = build(cfg).train()
    x, t = inputs(cfg)
    model(x, t).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_output_depends_on_t_and_not_on_other_batch_items():
    cfg = tiny(attention=True)
    model = build(cfg)
    x, t = inputs(cfg, B=3)
    with torch.no_grad():
        out = model(x, t)
        out_t = model(x, torch.tensor([5, 500, 900]))
        single = model(x[1:2], t[1:2])
    assert not torch.allclose(out, out_t, atol=1e-4)                 # time injection works
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-4)  # no mixing across the batch


def test_parameter_counts():
    pre, post, none = (count_parameters(build(tiny(skip=s))) for s in ("pre", "post", "none"))
    assert pre == post
    assert none < pre
    # the same weights load into either mode: identical architecture, only the wiring differs
    build(tiny(skip="post")).load_state_dict(build(tiny(skip="pre")).state_dict())


def test_self_attention_matches_naive_formula():
    torch.manual_seed(0)
    attn = SelfAttention(8, groups=4)
    x = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        out = attn(x)
        qkv = attn.qkv(attn.norm(x)).flatten(2)                     # (B, 3C, HW)
        q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]             # each (B, C, HW)
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)   # (B, HW, HW)
        h = (w @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 8, 3, 5)
        expected = x + attn.proj(h)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def _encoder_features(model: UNet, x, t):
    """Independently of ``encode``: each level's features before and after its downsampling."""
    with torch.no_grad():
        temb = model.time_embed(t)
        h = model.conv_in(x)
        before, after = [], []
        for i, blocks in enumerate(model.down_blocks):
            for block in blocks:
                h = block(h, temb)
            if i < len(model.downsamples):
                before.append(h)
                h = model.downsamples[i](h)
                after.append(h)
    return before, after


def _is_2x2_constant(a):
    """True when every 2x2 block of (B, C, H, W), H and W even, holds one value."""
    return all(torch.equal(a[..., dy::2, dx::2], a[..., ::2, ::2]) for dy in (0, 1) for dx in (0, 1))


@pytest.mark.parametrize("size", [28, 32])
def test_what_the_decoder_concatenates(size):
    """pre: the encoder's full-resolution features; post: its downsampled features repeated
    2x2 (half the detail is gone); "none": nothing. Same weights in all three."""
    cfg = tiny(image_size=size, skip="pre")
    pre = build(cfg)
    post = build(tiny(image_size=size, skip="post"))
    post.load_state_dict(pre.state_dict())
    x, t = inputs(cfg)
    before, after = _encoder_features(pre, x, t)        # identical for both models: same weights
    L = len(cfg.widths)

    cap_pre, cap_post = decoder_inputs(pre, x, t), decoder_inputs(post, x, t)
    with torch.no_grad():
        temb = pre.time_embed(t)
        _, skips_pre, sizes = pre.encode(x, temb)
        _, skips_post, _ = post.encode(x, temb)
    assert sizes == [(size, size), (size // 2, size // 2)]
    for k in range(L - 1):
        i = L - 2 - k                                  # up_blocks[k] is decoder level i
        w, r = cfg.widths[i], sizes[i]
        skip_pre = cap_pre[k][:, -w:]                  # the last w_i channels are the skip
        skip_post = cap_post[k][:, -w:]
        assert cap_pre[k].shape == (2, cfg.widths[i + 1] + w, *r)

        assert torch.equal(skip_pre, before[i])        # exactly the pre-downsampling features
        assert torch.equal(skips_pre[i], before[i])
        assert not _is_2x2_constant(skip_pre)

        assert skips_post[i].shape[2:] == (r[0] // 2, r[1] // 2)
        assert torch.equal(skips_post[i], after[i])
        assert _is_2x2_constant(skip_post)             # nearest repetition of half resolution
        assert torch.equal(skip_post[..., ::2, ::2], after[i])
        assert not torch.allclose(skip_post, skip_pre)

        # the upsampled path (the first channels) is the same kind of tensor in both modes
        assert cap_post[k].shape == cap_pre[k].shape

    none = build(tiny(image_size=size, skip="none"))
    cap_none = decoder_inputs(none, x, t)
    with torch.no_grad():
        _, skips_none, _ = none.encode(x, none.time_embed(t))
    assert skips_none == [None] * (L - 1)
    for k in range(L - 1):
        assert cap_none[k].shape[1] == cfg.widths[L - 1 - k]   # only the upsampled features


def test_bad_inputs():
    cfg = tiny(image_size=28)
    model = build(cfg)
    x, t = inputs(cfg)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\), got \(1, 28, 28\)"):
        model(x[0], t)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        model(x.expand(2, 3, 28, 28), t)
    with pytest.raises(ValueError, match=r"built for 28x28 images, got \(32, 32\)"):
        model(F.pad(x, (2, 2, 2, 2)), t)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.uint8"):
        model(x.clamp(0, 1).to(torch.uint8), t)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\), got \(2, 1\)"):
        model(x, t[:, None])
    with pytest.raises(ValueError, match="t has 3 timesteps but the batch has 2 images"):
        model(x, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="t must be a torch.Tensor of integer timesteps, got int"):
        model(x, 5)
    with pytest.raises(TypeError, match="t must hold integer timesteps"):
        model(x, t.float())


@pytest.mark.parametrize("T", [1000, 50])
def test_timesteps_outside_0_T_are_refused(T):
    """The network is trained for t in [0, T): anything else is a caller's bug, refused
    with the range in the message (the embedding would happily encode t = T or -1)."""
    cfg = tiny(image_size=28)
    model = UNet(cfg, T=T).eval() if T != 1000 else UNet(cfg).eval()
    assert model.T == T
    x, _ = inputs(cfg)
    with torch.no_grad():
        model(x, torch.tensor([0, T - 1]))                       # the two ends are fine
        for bad in ([0, T], [-1, 3], [T + 100, 0]):
            with pytest.raises(ValueError, match=rf"timesteps must lie in \[0, {T}\)"):
                model(x, torch.tensor(bad))


def test_bad_configs():
    with pytest.raises(ValueError, match=r"divisible by groups=8 for GroupNorm; widths are \(12, 24\)"):
        ModelConfig(base_channels=12, channel_mults=(1, 2), groups=8)
    with pytest.raises(ValueError, match=r"skip must be one of \('pre', 'post', 'none'\), got 'mid'"):
        ModelConfig(skip="mid")
    with pytest.raises(ValueError, match=r"skip must be one of"):
        UNet(skip="after")
    with pytest.raises(ValueError, match="channel_mults must be positive integers"):
        ModelConfig(channel_mults=(1, 0))
    with pytest.raises(ValueError, match="channel_mults must be positive integers"):
        ModelConfig(channel_mults=())
    with pytest.raises(ValueError, match="num_res_blocks must be >= 1, got 0"):
        ModelConfig(num_res_blocks=0)
    with pytest.raises(ValueError, match=r"image_size=4 is too small for 4 levels \(needs >= 8\)"):
        ModelConfig(image_size=4, channel_mults=(1, 1, 1, 1))
    with pytest.raises(TypeError, match="either a ModelConfig or keyword overrides"):
        UNet(tiny(), base_channels=16)
    assert UNet(base_channels=8, channel_mults=(1, 2), groups=4).config == tiny(channel_mults=(1, 2))
