"""Shared helpers of the operators: argument checks, latent-size rules and gates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Gate = Literal["sigmoid", "hard_sigmoid"]
LatentRule = Literal["halving", "formula"]
Route = Literal["auto", "activations", "kernel"]


def check_int(op: str, name: str, value: object, minimum: int = 1) -> int:
    """Return `value` if it is an int >= `minimum`, else raise a ValueError naming the operator."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name}={value!r} is not allowed; expected an integer >= {minimum}")
    return value


def check_positive(op: str, name: str, value: object) -> float:
    """Return `value` as a float if it is a number > 0, else raise a ValueError naming the operator."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{op}: {name}={value!r} is not allowed; expected a number > 0")
    return float(value)


def check_choice(op: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise a ValueError naming the operator."""
    if value not in choices:
        raise ValueError(f"{op}: {name}={value!r} is not allowed; expected one of {list(choices)}")
    return str(value)


def check_groups(op: str, in_channels: int, out_channels: int, groups: int) -> None:
    """Raise a ValueError unless `groups` divides both channel counts."""
    check_int(op, "groups", groups)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{op}: groups={groups} must divide in_channels={in_channels} and "
            f"out_channels={out_channels}; choose a common divisor"
        )


def check_odd_kernel(op: str, kernel_size: int, why: str) -> None:
    """Raise a ValueError for an even kernel where the operator needs a centre element."""
    if kernel_size % 2 == 0:
        raise ValueError(
            f"{op}: kernel_size={kernel_size} is even, but {why} needs a centre element; "
            "use an odd kernel_size (1, 3, 5, ...)"
        )


def check_input(op: str, x: Tensor, rank: int, channels: int) -> None:
    """Raise a ValueError unless `x` has `rank` dimensions and `channels` channels in dim 1."""
    if x.dim() != rank or x.shape[1] != channels:
        layout = "(N, C, H, W)" if rank == 4 else "(N, C)"
        raise ValueError(
            f"{op}: expected a {rank}-d input {layout} with C={channels}, "
            f"got shape {tuple(x.shape)}"
        )


