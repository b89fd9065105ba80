"""Full models (SPEC 4): the audio-visual regressor and the IEMOCAP self-/cross-attention classifiers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avkernels
from avkernels.losses import CCCLoss
from avkernels.models import (
    AudioGuidedSpatialAttention,
    AVRegressor,
    CrossAttentionClassifier,
    ModalitySpec,
    ResidualBiLSTM,
    SelfAttentionClassifier,
)

FUSIONS = ["jca", "rjca", "dca", "grjca"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# Small sizes: prime L and batch, unequal modality sizes.
SMALL = dict(dims=(8, 6), seq_len=5, joint_dim=10, head_hidden=4)
SPATIAL = dict(spatial_attention=True, spatial_channels=4, spatial_positions=9)


def small_regressor(fusion="grjca", **kwargs):
    return AVRegressor(**{**SMALL, "fusion": fusion, **kwargs})


def regressor_inputs(model, batch=3, dtype=torch.float32):
    return [torch.randn(batch, model.seq_len, d, dtype=dtype) for d in model.input_dims]


def keep(store, key, value):
    """Records ``value`` once; returns None, as a hook must unless it means to replace arguments or outputs."""
    store.setdefault(key, value)


def assert_every_parameter_gets_gradient(model, loss):
    model.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"


# ----------------------------------------------------------------------------------------------------------------
# Audio-visual regressor


def test_regressor_shape_table_official_sizes(monkeypatch):
    """The shape table of SPEC 2.1 (docs/spec.md): B = 2, L = 16, d_a = d_v = 512, through the DCA fusion."""
    model = AVRegressor((512, 512), 16, fusion="dca").eval()
    block = model.fusion.blocks[0]
    seen = {}
    record = lambda name, shape: keep(seen, name, shape)  # noqa: E731
    hooks = [
        block.query.register_forward_pre_hook(lambda m, args: record("J", args[0].shape)),
        block.keys[1].register_forward_hook(lambda m, args, out: record("K_a", out.shape)),
        block.outputs[1].register_forward_pre_hook(lambda m, args: record("H_a", args[0].shape)),
        block.register_forward_hook(lambda m, args, out: record("X_a'", out[1].shape)),
        model.joint.register_forward_hook(lambda m, args, out: record("joint", out.shape)),
    ]
    tanh_attention = avkernels.nn.blocks.tanh_attention

    def recording_tanh_attention(q, k, *args, **kwargs):
        # C_m = tanh(K_m Q / sqrt(d)): K_m is k (B, d_m, L), Q^T is q (B, d, L).
        seen.setdefault("C_a", []).append(torch.matmul(k, q.transpose(1, 2)).shape)
        return tanh_attention(q, k, *args, **kwargs)

    monkeypatch.setattr(avkernels.nn.blocks, "tanh_attention", recording_tanh_attention)
    with torch.no_grad():
        (valence, arousal), gates = model(torch.randn(2, 16, 512), torch.randn(2, 16, 512), return_gates=True)
    for h in hooks:
        h.remove()
    assert seen["J"] == (2, 16, 1024)
    assert seen["K_a"] == (2, 512, 16)
    assert seen["C_a"][1] == (2, 512, 1024)  # per block, video then audio
    assert seen["H_a"] == (2, 16, 1024)
    assert seen["X_a'"] == (2, 16, 512)
    assert gates["final"][1].shape == (2, 16, 2)
    assert seen["joint"] == (2, 16, 512)
    assert valence.shape == arousal.shape == (2, 16)


def test_official_blstm_block_size():
    # LSTM(512, 512, 2, 0.1): 2 layers x 2 directions of 256 units, initial state, Linear(1024 -> 512).
    per_direction_layer = 4 * 256 * (512 + 256) + 2 * 4 * 256
    expected = 2 * 2 * per_direction_layer + 2 * 2 * 2 * 256 + (1024 * 512 + 512)
    assert sum(p.numel() for p in ResidualBiLSTM(512, 512, 2, 0.1).parameters()) == expected


def test_residual_bilstm_against_official_formula():
    block = ResidualBiLSTM(6, 8, num_layers=2, dropout=0.1).eval()
    x = torch.randn(3, 7, 6)
    y = block(x)
    assert y.shape == (3, 7, 8)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3, 7))
    # The official layer: rows [0, 2 * layers) of init_hidden are h0, the rest c0, expanded over the batch.
    init = block.initial_state
    h0 = init[:4].unsqueeze(1).expand(4, 3, 4).contiguous()
    c0 = init[4:].unsqueeze(1).expand(4, 3, 4).contiguous()
    out, _ = block.rnn(x, (h0, c0))
    expected = F.normalize(block.projection(torch.cat((x, out), -1)), dim=-1)
    torch.testing.assert_close(y, expected)
    with torch.no_grad():
        block.initial_state.add_(1.0)  # the learned initial state is really used
    assert not torch.allclose(block(x), y)
    with pytest.raises(ValueError, match="hidden_size"):
        ResidualBiLSTM(6, 7)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_regressor_shapes_and_gradients(fusion):
    model = small_regressor(fusion, **SPATIAL)
    features = regressor_inputs(model)
    (valence, arousal), gates = model(*features, return_gates=True)
    assert valence.shape == arousal.shape == (3, 5)
    assert gates["spatial"].shape == (3, 5, 9)
    torch.testing.assert_close(gates["spatial"].sum(-1), torch.ones(3, 5))
    if fusion == "dca":
        assert [g.shape for g in gates["final"]] == [(3, 5, 2)] * 2
    if fusion == "grjca":
        assert len(gates["iterations"]) == 2 and [s.shape for s in gates["stage"]] == [(3, 5, 2)] * 2
    assert_every_parameter_gets_gradient(model, valence.square().sum() + arousal.square().sum())


def test_regressor_wiring():
    """Normalise, encode the audio, attend over the video guided by the encoded audio, encode the video, fuse,
    joint BiLSTM on [video | audio], heads."""
    model = small_regressor("dca", **SPATIAL).eval()
    seen = {}
    model.encoders[1].register_forward_hook(lambda m, args, out: keep(seen, "audio_in", (args[0], out)))
    model.spatial_attention.register_forward_hook(lambda m, args, out: keep(seen, "spatial", (args, out[0])))
    model.encoders[0].register_forward_hook(lambda m, args, out: keep(seen, "video_in", (args[0], out)))
    model.fusion.register_forward_hook(lambda m, args, out: keep(seen, "fusion", (args, out[0])))
    model.joint.register_forward_hook(lambda m, args, out: keep(seen, "joint", (args[0], out)))
    video, audio = regressor_inputs(model)
    with torch.no_grad():
        valence, arousal = model(video, audio)
    torch.testing.assert_close(seen["audio_in"][0], F.normalize(audio, dim=-1))
    (spatial_video, guide), spatial_out = seen["spatial"]
    torch.testing.assert_close(spatial_video, F.normalize(video, dim=-1))
    assert guide is seen["audio_in"][1]
    assert seen["video_in"][0] is spatial_out
    fusion_args, fused = seen["fusion"]
    assert fusion_args[0] is seen["video_in"][1] and fusion_args[1] is seen["audio_in"][1]
    torch.testing.assert_close(seen["joint"][0], torch.cat(fused, dim=-1))
    torch.testing.assert_close(valence, model.valence_head(seen["joint"][1]).squeeze(-1))
    torch.testing.assert_close(arousal, model.arousal_head(seen["joint"][1]).squeeze(-1))


def test_regressor_three_modalities_without_encoders():
    model = AVRegressor((8, 6, 4), 5, fusion="grjca", encoders=False, joint_dim=10, head_hidden=4)
    assert model.encoders is None
    valence, arousal = model(*[torch.randn(2, 5, d) for d in (8, 6, 4)])
    assert valence.shape == arousal.shape == (2, 5)
    assert_every_parameter_gets_gradient(model, (valence + arousal).square().sum())
    with pytest.raises(ValueError, match="features: expected 3 tensors"):
        model(torch.randn(2, 5, 8), torch.randn(2, 5, 6))


def test_regressor_fusion_options():
    assert small_regressor("RJCA", fusion_kwargs={"iterations": 3, "dropout": 0.2}).fusion.iterations == 3
    built = avkernels.DCA((8, 6), 5)
    weight = built.blocks[0].query.weight.detach().clone()
    model = small_regressor(built)
    assert model.fusion is built
    assert torch.equal(model.fusion.blocks[0].query.weight, weight)  # a given fusion is not re-initialised
    with pytest.raises(ValueError, match="fusion"):
        small_regressor("cam")
    with pytest.raises(ValueError, match="fusion"):
        small_regressor(avkernels.JCA((8, 6), 7))
    with pytest.raises(ValueError, match="fusion_kwargs"):
        small_regressor(built, fusion_kwargs={"iterations": 1})
    with pytest.raises(TypeError, match="fusion"):
        small_regressor(3)
    with pytest.raises(ValueError, match=r"dims\[1\]"):
        AVRegressor((8, 5), 5)
    with pytest.raises(ValueError, match="dims"):
        AVRegressor((8,), 5)


def test_regressor_initialisation():
    model = small_regressor("dca", **SPATIAL)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            bound = math.sqrt(6.0 / (module.in_features + module.out_features))
            assert module.weight.abs().max() <= bound + 1e-7, name
            assert module.bias is None or torch.all(module.bias == 0), name
    lstm = model.encoders[0].rnn
    bound = 1.0 / math.sqrt(lstm.hidden_size)  # PyTorch's default LSTM init, kept as in the official code
    assert all(p.abs().max() <= bound for p in lstm.parameters())
    assert torch.any(lstm.bias_ih_l0 != 0)


@pytest.mark.parametrize("fusion", ["jca", "grjca"])
def test_regressor_eval_deterministic_train_stochastic(fusion):
    model = small_regressor(fusion, **SPATIAL)
    features = regressor_inputs(model)
    model.eval()
    with torch.no_grad():
        first, second = model(*features), model(*features)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    model.train()
    with torch.no_grad():
        first, second = model(*features), model(*features)
    assert not torch.equal(first[0], second[0])


def test_regressor_empty_batch_and_nan():
    model = small_regressor("grjca", **SPATIAL).eval()
    empty = model(*regressor_inputs(model, batch=0))
    assert [o.shape for o in empty] == [(0, 5), (0, 5)]
    features = regressor_inputs(model, batch=2)
    features[0][0, 2, 3] = float("nan")
    with torch.no_grad():
        valence, arousal = model(*features)
    # The time-axis maps and the BiLSTMs spread a NaN over its whole sequence, never into another sample.
    assert torch.isnan(valence[0]).all() and torch.isnan(arousal[0]).all()
    assert torch.isfinite(valence[1]).all() and torch.isfinite(arousal[1]).all()


def test_regressor_bad_inputs():
    model = small_regressor("dca")
    video, audio = regressor_inputs(model, batch=2)
    with pytest.raises(ValueError, match="features: expected 2 tensors"):
        model(video)
    with pytest.raises(ValueError, match="features: expected 2 tensors"):
        model(video, audio, audio)
    with pytest.raises(ValueError, match="audio"):
        model(video, torch.randn(2, 5, 7))  # wrong feature size
    with pytest.raises(ValueError, match="video"):
        model(torch.randn(2, 6, 8), audio)  # wrong L
    with pytest.raises(ValueError, match="audio"):
        model(video, torch.randn(3, 5, 6))  # batch mismatch
    with pytest.raises(ValueError, match="video"):
        model(video[0], audio)
    with pytest.raises(TypeError, match="video"):
        model(video.long(), audio)
    with pytest.raises(TypeError, match="audio"):
        model(video, audio.double())
    with pytest.raises(TypeError, match="video"):
        model(video.numpy(), audio)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fusion", FUSIONS)
def test_regressor_on_cuda_matches_cpu(fusion):
    """The default backend on CUDA (fused kernels) against the CPU run; cuDNN's TF32 is off so that only the
    kernels' fp32 rounding differs."""
    model = small_regressor(fusion, **SPATIAL).eval()
    features = regressor_inputs(model)
    with torch.no_grad():
        expected = model(*features)
        model.cuda()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            got = model(*[x.cuda() for x in features])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.cpu(), e, atol=2e-3, rtol=2e-3)


