"""Operators: the fast path equals the per-sample-kernel reference, and the paper's identities hold."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcd_lightning import optimize_for_inference
from dcd_lightning.ops import (
    CondConv2d,
    CondLinear,
    DCDConv2d,
    DCDDepthwiseConv2d,
    DCDLinear,
    DCDReleaseConv2d,
    DCDReleaseLinear,
    DyConv2d,
    DyLinear,
    StaticConv2d,
    StaticLinear,
    latent_dim_rule,
)
from dcd_lightning.testing import assert_close_relative, compare_with_reference, randomise

CIN, COUT = 16, 24

# name -> factory(stride) returning an operator taking (N, CIN, H, W) (or (N, CIN) for linear).
CONV_VARIANTS: dict[str, Callable[[int], nn.Module]] = {
    "dcd_1x1_activations": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, route="activations"),
    "dcd_1x1_kernel": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, route="kernel"),
    "dcd_1x1_auto": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2),
    "dcd_1x1_no_attention_eq5": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, channel_attention=False, route="activations"),
    "dcd_1x1_attention_only": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, channel_fusion=False),
    "dcd_1x1_latent_mult_0.5": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, latent_mult=0.5, route="activations"),
    "dcd_1x1_blocks_4_activations": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, num_blocks=4, latent_dim=3, route="activations"),
    "dcd_1x1_blocks_2_kernel": lambda s: DCDConv2d(CIN, COUT, 1, s, reduction=2, num_blocks=2, route="kernel"),
    "dcd_1x1_bias_hard_sigmoid_se": lambda s: DCDConv2d(
        CIN, COUT, 1, s, bias=True, gate="hard_sigmoid", squeeze_excite=True, pool_size=2, route="activations"
    ),
    "dcd_3x3_channel_activations": lambda s: DCDConv2d(CIN, COUT, 3, s, reduction=2, route="activations"),
    "dcd_3x3_channel_kernel": lambda s: DCDConv2d(CIN, COUT, 3, s, reduction=2, route="kernel"),
    "dcd_5x5_channel_blocks_2": lambda s: DCDConv2d(CIN, COUT, 5, s, reduction=2, num_blocks=2, route="activations"),
    "dcd_3x3_joint": lambda s: DCDConv2d(CIN, COUT, 3, s, reduction=2, fusion="joint", latent_dim=3),
    "dcd_3x3_joint_no_attention": lambda s: DCDConv2d(CIN, COUT, 3, s, reduction=2, fusion="joint", latent_dim=3, channel_attention=False),
    "dcd_3x3_latent_norm_activations": lambda s: DCDConv2d(CIN, COUT, 3, s, reduction=2, latent_norm=True, route="activations"),
    # L = 1: the latent map (N, 1, H, W) is NCHW and channels-last at once
    "dcd_3x3_latent_1_norm_activations": lambda s: DCDConv2d(
        CIN, COUT, 3, s, reduction=2, latent_dim=1, latent_norm=True, route="activations"
    ),
    "release_mobilenetv2_expand_activations": lambda s: DCDReleaseConv2d(CIN, COUT, 1, s, route="activations"),
    "release_mobilenetv2_expand_kernel": lambda s: DCDReleaseConv2d(CIN, COUT, 1, s, route="kernel"),
    "release_mobilenetv2_project": lambda s: DCDReleaseConv2d(CIN, CIN // 2, 1, s, route="activations"),
    "release_resnet_basic": lambda s: DCDReleaseConv2d(CIN, COUT, 3, s, layout="resnet_basic", route="activations"),
    "release_resnet_basic_kernel": lambda s: DCDReleaseConv2d(CIN, COUT, 3, s, layout="resnet_basic", route="kernel"),
    "release_resnet_bottleneck_3x3": lambda s: DCDReleaseConv2d(CIN, COUT, 3, s, layout="resnet_bottleneck"),
    "dcd_depthwise_kernel": lambda s: DCDDepthwiseConv2d(CIN, CIN, 3, s, CIN, reduction=2, route="kernel"),
    "dcd_depthwise_activations": lambda s: DCDDepthwiseConv2d(CIN, CIN, 3, s, CIN, reduction=2, route="activations", bias=True),
    "dcd_depthwise_5x5_no_attention": lambda s: DCDDepthwiseConv2d(CIN, CIN, 5, s, CIN, reduction=2, channel_attention=False, route="activations"
    ),
    "dcd_depthwise_attention_only": lambda s: DCDDepthwiseConv2d(CIN, CIN, 3, s, CIN, reduction=2, channel_fusion=False),
    "condconv_kernel": lambda s: CondConv2d(CIN, COUT, 3, s, mixing="kernel", bias=True),
    "condconv_output": lambda s: CondConv2d(CIN, COUT, 3, s, mixing="output", bias=True),
    "condconv_grouped_output": lambda s: CondConv2d(CIN, COUT, 3, s, 4, mixing="output"),
    "condconv_depthwise_kernel": lambda s: CondConv2d(CIN, CIN, 3, s, CIN, mixing="kernel"),
    "dyconv_kernel": lambda s: DyConv2d(CIN, COUT, 1, s, mixing="kernel", temperature=30.0),
    "dyconv_output": lambda s: DyConv2d(CIN, COUT, 3, s, mixing="output", bias=True),
    "dyconv_depthwise_output": lambda s: DyConv2d(CIN, CIN, 3, s, CIN, mixing="output"),
    "dyconv_depthwise_kernel": lambda s: DyConv2d(CIN, CIN, 3, s, CIN, mixing="kernel"),
}

LINEAR_VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "dcd_linear": lambda: DCDLinear(CIN, 10, reduction=2),
    "dcd_linear_no_attention": lambda: DCDLinear(CIN, 10, reduction=2, channel_attention=False, bias=False),
    "dcd_linear_attention_only": lambda: DCDLinear(CIN, 10, reduction=2, channel_fusion=False),
    "release_linear": lambda: DCDReleaseLinear(CIN, 10, latent_dim=6, branch_hidden=8),
    "condconv_linear": lambda: CondLinear(CIN, 10),
    "dyconv_linear": lambda: DyLinear(CIN, 10, num_kernels=3),
}


# the suite's comparison: the samples' kernels must differ (tests/test_gpu.py imports these names from here too)
compare = partial(compare_with_reference, distinct_kernels=True)


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", sorted(CONV_VARIANTS))
def test_conv_fast_equals_reference(name: str, stride: int, training: bool) -> None:
    module = randomise(CONV_VARIANTS[name](stride))
    for size in (7, 8):
        x = torch.randn(3, CIN, size, size, generator=torch.Generator().manual_seed(size))
        compare(module, x, training)


FOLDABLE = sorted(n for n in CONV_VARIANTS if n.startswith(("dcd_1x1", "dcd_3x3", "dcd_5x5", "release")))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", FOLDABLE)
def test_folded_inference_equals_reference(name: str, stride: int, batch: int) -> None:
    """optimize_for_inference's folds (latent norms, gates, heads) leave every output unchanged."""
    module = optimize_for_inference(randomise(CONV_VARIANTS[name](stride)))
    folded = module.fold_for_inference()
    assert folded == ("joint" not in name)
    for size in (7, 8):
        x = torch.randn(batch, CIN, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert_close_relative(module(x), module.reference_forward(x))
        if folded:
            assert module._folded is not None and module._folded.is_current()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", [n for n in FOLDABLE if "joint" not in n])
def test_folded_inference_absorbs_a_following_batch_norm(name: str, batch: int) -> None:
    """A BatchNorm2d moved into the layer (output_norm) is folded too: folded == reference + norm."""
    module = randomise(CONV_VARIANTS[name](1))
    module.output_norm = randomise(nn.BatchNorm2d(module.out_channels), seed=7).eval()
    module.eval()
    x = torch.randn(batch, CIN, 7, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = module.output_norm(module._forward_plain(x))
        assert_close_relative(module.reference_forward(x), expected)
        assert module.fold_for_inference()
        assert_close_relative(module(x), expected)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("name", "mode"), [(name, mode) for name in sorted(CONV_VARIANTS)
                                            for mode in ("train", "eval", "folded") if mode != "folded" or name in FOLDABLE])
def test_channels_last_in_channels_last_out(name: str, stride: int, mode: str) -> None:
    """Every operator keeps a channels-last input's layout on every route (DCD without copies to and
    from NCHW; routes on batch-sized convolution groups copy their output back) and gives the same
    values: on a GPU the following batch norm then runs its channels-last kernels."""
    module = randomise(CONV_VARIANTS[name](stride))
    module = optimize_for_inference(module) if mode == "folded" else module.train(mode == "train")
    for batch in (1, 3):
        x = torch.randn(batch, CIN, 8, 8, generator=torch.Generator().manual_seed(batch))
        with torch.set_grad_enabled(mode != "folded"):
            expected = module(x)
            out = module(x.contiguous(memory_format=torch.channels_last))
        assert_close_relative(out, expected)
        if batch > 1 or mode != "folded":  # the batch-1 fold may run one plain convolution (either layout)
            assert out.is_contiguous(memory_format=torch.channels_last), out.stride()


@pytest.mark.parametrize("name", sorted(n for n in LINEAR_VARIANTS if "dcd" in n or "release" in n))
def test_folded_linear_equals_reference(name: str) -> None:
    module = optimize_for_inference(randomise(LINEAR_VARIANTS[name]()))
    for batch in (1, 4):
        x = torch.randn(batch, CIN, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert_close_relative(module(x), module.reference_forward(x))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", ["mobilenetv2", "resnet_basic"])
def test_kernel_route_updates_latent_running_statistics(layout: str, momentum: float | None) -> None:
    """In training the kernel route derives the latent norms' batch statistics from moments; the
    running statistics it leaves equal those nn.BatchNorm1d leaves on the activation route."""
    kernel_size = 1 if layout == "mobilenetv2" else 3
    routes = {}
    for route in ("kernel", "activations"):
        torch.manual_seed(0)
        module = randomise(DCDReleaseConv2d(CIN, COUT, kernel_size, layout=layout, route=route)).train()
        for norm in (module.latent_norm_in, module.latent_norm_out):
            norm.momentum = momentum
        for step in range(3):
            module(torch.randn(4, CIN, 6, 6, generator=torch.Generator().manual_seed(step)) + step)
        routes[route] = module
    for name in ("latent_norm_in", "latent_norm_out"):
        a, b = getattr(routes["kernel"], name), getattr(routes["activations"], name)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 3
        assert_close_relative(a.running_mean, b.running_mean, 1e-9)
        assert_close_relative(a.running_var, b.running_var, 1e-9)


def test_fold_is_dropped_when_stale() -> None:
    """In-place weight changes, .train(), moving the layer and gradients each stop the fold's use."""
    module = optimize_for_inference(randomise(DCDReleaseConv2d(CIN, COUT, 1)))
    x = torch.randn(2, CIN, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.expand.mul_(3.0)  # an in-place change after folding
        assert_close_relative(module(x), module.reference_forward(x))
        assert not module._folded.is_current()
    module.fold_for_inference()
    with torch.no_grad():
        module.load_state_dict(randomise(DCDReleaseConv2d(CIN, COUT, 1), seed=5).state_dict())
        assert_close_relative(module(x), module.reference_forward(x))
    module.fold_for_inference()
    out = module(x.clone().requires_grad_(True))  # gradients on: the unfolded path, parameters get grads
    out.sum().backward()
    assert module.expand.grad is not None
    module.float()
    assert module._folded is None
    module.double().fold_for_inference()
    module.train()
    assert module._folded is None


def test_optimised_copy_watches_one_shared_version_counter() -> None:
    """optimize_for_inference's copy makes each DCD layer's parameters and buffers (its folded
    output norm's included) views of one base: the fold reads one version counter, and an in-place
    change to any one of its 18 tensors still stops its use. A copy of that model, whose tensors
    no longer share a counter, watches each; a tensor another module also holds is left alone."""

    def build() -> nn.Sequential:
        layer = DCDConv2d(CIN, COUT, 1, reduction=2, latent_norm=True, gate="hard_sigmoid", route="activations")
        return randomise(nn.Sequential(layer, nn.BatchNorm2d(COUT)).double())

    x = torch.randn(1, CIN, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    count = len(optimize_for_inference(build())[0]._folded.sources)
    assert count == 18
    for index in range(count):
        model = optimize_for_inference(build())
        folded = model[0]._folded
        assert len(folded.watched) == 1 and folded.is_current()
        with torch.no_grad():
            folded.sources[index].mul_(1.5)  # positive factor: a running variance stays valid
            assert not folded.is_current(), index
            unfolded = copy.deepcopy(model)
            unfolded[0]._folded = None
            assert_close_relative(model(x), unfolded(x), 1e-12)
    model = copy.deepcopy(optimize_for_inference(build()))
    folded = model[0]._folded
    assert len(folded.watched) == count and folded.is_current()
    with torch.no_grad():
        folded.sources[-1].mul_(1.5)
    assert not folded.is_current()
    tied = build()
    holder = nn.Module()
    holder.register_parameter("expand", tied[0].expand)
    model = optimize_for_inference(nn.Sequential(*tied, holder))
    assert len(model[0]._folded.watched) == count and model[2].expand is model[0].expand


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(LINEAR_VARIANTS))
def test_linear_fast_equals_reference(name: str, training: bool) -> None:
    module = randomise(LINEAR_VARIANTS[name]())
    x = torch.randn(5, CIN, generator=torch.Generator().manual_seed(3))
    compare(module, x, training)


def test_auto_route_trains_on_a_gpu_by_the_activations() -> None:
    """route="auto" follows MAdds on the CPU and in eval mode; training elsewhere (a GPU) takes the
    activation route, which launches fewer kernels (measured faster on an H100); an explicit route holds."""
    layer = DCDConv2d(CIN, COUT, 1, reduction=2).train()
    size = next(s for s in range(1, 64) if layer.prefers_kernel_route(s, s))
    on_cpu = torch.empty(2, CIN, size, size)
    on_gpu = torch.empty(2, CIN, size, size, device="meta")  # any device other than the CPU
    assert layer._takes_kernel_route(on_cpu, size, size)
    assert not layer._takes_kernel_route(on_gpu, size, size)
    assert layer.eval()._takes_kernel_route(on_gpu, size, size)
    layer.route = "kernel"
    assert layer.train()._takes_kernel_route(on_gpu, size, size)


@pytest.mark.parametrize("route", ["kernel", "activations", "auto"])
def test_sync_batch_norm_latent_norms_see_the_batch(route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP with sync_batchnorm the latent norms become SyncBatchNorm: in training they are called
    as modules on the 4-d latent map (where they sync their statistics), on every route, with the same
    values as BatchNorm1d's here (one process: nothing to sync)."""
    torch.manual_seed(0)
    plain = randomise(DCDReleaseConv2d(CIN, COUT, 1, route=route)).train()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced.latent_norm_in, nn.SyncBatchNorm)
    calls = []
    for norm in (synced.latent_norm_in, synced.latent_norm_out):
        monkeypatch.setattr(norm, "forward", lambda z, f=norm.forward: calls.append(z.dim()) or f(z))
    x = torch.randn(3, CIN, 6, 6, generator=torch.Generator().manual_seed(6))
    assert_close_relative(synced(x), plain(x))
    assert calls == [4, 4]
    for a, b in ((plain.latent_norm_in, synced.latent_norm_in), (plain.latent_norm_out, synced.latent_norm_out)):
        assert_close_relative(b.running_var, a.running_var)


def test_kernel_and_activation_routes_agree_with_each_other() -> None:
    x = torch.randn(2, CIN, 6, 6)
    by_kernel = randomise(DCDConv2d(CIN, COUT, 1, route="kernel")).eval()
    by_activations = randomise(DCDConv2d(CIN, COUT, 1, route="activations")).eval()
    assert_close_relative(by_kernel(x), by_activations(x))


@pytest.mark.parametrize("channels,reduction", [(64, 16), (256, 16), (96, 8), (320, 8)])
def test_dcd_parameter_count_matches_section_3_4(channels: int, reduction: int) -> None:
    op = DCDConv2d(channels, channels, 1, reduction=reduction)
    latent = op.latent_dim
    assert latent**2 < channels
    expected = channels**2 + 2 * channels * latent + (2 * channels + latent**2) * channels // reduction
    assert sum(p.numel() for p in op.parameters()) == expected


def test_dcd_madds_count_lambda_with_the_residual() -> None:
    """A 3x3 DCD layer's dynamic part, 64 -> 64 channels, L = 4, at the cheaper route. On the
    activations (8x8): Q 64*4*64, Phi 16*64, P 64*4*64, and Lambda on the output 64*64. Forming
    the kernel (56x56): Phi Q^T then P (64*4*(4+64)), and Lambda W0 plus the residual over all
    nine taps (64*64*9)."""
    op = DCDConv2d(64, 64, 3, latent_dim=4)
    for size, dynamic in ((8, 16384 + 1024 + 16384 + 4096), (56, 64 * 4 * 68 + 64 * 64 * 9)):
        assert op.madds(size, size) - op.branch_madds() - 64 * 64 * 9 * size * size == dynamic
    plain = DCDConv2d(64, 64, 3, latent_dim=4, channel_attention=False)  # no Lambda: W0 + the centre tap
    assert plain.madds(56, 56) - plain.branch_madds() - 64 * 64 * 9 * 56 * 56 == 64 * 4 * 68 + 64 * 64


def test_latent_dim_rule() -> None:
    # "dividing C by 2 repeatedly until it is less than sqrt(C)" (Section 3.2)
    assert [latent_dim_rule(c) for c in (64, 96, 128, 256, 320, 1280)] == [4, 6, 8, 8, 10, 20]
    for channels in range(2, 2000):
        assert latent_dim_rule(channels) ** 2 < channels
    # the printed formula floor(C / 2^floor(log2 sqrt C))
    assert [latent_dim_rule(c, "formula") for c in (64, 96, 1000)] == [8, 12, 62]
    assert DCDConv2d(64, 64, latent_mult=0.5).latent_dim == 2
    assert DCDConv2d(256, 256, latent_mult=0.75).latent_dim == 6
    assert DCDConv2d(256, 256, num_blocks=4).latent_dim == latent_dim_rule(64) == 4
    # Eq. 9 defaults: L_k = floor(k^2 / 2), L from C / L_k under joint fusion's L^2 L_k <= C: the
    # printed formula's L where it meets that constraint (C = 64, 256), halved further where not
    joint = [DCDConv2d(c, c, 3, fusion="joint") for c in (64, 128, 256, 512)]
    assert [layer.kernel_latent_dim for layer in joint] == [4] * 4
    assert [layer.latent_dim for layer in joint] == [4, 4, 8, 8]
    assert [latent_dim_rule(c // 4, "formula") for c in (64, 128, 256, 512)] == [4, 8, 8, 16]
    for channels in range(1, 2000):
        assert latent_dim_rule(channels, strict=False) ** 2 <= channels
        if latent_dim_rule(channels, "formula") ** 2 <= channels:
            assert latent_dim_rule(channels, strict=False) == latent_dim_rule(channels, "formula")
    assert DCDDepthwiseConv2d(32, 32, 5).kernel_latent_dim == 12


def test_blocks_make_the_residual_block_diagonal() -> None:
    op = randomise(DCDConv2d(CIN, COUT, 1, num_blocks=4, reduction=2, channel_attention=False)).eval()
    with torch.no_grad():
        op.weight.zero_()
    kernels, _ = op.sample_kernels(torch.randn(2, CIN, 5, 5))
    full = kernels[..., 0, 0].abs()
    rows, cols = COUT // 4, CIN // 4
    for b in range(4):
        block = full[:, b * rows : (b + 1) * rows, b * cols : (b + 1) * cols]
        assert block.min() > 0
        full[:, b * rows : (b + 1) * rows, b * cols : (b + 1) * cols] = 0
    assert full.max() == 0


def test_channel_fusion_alone_residual_lives_at_the_centre_tap() -> None:
    op = randomise(DCDConv2d(CIN, COUT, 3, reduction=2, channel_attention=False)).eval()
    kernels, _ = op.sample_kernels(torch.randn(2, CIN, 5, 5))
    residual = kernels - op.weight
    centre = residual[..., 1, 1].clone()
    residual[..., 1, 1] = 0
    assert residual.abs().max() == 0 and centre.abs().min() > 0


def test_dyconv_with_one_hot_attention_is_that_kernels_static_conv() -> None:
    op = randomise(DyConv2d(CIN, COUT, 3, 2, bias=True))
    x = torch.randn(3, CIN, 9, 9)
    for chosen in range(op.num_kernels):
        one_hot = F.one_hot(torch.full((3,), chosen), op.num_kernels).to(x.dtype)
        op.attention = lambda _x, one_hot=one_hot: one_hot  # type: ignore[method-assign]
        expected = F.conv2d(x, op.experts()[chosen], op.bias[chosen], 2, 1)
        for mixing in ("kernel", "output"):
            op.mixing = mixing
            assert_close_relative(op(x), expected)


@pytest.mark.parametrize("cls", [DyConv2d, CondConv2d])
def test_auto_mixing_mixes_outputs_for_large_batches_of_small_maps(cls: type[nn.Module]) -> None:
    """mixing="auto" on the CPU: the output route where N >= K * output pixels, else the kernel route;
    either way the result is the reference's, in training and in eval mode."""
    op = randomise(cls(CIN, COUT, 3, 2, bias=True))
    k = op.num_kernels
    routes: list[str] = []
    for route in ("kernel", "output"):
        method = getattr(op, f"_forward_{route}_mixing")
        setattr(op, f"_forward_{route}_mixing", lambda x, w, method=method, route=route: (routes.append(route), method(x, w))[1])
    cases = [(k, 1, "output"), (k - 1, 1, "kernel"), (4 * k, 3, "output"), (4 * k - 1, 3, "kernel"), (2, 6, "kernel")]
    for batch, size, expected in cases:  # size 3 at stride 2: 2x2 output pixels
        x = torch.randn(batch, CIN, size, size, generator=torch.Generator().manual_seed(batch))
        routes.clear()
        assert op.prefers_output(x) == (expected == "output")
        for training in (True, False):
            compare(op, x, training)
        assert set(routes) == {expected}, (batch, size)


def test_dyconv_temperature_flattens_attention_and_is_saved() -> None:
    op = randomise(DyConv2d(CIN, COUT, 1, num_kernels=4))
    x = torch.randn(2, CIN, 4, 4)
    op.set_temperature(1e6)
    assert_close_relative(op.attention(x), torch.full((2, 4), 0.25), 1e-4)
    assert float(op.state_dict()["temperature"]) == 1e6
    with pytest.raises(ValueError, match="DyConv2d: temperature=0"):
        op.set_temperature(0)


def test_dcd_without_fusion_equals_lambda_w0() -> None:
    op = randomise(DCDConv2d(CIN, COUT, 3, 2, channel_fusion=False))
    x = torch.randn(3, CIN, 8, 8)
    pooled = x.mean(dim=(2, 3))
    lam = 2 * torch.sigmoid(torch.relu(pooled @ op.branch.fc.weight.t()) @ op.branch.attention.weight.t())
    expected = lam[:, :, None, None] * F.conv2d(x, op.weight, None, 2, 1)
    assert_close_relative(op(x), expected)
    assert not hasattr(op, "compress") and op.branch.fusion is None


def test_dcd_equals_its_equation_for_a_1x1_layer() -> None:
    """Eq. 6 written out with matrices: y = (Lambda W0 + P Phi Q^T) x at every pixel."""
    op = randomise(DCDConv2d(CIN, COUT, 1, route="activations"))
    x = torch.randn(2, CIN, 5, 5)
    lam, phi = op.coefficients(x)
    for i in range(2):
        matrix = torch.diag(lam[i]) @ op.weight[:, :, 0, 0] + op.expand @ phi[i, 0] @ op.compress
        expected = torch.einsum("oc,chw->ohw", matrix, x[i])
        assert_close_relative(op(x)[i], expected)


def test_static_ops_keep_torch_state_dict_names() -> None:
    conv, linear = StaticConv2d(8, 16, 3, 2), StaticLinear(16, 10)
    assert set(conv.state_dict()) == {"weight"} and conv.padding == (1, 1)
    assert set(linear.state_dict()) == {"weight", "bias"}
    dcd = DCDLinear(16, 10)
    dcd.load_state_dict(linear.state_dict(), strict=False)
    assert torch.equal(dcd.weight, linear.weight)


# -- batch size 1 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: DCDConv2d(CIN, COUT, 3),
        lambda: DCDReleaseConv2d(CIN, COUT, 1),
        lambda: DCDDepthwiseConv2d(CIN, CIN, 3),
        lambda: CondConv2d(CIN, COUT, 3),
        lambda: DyConv2d(CIN, COUT, 3),
    ],
)
def test_batch_size_one_trains(factory: Callable[[], nn.Module]) -> None:
    op = factory().train()
    out = op(torch.randn(1, CIN, 6, 6))
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_batch_size_one_with_latent_norm_and_nothing_to_normalise_says_why() -> None:
    op = DCDReleaseLinear(CIN, 10).train()
    with pytest.raises(ValueError, match=r"DCDReleaseLinear: batch norm in the latent space.*batch size 1.*\.eval\(\)"):
        op(torch.randn(1, CIN))
    assert op.eval()(torch.randn(1, CIN)).shape == (1, 10)
    assert DCDLinear(CIN, 10).train()(torch.randn(1, CIN)).shape == (1, 10)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,pattern",
    [
        (lambda: DCDConv2d(CIN, COUT, latent_mult=0), r"DCDConv2d: latent_mult=0 .*> 0"),
        (lambda: DCDConv2d(CIN, COUT, latent_mult=-1.5), r"DCDConv2d: latent_mult=-1.5"),
        (lambda: DCDLinear(CIN, 10, latent_mult=0.0), r"DCDLinear: latent_mult=0.0"),
        (lambda: DCDConv2d(CIN, COUT, num_blocks=5), r"DCDConv2d: num_blocks=5 must divide in_channels=16"),
        (lambda: DCDConv2d(CIN, COUT, num_blocks=0), r"DCDConv2d: num_blocks=0 .*>= 1"),
        (lambda: DCDConv2d(CIN, COUT, 4), r"DCDConv2d: kernel_size=4 is even.*odd"),
        (lambda: DCDConv2d(CIN, COUT, 2, fusion="joint"), r"DCDConv2d: kernel_size=2 is even"),
        (lambda: DCDDepthwiseConv2d(CIN, CIN, 2), r"DCDDepthwiseConv2d: kernel_size=2 is even"),
        (lambda: DCDConv2d(CIN, COUT, 2, channel_fusion=False), r"DCDConv2d: kernel_size=2 is even, but same padding"),
        (lambda: StaticConv2d(CIN, COUT, 2), r"StaticConv2d: kernel_size=2 is even, but same padding \(padding=None\)"),
        (lambda: CondConv2d(CIN, COUT, 4), r"CondConv2d: kernel_size=4 is even"),
        (lambda: DyConv2d(CIN, COUT, 2), r"DyConv2d: kernel_size=2 is even"),
        (lambda: DCDDepthwiseConv2d(CIN, COUT, 3), r"DCDDepthwiseConv2d: .*out_channels == groups == in_channels"),
        (lambda: DCDConv2d(CIN, CIN, 3, groups=CIN), r"DCDConv2d: groups=16 is not supported.*DCDDepthwiseConv2d"),
        (lambda: DCDConv2d(CIN, COUT, fusion="tensor"), r"DCDConv2d: fusion='tensor'.*\['channel', 'joint'\]"),
        (lambda: CondConv2d(CIN, COUT, num_experts=0), r"CondConv2d: num_experts=0 .*>= 1"),
        (lambda: DyConv2d(CIN, COUT, num_kernels=0), r"DyConv2d: num_kernels=0 .*>= 1"),
        (lambda: DyConv2d(CIN, COUT, num_kernels=-2), r"DyConv2d: num_kernels=-2"),
        (lambda: CondConv2d(CIN, COUT, groups=5), r"CondConv2d: groups=5 must divide"),
        (lambda: StaticConv2d(CIN, COUT, stride=0), r"StaticConv2d: stride=0"),
        # zero is not taken as "the default"
        (lambda: DCDConv2d(CIN, COUT, 3, fusion="joint", kernel_latent_dim=0), r"DCDConv2d: kernel_latent_dim=0 .*>= 1"),
        (lambda: DCDDepthwiseConv2d(CIN, CIN, 3, kernel_latent_dim=0), r"DCDDepthwiseConv2d: kernel_latent_dim=0 .*>= 1"),
        (lambda: DCDDepthwiseConv2d(CIN, CIN, 3, kernel_latent_dim=9), r"kernel_latent_dim=9 .*1 <= L_k < k\^2 = 9"),
        (lambda: DCDReleaseConv2d(CIN, COUT, pool_size=0), r"DCDReleaseConv2d: pool_size=0 .*>= 1"),
        (lambda: DCDReleaseConv2d(CIN, COUT, fc_squeeze=0), r"DCDReleaseConv2d: fc_squeeze=0 .*>= 1"),
        (lambda: DCDReleaseConv2d(CIN, COUT, fc_squeeze=-1), r"DCDReleaseConv2d: fc_squeeze=-1 .*>= 1"),
        # a multiplier that takes L past the channels it mixes is named, with the largest allowed
        (lambda: DCDConv2d(CIN, COUT, latent_mult=9), (r"DCDConv2d: latent_mult=9 gives a latent size of 27, more than "
         r"the wider side's channels \(24\); use latent_mult <= 8")),
        (lambda: DCDConv2d(CIN, COUT, latent_mult=1e6, num_blocks=2), r"latent_mult=1000000.0 gives .*channels per block \(12\)"),
        (lambda: DCDConv2d(CIN, COUT, 3, fusion="joint", latent_mult=100), r"DCDConv2d: latent_mult=100 gives"),
        (lambda: DCDReleaseConv2d(CIN, COUT, latent_mult=30), r"DCDReleaseConv2d: latent_mult=30 gives .*\(24\)"),
        (lambda: DCDDepthwiseConv2d(CIN, CIN, 3, latent_mult=2.5), (r"DCDDepthwiseConv2d: latent_mult=2.5 gives a latent "
         r"size of 10, more than k\^2 - 1.*\(8\); use latent_mult <= 2")),
    ],
)
def test_bad_arguments_raise_value_errors_naming_operator_and_value(build, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build()


def test_latent_mult_up_to_the_channel_count_builds() -> None:
    """The bound on latent_mult refuses only what passes the channels: x8 gives L = 24 = max(C_in, C_out)."""
    assert DCDConv2d(CIN, COUT, latent_mult=8).latent_dim == 24
    assert DCDDepthwiseConv2d(CIN, CIN, 3, latent_mult=2).kernel_latent_dim == 8
    assert DCDConv2d(CIN, COUT, 3, fusion="joint", kernel_latent_dim=1).kernel_latent_dim == 1
    # the release's floor of 4 stands above a block's 2 channels, as the release builds it
    assert DCDReleaseConv2d(8, 8, num_blocks=4).latent_dim == 4


@pytest.mark.parametrize("name", sorted(CONV_VARIANTS))
def test_wrong_input_rank_or_channels_is_rejected(name: str) -> None:
    op = CONV_VARIANTS[name](1)
    op_name = type(op).__name__
    with pytest.raises(ValueError, match=rf"{op_name}: expected a 4-d input .*C=16, got shape \(2, 16, 5\)"):
        op(torch.randn(2, CIN, 5))
    with pytest.raises(ValueError, match=rf"{op_name}: .*C=16, got shape \(2, 15, 5, 5\)"):
        op(torch.randn(2, CIN - 1, 5, 5))
    with pytest.raises(ValueError, match=rf"{op_name}: .*got shape \(2, 15, 5, 5\)"):
        op.reference_forward(torch.randn(2, CIN - 1, 5, 5))
    folded = optimize_for_inference(op)  # the fold's own checks (DCDConv2d.forward) at batch 1
    with torch.no_grad():
        with pytest.raises(ValueError, match=rf"{op_name}: .*C=16, got shape \(1, 15, 5, 5\)"):
            folded(torch.randn(1, CIN - 1, 5, 5))
        with pytest.raises(ValueError, match=rf"{op_name}: expected a 4-d input .*got shape \(16, 5, 5\)"):
            folded(torch.randn(CIN, 5, 5))


@pytest.mark.parametrize("name", sorted(CONV_VARIANTS) + sorted(LINEAR_VARIANTS))
def test_empty_batch_gives_empty_output(name: str) -> None:
    """N = 0 gives (0, C_out, H', W') as nn.Conv2d does, in training, eval and folded; kernel routes
    fold the batch into convolution groups, which cannot be 0."""
    linear = name in LINEAR_VARIANTS
    op = LINEAR_VARIANTS[name]() if linear else CONV_VARIANTS[name](2)
    shape = (CIN,) if linear else (CIN, 5, 5)
    with torch.no_grad():
        expected = op.eval()(torch.randn(1, *shape)).shape[1:]
        folded = optimize_for_inference(copy.deepcopy(op))
        # a latent batch norm in training refuses a batch without two values per channel
        training = [False] if getattr(op, "latent_norm_in", None) is not None else [True, False]
        for mode in training:
            assert op.train(mode)(torch.randn(0, *shape)).shape == (0, *expected)
        assert folded(torch.randn(0, *shape)).shape == (0, *expected)


@pytest.mark.parametrize("name", sorted(LINEAR_VARIANTS))
def test_linear_rejects_wrong_input(name: str) -> None:
    op = LINEAR_VARIANTS[name]()
    with pytest.raises(ValueError, match=r"expected a 2-d input \(N, C\) with C=16, got shape \(2, 16, 1, 1\)"):
        op(torch.randn(2, CIN, 1, 1))
    with pytest.raises(ValueError, match=r"C=16, got shape \(2, 8\)"):
        op(torch.randn(2, 8))


def test_hard_sigmoid_gate_range() -> None:
    op = DCDConv2d(CIN, COUT, gate="hard_sigmoid", channel_fusion=False)
    with torch.no_grad():
        op.branch.attention.weight.fill_(100.0)
        op.branch.fc.weight.fill_(1.0)
    lam, _ = op.coefficients(torch.ones(1, CIN, 2, 2))
    assert torch.allclose(lam, torch.full_like(lam, 2.0))
    assert math.isclose(float(F.relu6(torch.tensor(0.0) + 3) / 3), 1.0)


@pytest.mark.parametrize(
    "name,training",
    [(name, training) for name in ("dcd_1x1_kernel", "dcd_1x1_blocks_2_kernel", "dcd_1x1_bias_hard_sigmoid_se")
     for training in (True, False)]
    + [("release_mobilenetv2_expand_kernel", False)],  # in training its latent batch norm needs the activations
)
def test_single_sample_kernel_route_equals_reference(name: str, training: bool) -> None:
    """With one sample the 1x1 kernel route runs an ordinary convolution: held to the reference too."""
    for stride in (1, 2):
        module = randomise(CONV_VARIANTS[name](stride))
        module.route = "kernel"
        x = torch.randn(1, CIN, 7, 7, generator=torch.Generator().manual_seed(5))
        module.train(training)
        assert_close_relative(module(x), module.reference_forward(x))


class _GatedDCD(DCDConv2d):
    """A user's variant: its output gated; `gate_in_reference` says whether its reference follows."""

    gate_in_reference = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 **options) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, groups, **options)
        self.gate = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * torch.sigmoid(self.gate(y))

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().reference_forward(x)
        return y * torch.sigmoid(self.gate(y)) if self.gate_in_reference else y


def test_check_operator_holds_a_users_operator_to_its_reference() -> None:
    """dcd_lightning.testing.check_operator, the suite's own comparison for users' operators: it
    passes ours and a subclass whose reference follows its forward, and names what differs in one
    whose reference does not."""
    from dcd_lightning.testing import check_operator

    x = torch.randn(3, 8, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    folded = ["train mode", "eval mode", "folded inference at batch 1", "folded inference at batch 3"]
    for op in (DCDConv2d(8, 12, 3, 2, reduction=2), DCDReleaseConv2d(8, 12, 1)):
        assert check_operator(op, x, distinct_kernels=True) == folded
    assert check_operator(DyConv2d(8, 12, 3, reduction=1), x, distinct_kernels=True) == ["train mode", "eval mode"]
    # at reduction 4 the attention's two hidden units are zero for every sample at this seed: alike kernels
    with pytest.warns(UserWarning, match=r"(train|eval) mode: the samples' kernels differ by at most .* proves little"):
        check_operator(DyConv2d(8, 12, 3), x)
    with pytest.raises(AssertionError, match=r"train mode: the samples' kernels differ by at most"):
        check_operator(DyConv2d(8, 12, 3), x, distinct_kernels=True)
    gated = _GatedDCD(8, 12, 3, 2, reduction=2)
    with pytest.raises(AssertionError, match=r"train mode, outputs: relative error \S+ > 1e-06 against the reference"):
        check_operator(gated, x)
    gated.gate_in_reference = True
    before = {key: value.clone() for key, value in gated.state_dict().items()}
    with pytest.warns(UserWarning, match=r"_GatedDCD is not folded for inference: it redefines _GatedDCD.forward"):
        assert check_operator(gated, x) == ["train mode", "eval mode"]  # no folded path: not checked twice
    assert gated.training and all(torch.equal(value, before[key]) for key, value in gated.state_dict().items())
    with pytest.raises(TypeError, match=r"check_operator: Conv2d has no reference_forward"):
        check_operator(nn.Conv2d(8, 12, 3), x)