def latent_dim_rule(channels: int, rule: LatentRule = "halving", *, strict: bool = True) -> int:
    """Default latent dimension L for `channels` channels (Section 3.2).

    "halving" divides C by 2 until it is below sqrt(C), as the paper's text says, so that L^2 < C
    holds; "formula" is the printed floor(C / 2^floor(log2 sqrt(C))), which gives L >= sqrt(C).
    `strict=False` halves only until floor(L)^2 <= C: joint fusion's constraint (Section 4.3,
    L^2 L_k <= C, with C / L_k passed as `channels`). There the printed formula holds wherever it
    meets that constraint (C / L_k = 16 or 64: L = 4 or 8), and halving goes on where it does not
    (32 or 128: 4 or 8, where the formula gives 8 or 16).
    """
    if channels < 1:
        raise ValueError(f"latent_dim_rule: channels={channels} must be >= 1")
    if rule == "formula":
        return max(1, channels // 2 ** math.floor(math.log2(math.sqrt(channels))))
    value = float(channels)
    while (value * value >= channels if strict else int(value) ** 2 > channels) and value >= 2:
        value /= 2
    return max(1, int(value))


def scale_latent(base: int, latent_mult: float) -> int:
    """Scale a default latent size by the latent multiplier (Table 2), rounding half up, at least 1."""
    return max(1, int(base * latent_mult + 0.5))


def scaled_latent(op: str, base: int, latent_mult: float, limit: int, what: str) -> int:
    """`scale_latent`, refused where a multiplier above 1 takes the size past `limit` (`what` names it).

    A latent space wider than the channels it mixes adds parameters and time, not rank; a default
    that is already above the limit (the release's minimum of 4) is left to stand.
    """
    latent = scale_latent(base, latent_mult)
    if latent > max(base, limit):
        raise ValueError(
            f"{op}: latent_mult={latent_mult} gives a latent size of {latent}, more than {what} ({limit}); "
            f"use latent_mult <= {limit / base:.4g}"
        )
    return latent


def hard_sigmoid(x: Tensor) -> Tensor:
    """relu6(x + 3) / 6, exact in float64 on every device (F.hardsigmoid's CUDA kernel multiplies by a
    float32 1/6 in every dtype: a relative error of ~4e-8 in float64). While jit.trace records (the
    ONNX exporter), F.hardsigmoid: one HardSigmoid node instead of an Add, a Clip and a Div with
    their constants (MobileNetV2 x0.5 DCD at 224x224: 2190 -> 1794 nodes; in onnxruntime at batch 1,
    0.95-0.96 of the time; x1.0 0.98; ResNet-18 unchanged)."""
    if torch.jit.is_tracing():
        return F.hardsigmoid(x)
    return F.relu6(x + 3.0) / 6.0


def gate(logits: Tensor, kind: Gate) -> Tensor:
    """Channel-attention gate with range (0, 2) that is 1 at zero logits, so Lambda starts at I."""
    if kind == "hard_sigmoid":
        return 2.0 * hard_sigmoid(logits) if torch.jit.is_tracing() else F.relu6(logits + 3.0) / 3.0
    return 2.0 * torch.sigmoid(logits)


def batch_norm_affine(
    values: Tensor, norm: torch.nn.BatchNorm1d | torch.nn.BatchNorm2d, dims: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with which `norm` maps `values` (batch stats when training).

    Used by the reference paths: batch statistics are batch-level quantities, so the reference
    reads them off the batch and then applies each sample's kernel explicitly.
    """
    if norm.training or norm.running_mean is None:
        return _affine(norm, values.mean(dim=dims), values.var(dim=dims, unbiased=False))
    return running_affine(norm)


def running_affine(norm: torch.nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of a batch norm with its running statistics (eval mode)."""
    return _affine(norm, norm.running_mean, norm.running_var)


def affine_from_statistics(
    norm: torch.nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """(scale, shift) of a training-mode batch norm from its batch's mean and biased variance.

    Updates the running statistics as nn.BatchNorm does (momentum, or a cumulative average when
    momentum is None; the running variance takes the unbiased estimate).
    """
    if norm.training and norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            stored = norm.running_mean.dtype  # float32 statistics under bf16 autocast
            norm.running_mean.lerp_(mean.detach().to(stored), factor)
            norm.running_var.lerp_((var.detach() * count / max(count - 1, 1)).to(stored), factor)
    return _affine(norm, mean, var)


def _affine(norm: torch.nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) with which `norm` maps values of this mean and (biased) variance."""
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def check_conv_args(op: str, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int) -> None:
    """Check the five leading arguments of the operator contract."""
    check_int(op, "in_channels", in_channels)
    check_int(op, "out_channels", out_channels)
    check_int(op, "kernel_size", kernel_size)
    check_int(op, "stride", stride)
    check_groups(op, in_channels, out_channels, groups)


def output_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Output height and width of a "same"-padded odd kernel (or a 1x1) at `stride`."""
    return (height - 1) // stride + 1, (width - 1) // stride + 1


def linear_madds(module: torch.nn.Module) -> int:
    """MAdds per sample of every nn.Linear inside `module` (a dynamic branch or routing head)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def exporting() -> bool:
    """True while the model is traced (torch.jit.trace, which ONNX export uses too) or exported
    (torch.export): routes whose convolution groups depend on the batch size (one group per
    sample) give way to batch-independent ones there, so that the graph runs at any batch."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _untraced(build: Callable[[], Tensor]) -> Tensor:
    """`build()` with torch.jit.trace's recording paused: its result enters a trace as a constant."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return build()
    finally:
        torch._C._set_tracing_state(state)


_CONSTANT_SIZES = [False]


@contextlib.contextmanager
def constant_sizes() -> Iterator[None]:
    """Within this context (export_onnx's trace, whose graph declares only the batch dynamic),
    reshape_dims gives a recorded graph constant sizes."""
    _CONSTANT_SIZES[0] = True
    try:
        yield
    finally:
        _CONSTANT_SIZES[0] = False


def reshape_dims(x: Tensor) -> tuple[int, ...]:
    """x.shape, for the sizes of reshapes and views: as it is, except while jit.trace records a graph
    inside constant_sizes(), where the batch is -1 and every other size a Python constant. The graph
    then reshapes by one constant shape, where sizes read off tensors become a chain of Shape,
    Gather, Unsqueeze and Concat nodes per view (most of an exported DCD layer's nodes); its batch
    stays dynamic, its other sizes fixed. Other traces (a user's jit.trace or torch.onnx.export,
    perhaps with other dynamic axes) keep the sizes read off tensors. Use at most one -1 per view:
    the batch's."""
    if _CONSTANT_SIZES[0] and torch.jit.is_tracing():
        return (-1, *(int(size) for size in x.shape[1:]))
    return tuple(x.shape)


def pool_input(x: Tensor, pool_size: int) -> Tensor:
    """Average-pool `x` (N, C, H, W) to pool_size x pool_size and flatten to (N, C * pool_size^2).

    Cells are those of adaptive_avg_pool2d (overlapping where the size does not divide). A grid
    larger than 1x1 is one matrix product with a (H W, pool_size^2) averaging matrix: exact,
    exportable to ONNX (whose adaptive pooling needs equal cells), and on the CPU 2-7x faster
    than a reshaped mean, whose reduction over two strided dimensions runs in short rows.

    The 1x1 grid is a sum scaled afterwards rather than x.mean: mean's gradient is a division
    written out at x's full size, the sum's a broadcast view that autograd adds into x's gradient
    (on the CPU, a 32 x 96 x 56 x 56 input's backward 85-100 -> 62-75 ms in a loop).
    """
    n, c, h, w = reshape_dims(x)
    if pool_size == 1:
        return x.sum(dim=(2, 3)) * (1.0 / (h * w))
    matrix = pooling_matrix(h, w, pool_size, x.dtype, x.device)
    pixels = x.reshape(n, c, h * w)  # a view in both memory formats
    if channels_last(x):  # pool (N, H W, C) from the left, no copy of x
        return torch.matmul(matrix.t(), pixels.transpose(1, 2)).transpose(1, 2).reshape(n, c * pool_size**2)
    return torch.matmul(pixels, matrix).view(n, c * pool_size**2)


def channels_last(x: Tensor) -> bool:
    """True for a 4-d tensor laid out channels-last (channels fastest) that is not also contiguous."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()


def in_layout_of(out: Tensor, x: Tensor) -> Tensor:
    """`out` in x's memory format: a copy to channels-last where x is channels-last and `out` is not
    (routes built on batch-sized convolution groups produce NCHW), else `out` itself."""
    if channels_last(x) and not out.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def apply_sample_kernels(kernels: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-sample 1x1 convolution: out[i] = kernels[i] x[i] (+ bias[i]) for x (N, C_in, H, W), kernels
    (N, C_out, C_in), bias (N, C_out); one batched product, the output in x's memory format.

    Channels-last x is multiplied as (N, H W, C_in) rows from the right, which gives a channels-last
    output without copying x (on a GPU the following batch norm then takes its channels-last kernels).
    """
    n, c_in, h, w = reshape_dims(x)
    c_out = reshape_dims(kernels)[1]
    if channels_last(x):
        out = product_plus(x.permute(0, 2, 3, 1).reshape(n, h * w, c_in), kernels.transpose(1, 2), bias, 1)
        return out.view(n, h, w, c_out).permute(0, 3, 1, 2)
    return product_plus(kernels, x.reshape(n, c_in, h * w), bias, 2).view(n, c_out, h, w)


def product_plus(left: Tensor, right: Tensor, bias: Tensor | None, axis: int) -> Tensor:
    """left @ right (batched) plus bias (N, C) broadcast along `axis` (1 or 2) of the product. A
    recorded graph adds the bias after the product: baddbmm exports as the product and the bias
    each multiplied by a factor 1, two more passes over the output in onnxruntime."""
    if bias is None:
        return torch.bmm(left, right)
    bias = bias.unsqueeze(axis)
    if torch.jit.is_tracing():
        return torch.bmm(left, right) + bias
    return torch.baddbmm(bias, left, right)


def mix_latent(phi: Tensor, z: Tensor) -> Tensor:
    """Phi z for z (N, B L, H, W) and phi (N, B, L, L): each sample's and block's L x L matrix applied
    over that block's channels, the output in z's memory format (as apply_sample_kernels)."""
    n, blocks, latent = reshape_dims(phi)[:3]
    h, w = reshape_dims(z)[-2:]
    if channels_last(z):
        rows = z.permute(0, 2, 3, 1).reshape(n, h * w, blocks, latent).transpose(1, 2)  # a view
        out = torch.matmul(rows, phi.transpose(2, 3))  # (N, B, H W, L); a copy back below if B > 1
        return out.transpose(1, 2).reshape(n, h, w, blocks * latent).permute(0, 3, 1, 2)
    return torch.matmul(phi, z.reshape(n, blocks, latent, h * w)).view(n, blocks * latent, h, w)


def latent_batch_norm(norm: torch.nn.modules.batchnorm._BatchNorm, z: Tensor) -> Tensor:
    """`norm` (a BatchNorm1d over the latent channels) applied to z (N, C, H, W) exactly as to
    z.reshape(N, C, H W), statistics and running updates included, as nn.BatchNorm does them, but
    without that reshape (a copy for channels-last z) and keeping z's memory format. A norm that is
    not a plain BatchNorm1d is called as a module: SyncBatchNorm (DDP with sync_batchnorm) takes
    the 4-d map and syncs its statistics over the processes; any other gets the 3-d view."""
    if type(norm) is not torch.nn.BatchNorm1d:
        if isinstance(norm, torch.nn.SyncBatchNorm):
            return norm(z)
        return norm(z.reshape(z.shape[0], z.shape[1], -1)).view(z.shape)
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    use_batch = norm.training or (norm.running_mean is None and norm.running_var is None)
    keep = not norm.training or norm.track_running_stats
    return F.batch_norm(z, norm.running_mean if keep else None, norm.running_var if keep else None, norm.weight,
                        norm.bias, use_batch, factor, norm.eps)


_POOLING: dict[tuple[int, int, int, torch.dtype, torch.device], Tensor] = {}


def pooling_matrix(height: int, width: int, cells: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H W, cells^2) matrix: column i * cells + j averages adaptive pooling's cell (i, j).

    Cell i along a side of length s is [floor(i s / p), ceil((i + 1) s / p)). Eager calls share one
    cached matrix per shape; torch.compile traces the construction instead of the cache, whose
    lookup would otherwise become a guard on the cache's contents: the first call fills the cache,
    so the second call failed that guard and recompiled the whole model.
    """
    height, width = int(height), int(width)
    if torch.compiler.is_compiling():
        return _build_pooling_matrix(height, width, cells, dtype, device)
    key = (height, width, cells, dtype, device)
    if key not in _POOLING:
        with torch.inference_mode(False):  # a normal tensor, usable by autograd after inference
            # outside a trace's recording, or a trace that fills the cache would record the
            # construction, and jit.trace's check (which reads the cache) would find another graph
            _POOLING[key] = _untraced(lambda: _build_pooling_matrix(height, width, cells, dtype, device))
    return _POOLING[key]


def _build_pooling_matrix(height: int, width: int, cells: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The matrix made on `device` from index arithmetic (float64 where the device has it), with no
    tensor built on the host: a compiled graph then holds no host constant and no copy to the
    device, which would sync a GPU stream on every call and keep CUDA graphs from capturing it."""
    work = torch.float64 if torch.device(device).type != "mps" else dtype
    rows, cols = _cell_weights(height, cells, work, device), _cell_weights(width, cells, work, device)
    matrix = rows[:, None, :, None] * cols[None, :, None, :]
    return matrix.reshape(height * width, cells * cells).to(dtype=dtype)


def _cell_weights(size: int, cells: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, cells) weights: entry (j, i) is 1 / |cell i| where position j lies in cell i, else 0;
    cell i is [floor(i size / cells), ceil((i + 1) size / cells))."""
    i = torch.arange(cells, device=device)
    start, end = (i * size) // cells, -((-(i + 1) * size) // cells)
    j = torch.arange(size, device=device)[:, None]
    inside = (j >= start) & (j < end)
    return inside.to(dtype) / (end - start).to(dtype)


def grouped_sample_conv(
    x: Tensor, kernels: Tensor, bias: Tensor | None, out_channels: int, stride: int, padding: int, groups: int
) -> Tensor:
    """Every sample's own kernels in one convolution, the batch folded into its groups: x (N, C_in, H,
    W), kernels (N C_out, C_in / groups, k, k), bias (N C_out) or None; the output (N, C_out, H', W')
    in x's memory format. An empty batch gives an empty output, as nn.Conv2d does (a convolution
    cannot have 0 groups)."""
    n, c_in, h, w = x.shape
    if n == 0:
        k = kernels.shape[-1]
        size = ((h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)
        return in_layout_of(x.new_empty(0, out_channels, *size), x)
    out = F.conv2d(x.reshape(1, n * c_in, h, w), kernels, bias, stride, padding, groups=n * groups)
    return in_layout_of(out.view(n, out_channels, out.shape[-2], out.shape[-1]), x)


def per_sample_conv(
    x: Tensor, kernels: Tensor, biases: Tensor | None, stride: int, padding: int, groups: int
) -> Tensor:
    """Reference convolution: sample i of `x` with kernels[i] and biases[i], one plain conv each."""
    return torch.cat(
        [
            F.conv2d(x[i : i + 1], kernels[i], None if biases is None else biases[i], stride, padding, groups=groups)
            for i in range(x.shape[0])
        ]
    )


def init_fan_out(weight: Tensor) -> None:
    """Kaiming normal initialisation with fan-out = dim 0 x the trailing dims (torchvision's conv init).

    For a (C_out, C_in, k, k) kernel that is std sqrt(2 / (C_out k^2)); for a 2-d (rows, cols)
    factor it is std sqrt(2 / rows), which is how the release initialises its 1x1 Q and P.
    """
    fan_out = weight.shape[0] * (weight[0, 0].numel() if weight.dim() > 2 else 1)
    with torch.no_grad():
        weight.normal_(0.0, (2.0 / fan_out) ** 0.5)