def test_spatial_attention_against_per_clip_oracle():
    """The AVEL/PositionAttn equations clip by clip, on a channel-major map, with both reshapes."""
    channels, height, width, guide_dim = 4, 3, 3, 6
    positions = height * width
    maps = torch.randn(2, 3, channels, height, width, dtype=torch.float64)  # (B, L, C, H, W) as a CNN gives it
    guide = torch.randn(2, 3, guide_dim, dtype=torch.float64)
    flat = maps.flatten(2)  # what the official pipeline feeds: flatten(1) of (C, H, W)
    for scrambled in (False, True):
        layer = AudioGuidedSpatialAttention(
            channels, positions, guide_dim, hidden=5, out_dim=7, scrambled_reshape=scrambled
        ).double()
        out, alpha = layer(flat, guide)
        assert out.shape == (2, 3, 7) and alpha.shape == (2, 3, positions)
        for b in range(2):
            for t in range(3):
                if scrambled:
                    grid = flat[b, t].view(positions, channels)  # the official view(-1, 49, 512)
                else:
                    grid = maps[b, t].permute(1, 2, 0).reshape(positions, channels)  # one row per (h, w)
                v = F.relu(F.linear(grid, layer.video_projection.weight, layer.video_projection.bias))
                g = F.relu(F.linear(guide[b, t], layer.guide_projection.weight, layer.guide_projection.bias))
                content = v @ layer.video_score.weight.T + (layer.guide_score.weight @ g)[:, None]
                z = (torch.tanh(content) @ layer.score.weight.T).squeeze(-1)
                a = torch.softmax(z, dim=0)
                expected = F.linear(a @ grid, layer.output.weight, layer.output.bias)
                torch.testing.assert_close(alpha[b, t], a)
                torch.testing.assert_close(out[b, t], expected)


def test_regressor_trains_on_a_small_task():
    """A few Adam steps on a learnable target lower the CCC loss: loss, masks and gradients work together."""
    torch.manual_seed(1)
    model = small_regressor("grjca", fusion_kwargs={"dropout": 0.0}, head_dropout=0.0)
    video, audio = regressor_inputs(model, batch=16)
    target_v = torch.tanh(video[..., 0] * 3)
    target_a = torch.tanh(audio[..., 1] * 3)
    target_a[0, :2] = -5.0  # invalid frames are ignored by the loss
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = CCCLoss()
    losses = []
    for _ in range(25):
        optimiser.zero_grad()
        loss = loss_fn(model(video, audio), (target_v, target_a))
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------------------------------------
# IEMOCAP classifiers

TINY_SPECS = {
    "text": ModalitySpec(length=7, dim=5, input_dropout=0.25),
    "video": ModalitySpec(length=6, dim=9, conv_length=4),
    "audio": ModalitySpec(length=11, dim=3, conv_length=5),
}
TINY = dict(specs=TINY_SPECS, rnn_hidden=6, num_heads=3, fc_hidden=8)  # attention width 12


def tiny_inputs(model, batch=3):
    return [torch.randn(batch, TINY_SPECS[m].length, TINY_SPECS[m].dim) for m in model.modalities]


def gru_params(inputs, hidden):
    return 2 * 3 * (inputs * hidden + hidden * hidden + 2 * hidden)


def mha_params(width):
    return 4 * width * width + 4 * width


def fc_params(pooled, classes=7, hidden=60):
    return pooled * hidden + hidden + hidden * classes + classes


ENCODER_PARAMS = {
    "text": gru_params(300, 60),
    "video": gru_params(2048, 60) + 32 * 25 + 25,
    "audio": gru_params(120, 60) + 1000 * 500 + 500,
}


@pytest.mark.parametrize(
    "cls, modalities",
    [
        (SelfAttentionClassifier, ("text", "video", "audio")),
        (CrossAttentionClassifier, ("text", "video", "audio")),
        (SelfAttentionClassifier, ("audio", "text")),
        (CrossAttentionClassifier, ("video", "text")),
        (SelfAttentionClassifier, ("video",)),
    ],
)
def test_classifier_parameter_counts(cls, modalities):
    model = cls(modalities)
    n = len(modalities)
    n_attention = n if cls is SelfAttentionClassifier else n * (n - 1)
    pooled = 240 if n_attention > 1 else 120
    expected = sum(ENCODER_PARAMS[m] for m in modalities) + n_attention * mha_params(120) + fc_params(pooled)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_classifier_paper_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(SelfAttentionClassifier(("text", "video", "audio"))) == 1_645_892
    assert count(CrossAttentionClassifier(("text", "video", "audio"))) == 1_820_132


def test_classifier_default_sizes_forward():
    model = CrossAttentionClassifier(("text", "video", "audio")).eval()
    x = [torch.randn(1, 128, 300), torch.randn(1, 32, 2048), torch.randn(1, 1000, 120)]
    with torch.no_grad():
        logits, embedding = model(*x, return_embedding=True)
    assert logits.shape == (1, 7) and embedding.shape == (1, 60)


@pytest.mark.parametrize(
    "cls, modalities",
    [
        (SelfAttentionClassifier, ("text", "video", "audio")),
        (SelfAttentionClassifier, ("video", "audio")),
        (SelfAttentionClassifier, ("audio",)),
        (CrossAttentionClassifier, ("text", "video", "audio")),
        (CrossAttentionClassifier, ("audio", "text")),
    ],
)
def test_classifier_shapes_and_gradients(cls, modalities):
    model = cls(modalities, **TINY)
    logits, embedding = model(*tiny_inputs(model), return_embedding=True)
    assert logits.shape == (3, 7) and embedding.shape == (3, 8)
    assert_every_parameter_gets_gradient(model, logits.square().sum())


def test_statistical_pooling_order_and_cross_pairs():
    model = CrossAttentionClassifier(("text", "video", "audio"), **TINY).eval()
    outputs, queries, pooled = {}, {}, {}
    for key, mha in model.attention.items():
        mha.register_forward_pre_hook(lambda m, args, kwargs, key=key: keep(queries, key, args), with_kwargs=True)
        mha.register_forward_hook(lambda m, args, out, key=key: keep(outputs, key, out[0]))
    model.embedding.register_forward_pre_hook(lambda m, args: keep(pooled, "z", args[0]))
    encoded = {}
    for name, encoder in model.encoders.items():
        encoder.register_forward_hook(lambda m, args, out, name=name: keep(encoded, name, out))
    with torch.no_grad():
        model(*tiny_inputs(model))
    assert [encoded[m].shape[1] for m in ("text", "video", "audio")] == [7, 4, 5]  # conv shortens video, audio
    assert sorted(outputs) == sorted(f"{s}_to_{t}" for t in model.modalities for s in model.modalities if s != t)
    for key, (query, key_, value) in queries.items():
        source, target = key.split("_to_")
        assert torch.equal(query, encoded[target]) and torch.equal(key_, encoded[source]) and key_ is value
        assert outputs[key].shape == (3, encoded[target].shape[1], 12)  # the target's length
    means = torch.stack([o.mean(dim=1) for o in outputs.values()], dim=1)  # (B, 6, 12)
    n = means.shape[1]
    centred = means - means.sum(1, keepdim=True) / n
    std = (centred.square().sum(1) / (n - 1)).sqrt()
    torch.testing.assert_close(pooled["z"], torch.cat([std, means.mean(1)], dim=-1))


def test_classifier_pooling_variants():
    concat = SelfAttentionClassifier(("text", "video", "audio"), pooling="concat", **TINY)
    assert concat.embedding.in_features == 3 * 12
    assert concat(*tiny_inputs(concat)).shape == (3, 7)
    assert CrossAttentionClassifier(("text", "audio"), pooling="concat", **TINY).embedding.in_features == 2 * 12
    uni = SelfAttentionClassifier(("text",), **TINY).eval()
    captured = {}
    uni.embedding.register_forward_pre_hook(lambda m, args: keep(captured, "z", args[0]))
    uni.attention["text"].register_forward_hook(lambda m, args, out: keep(captured, "attended", out[0]))
    with torch.no_grad():
        uni(*tiny_inputs(uni))
    torch.testing.assert_close(captured["z"], captured["attended"].mean(dim=1))  # mean only


@pytest.mark.parametrize("cls", [SelfAttentionClassifier, CrossAttentionClassifier])
def test_classifier_eval_deterministic_train_stochastic_empty(cls):
    model = cls(("text", "video", "audio"), **TINY)
    x = tiny_inputs(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*x), model(*x))
        assert model(*tiny_inputs(model, batch=0)).shape == (0, 7)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(*x), model(*x))


def test_classifier_bad_inputs_and_config():
    model = SelfAttentionClassifier(("text", "audio"), **TINY)
    text, audio = tiny_inputs(model, batch=2)
    with pytest.raises(ValueError, match="features: expected 2 tensors"):
        model(text)
    with pytest.raises(ValueError, match="audio"):
        model(text, torch.randn(2, 10, 3))  # wrong length
    with pytest.raises(ValueError, match="audio"):
        model(text, torch.randn(2, 11, 4))  # wrong dim
    with pytest.raises(ValueError, match="audio"):
        model(text, torch.randn(3, 11, 3))  # batch mismatch
    with pytest.raises(TypeError, match="text"):
        model(text.long(), audio)
    with pytest.raises(TypeError, match="audio"):
        model(text, audio.double())
    with pytest.raises(ValueError, match="modalities"):
        CrossAttentionClassifier(("text",), **TINY)
    with pytest.raises(ValueError, match="modalities"):
        SelfAttentionClassifier(("text", "speech"))
    with pytest.raises(ValueError, match="modalities"):
        SelfAttentionClassifier(("text", "text"))
    with pytest.raises(ValueError, match="num_heads"):
        SelfAttentionClassifier(("text",), rnn_hidden=60, num_heads=7)
    with pytest.raises(ValueError, match="pooling"):
        SelfAttentionClassifier(("text",), pooling="max")
    with pytest.raises(ValueError, match="conv_length"):
        SelfAttentionClassifier(("audio",), specs={"audio": ModalitySpec(length=None, dim=3, conv_length=2)})
    free = SelfAttentionClassifier(("text",), specs={"text": ModalitySpec(length=None, dim=5)}, **{
        k: v for k, v in TINY.items() if k != "specs"})
    assert free(torch.randn(2, 13, 5)).shape == (2, 7)  # length=None: any length without a convolution
