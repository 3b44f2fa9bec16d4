"""DCD of a 1x1 or k x k convolution (Eqs. 6, 7 and 9 of the paper)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._branch import DynamicBranch
from ._common import (
    Gate,
    LatentRule,
    Route,
    affine_from_statistics,
    apply_sample_kernels,
    batch_norm_affine,
    check_choice,
    check_conv_args,
    check_input,
    check_int,
    check_odd_kernel,
    check_positive,
    in_layout_of,
    init_fan_out,
    latent_batch_norm,
    latent_dim_rule,
    linear_madds,
    mix_latent,
    output_size,
    per_sample_conv,
    pool_input,
    reshape_dims,
    running_affine,
    scaled_latent,
)
from ._folded import VERSION, FoldedDCD, place_blocks

# DCDConv2d's methods that a subclass may redefine and still fold: none computes the layer's output
NOT_COMPUTING = frozenset({"reset_parameters", "extra_repr", "madds", "branch_madds", "residual_madds", "redefined"})


class DCDConv2d(nn.Module):
    """Dynamic convolution decomposition W(x) = Lambda(x) W0 + P Phi(x) Q^T of a k x k convolution.

    fusion="channel" (Eqs. 6, 7; for k > 1 "channel fusion alone", Section 4.3): the dynamic residual
    is a 1x1 kernel at the centre tap, block-diagonal with `num_blocks` (B) blocks P_b Phi_b Q_b^T.
    fusion="joint" (Eq. 9): Phi(x) is an L x L x L_k tensor fusing latent channels and L_k latent
    kernel elements, with R (k^2 x L_k) reducing the kernel elements.
    `channel_attention` switches Lambda(x) (Eq. 6) against identity (Eq. 5); `channel_fusion=False`
    leaves Lambda(x) W0 alone. `squeeze_excite`, `gate="hard_sigmoid"`, `latent_norm` and
    `pool_size=2` give the structure of the official release (see DCDReleaseConv2d).

    L defaults to the paper's rule (Section 3.2) on the wider of C_in and C_out (for joint fusion on
    that divided by L_k, with its constraint L^2 L_k <= C), scaled by `latent_mult`. With B blocks each block gets the L of a layer
    with C / B channels (this reproduces Table 3a's Params and MAdds on the release's structure);
    `latent_dim` sets the per-block size outright. The branch
    width is C_in * pool_size^2 / `reduction` (r), or `branch_hidden`.
    `route` picks how the 1x1 residual is applied: "activations" (Q, Phi, P on the feature map),
    "kernel" (each sample's 1x1 kernel by batched matmul; for a 1x1 layer merged with Lambda W0),
    or "auto", the one with fewer multiply-adds at the input's resolution.
    """

    madds_children: tuple[str, ...] = ("branch",)  # the children whose work madds() counts

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        channel_attention: bool = True,
        channel_fusion: bool = True,
        fusion: Literal["channel", "joint"] = "channel",
        latent_mult: float = 1.0,
        latent_dim: int | None = None,
        latent_rule: LatentRule = "halving",
        kernel_latent_dim: int | None = None,
        num_blocks: int = 1,
        reduction: int = 16,
        branch_hidden: int | None = None,
        gate: Gate = "sigmoid",
        squeeze_excite: bool = False,
        latent_norm: bool = False,
        pool_size: int = 1,
        route: Route = "auto",
        bias: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, in_channels, out_channels, kernel_size, stride, groups)
        if groups != 1:
            raise ValueError(
                f"{name}: groups={groups} is not supported; DCDConv2d needs groups=1 "
                "(for a depthwise convolution use DCDDepthwiseConv2d)"
            )
        check_choice(name, "fusion", fusion, ("channel", "joint"))
        check_positive(name, "latent_mult", latent_mult)
        check_choice(name, "latent_rule", latent_rule, ("halving", "formula"))
        check_int(name, "num_blocks", num_blocks)
        check_int(name, "reduction", reduction)
        check_int(name, "pool_size", pool_size)
        check_choice(name, "gate", gate, ("sigmoid", "hard_sigmoid"))
        check_choice(name, "route", route, ("auto", "activations", "kernel"))
        if latent_dim is not None:
            check_int(name, "latent_dim", latent_dim)
        if branch_hidden is not None:
            check_int(name, "branch_hidden", branch_hidden)
        if kernel_latent_dim is not None:
            check_int(name, "kernel_latent_dim", kernel_latent_dim)
        if not (channel_attention or channel_fusion):
            raise ValueError(
                f"{name}: channel_attention=False with channel_fusion=False is a static convolution; "
                "use StaticConv2d, or switch one of them on"
            )
        if not channel_fusion:
            check_odd_kernel(name, kernel_size, "same padding")
        if channel_fusion and fusion == "channel":
            check_odd_kernel(name, kernel_size, "the 1x1 dynamic residual at the centre tap")
            if in_channels % num_blocks or out_channels % num_blocks:
                raise ValueError(
                    f"{name}: num_blocks={num_blocks} must divide in_channels={in_channels} and "
                    f"out_channels={out_channels}; choose a common divisor"
                )
        if fusion == "joint":
            check_odd_kernel(name, kernel_size, "fusion='joint' (same padding)")
            if kernel_size < 3:
                raise ValueError(
                    f"{name}: fusion='joint' needs kernel_size >= 3, got {kernel_size}; "
                    "use fusion='channel' for a 1x1 convolution"
                )
            if num_blocks != 1:
                raise ValueError(f"{name}: num_blocks={num_blocks} needs fusion='channel'; use 1")
            if latent_norm:
                raise ValueError(f"{name}: latent_norm=True needs fusion='channel'; use False")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.groups = groups
        self.fusion = fusion
        self.num_blocks = num_blocks
        self.pool_size = pool_size
        self.route = route
        self.channel_attention = channel_attention
        self.channel_fusion = channel_fusion

        # W0: the static kernel, named as nn.Conv2d names it so static weights load directly.
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

        # The paper assumes C_in = C_out = C; for other layers L follows the wider side.
        wider = max(in_channels, out_channels)
        self.kernel_latent_dim = 0
        self.latent_dim = 0
        fusion_size = 0
        if channel_fusion and fusion == "channel":
            # each of the B diagonal blocks is sized as a layer of its own, with C / B channels
            self.latent_dim = latent_dim or scaled_latent(
                name,
                latent_dim_rule(wider // num_blocks, latent_rule),
                latent_mult,
                wider // num_blocks,
                "the wider side's channels" + (" per block" if num_blocks > 1 else ""),
            )
            fusion_size = num_blocks * self.latent_dim**2
            # Q: compresses each block's inputs, shape (B * L, C_in / B); P: (C_out, L).
            self.compress = nn.Parameter(
                torch.empty(num_blocks * self.latent_dim, in_channels // num_blocks)
            )
            self.expand = nn.Parameter(torch.empty(out_channels, self.latent_dim))
        elif channel_fusion:
            elements = kernel_size * kernel_size
            self.kernel_latent_dim = elements // 2 if kernel_latent_dim is None else kernel_latent_dim
            if self.kernel_latent_dim >= elements:
                raise ValueError(
                    f"{name}: kernel_latent_dim={kernel_latent_dim} is not allowed; "
                    f"expected 1 <= L_k < k^2 = {elements}"
                )
            self.latent_dim = latent_dim or scaled_latent(
                name,
                latent_dim_rule(max(1, wider // self.kernel_latent_dim), latent_rule, strict=False),
                latent_mult,
                wider,
                "the wider side's channels",
            )
            fusion_size = self.latent_dim**2 * self.kernel_latent_dim
            self.compress = nn.Parameter(torch.empty(self.latent_dim, in_channels))
            self.kernel_basis = nn.Parameter(torch.empty(elements, self.kernel_latent_dim))
            self.expand = nn.Parameter(torch.empty(out_channels, self.latent_dim))

        pooled = in_channels * pool_size * pool_size
        hidden = branch_hidden or max(1, pooled // reduction)
        self.branch = DynamicBranch(
            pooled,
            hidden,
            attention_size=out_channels if channel_attention else 0,
            fusion_size=fusion_size,
            gate_kind=gate,
            squeeze_excite=squeeze_excite,
        )
        if latent_norm and channel_fusion:
            width = num_blocks * self.latent_dim
            self.latent_norm_in = nn.BatchNorm1d(width)
            self.latent_norm_out = nn.BatchNorm1d(width)
        else:
            self.latent_norm_in = None
            self.latent_norm_out = None
        self._folded: FoldedDCD | None = None
        # a following BatchNorm2d moved in by optimize_for_inference (folded with the layer's constants)
        self.output_norm: nn.Module | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise W0 like a static model's convolution (Kaiming normal, fan-out).

        Paper form: Q (and R) with PyTorch's default fan-in rule and P = 0, so the layer starts as
        Lambda(x) W0 and the residual grows from there (P's gradient is not zero). With batch norms
        in the latent space (the release) the scale of Q does not matter and Q, P are initialised
        as the release does (Kaiming normal, fan-out).
        """
        init_fan_out(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if not self.channel_fusion:
            return
        if self.latent_norm_in is not None:
            init_fan_out(self.compress)
            init_fan_out(self.expand)
            return
        nn.init.kaiming_uniform_(self.compress, a=math.sqrt(5))
        if hasattr(self, "kernel_basis"):
            nn.init.kaiming_uniform_(self.kernel_basis, a=math.sqrt(5))
        nn.init.zeros_(self.expand)

    def static_kernel(self) -> Tensor:
        """W0 as a convolution kernel (C_out, C_in, k, k)."""
        k = self.kernel_size
        return self.weight.view(self.out_channels, self.in_channels, k, k)

    def extra_repr(self) -> str:
        """Summarise the configuration for print(model)."""
        parts = [
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}",
            f"stride={self.stride}",
            f"channel_attention={self.channel_attention}",
            f"channel_fusion={self.channel_fusion}",
        ]
        if self.channel_fusion:
            parts += [f"fusion={self.fusion!r}", f"latent_dim={self.latent_dim}"]
            if self.fusion == "joint":
                parts.append(f"kernel_latent_dim={self.kernel_latent_dim}")
            if self.num_blocks > 1:
                parts.append(f"num_blocks={self.num_blocks}")
        return ", ".join(parts)

    # -- coefficients -------------------------------------------------------------------------

    def coefficients(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Lambda(x) as (N, C_out) and Phi(x) as (N, B, L, L) or, for joint fusion, (N, L, L, L_k)."""
        lam, phi = self.branch(pool_input(x, self.pool_size))
        if phi is not None:
            n, size = reshape_dims(x)[0], self.latent_dim
            if self.fusion == "joint":
                phi = phi.view(n, size, size, self.kernel_latent_dim)
            else:
                phi = phi.view(n, self.num_blocks, size, size)
        return lam, phi

    def _check(self, x: Tensor) -> None:
        name = type(self).__name__
        check_input(name, x, 4, self.in_channels)
        if self.training and self.latent_norm_in is not None:
            h_out, w_out = output_size(x.shape[2], x.shape[3], self.stride)
            if x.shape[0] * h_out * w_out < 2:
                raise ValueError(
                    f"{name}: batch norm in the latent space (latent_norm=True) needs more than one "
                    f"value per channel in training mode, but got batch size {x.shape[0]} with a "
                    f"{h_out}x{w_out} output; train with batch size >= 2, call .eval(), "
                    "or build the operator with latent_norm=False"
                )

    # -- fast path ----------------------------------------------------------------------------

    def prefers_kernel_route(self, height: int, width: int) -> bool:
        """True when forming the per-sample 1x1 residual costs fewer MAdds than the activation route."""
        if not self.channel_fusion or self.fusion != "channel":
            return False
        if self.route != "auto":
            return self.route == "kernel"
        return self.residual_madds(height, width, "kernel") < self.residual_madds(
            height, width, "activations"
        )

    def _takes_kernel_route(self, x: Tensor, height: int, width: int) -> bool:
        """The route of this forward: "auto" trains on a GPU by the activations (measured on an H100,
        bf16, channels_last, batch 128: training steps of MobileNetV2 x1.0 and ResNet-50 DCD took
        146 and 169 ms on the activation route against 188 and 213 ms by MAdds' choice, 246 and
        293 ms all by kernel; such a step is bound by kernel launches, and the kernel route's
        batch statistics from moments take ~2.3x as many operators), and elsewhere by MAdds. Latent batch
        norms converted to SyncBatchNorm (DDP with sync_batchnorm) train by the activations on
        any route: only there does the norm itself see the batch and sync its statistics."""
        if self.route == "auto" and self.training and x.device.type != "cpu":
            return False
        if self.training and isinstance(self.latent_norm_in, nn.SyncBatchNorm):
            return False  # the kernel route's statistics from per-sample moments are not synced over processes
        return self.prefers_kernel_route(height, width)

    def residual_madds(self, height: int, width: int, route: str) -> int:
        """MAdds per sample of the dynamic residual at an output of height x width, by route."""
        if not self.channel_fusion:
            return 0
        pixels = height * width
        latent, blocks = self.latent_dim, self.num_blocks
        if self.fusion == "joint":
            elements = self.kernel_size**2
            basis = self.latent_dim * self.kernel_latent_dim
            return pixels * (
                self.in_channels * latent  # Q
                + basis * elements  # R, depthwise over the latent channels
                + latent * basis  # Phi
                + self.out_channels * latent  # P
            )
        if route == "activations":
            return pixels * (self.in_channels * latent + blocks * latent**2 + self.out_channels * latent)
        rows, cols = self.out_channels // blocks, self.in_channels // blocks
        form = blocks * (rows * latent * latent + rows * latent * cols)
        if self.kernel_size == 1:
            return form + self.out_channels * self.in_channels  # merged into W0: no extra conv
        return form + pixels * self.out_channels * self.in_channels

    def branch_madds(self) -> int:
        """MAdds per sample of the dynamic branch's fully connected layers."""
        return linear_madds(self.branch)

    def madds(self, height: int, width: int) -> int:
        """MAdds per sample for an input of height x width, each dynamic part at its cheaper route.

        Static kernel + dynamic branch + Lambda and the residual, either formed into each sample's
        kernel or applied to the activations (whichever costs less); Lambda alone costs
        min(scaling W0, scaling the output).
        """
        h_out, w_out = output_size(height, width, self.stride)
        kernel_area = self.kernel_size**2
        static = self.out_channels * self.in_channels * kernel_area * h_out * w_out
        if self.channel_fusion:
            # Q, Phi, P on the activations, and Lambda on the output
            dynamic = self.residual_madds(h_out, w_out, "activations")
            dynamic += self.out_channels * h_out * w_out if self.channel_attention else 0
            if self.fusion == "channel":
                # or form each sample's kernel: Lambda W0 (every tap) + the 1x1 residual at the centre
                # tap, one multiply-add per element; without Lambda, the residual added to W0
                rows, cols, latent = self.out_channels // self.num_blocks, self.in_channels // self.num_blocks, self.latent_dim
                taps = kernel_area if self.channel_attention else 1
                formed = self.num_blocks * rows * latent * (latent + cols) + self.out_channels * self.in_channels * taps
                dynamic = min(dynamic, formed)
        else:
            dynamic = min(self.out_channels * self.in_channels * kernel_area, self.out_channels * h_out * w_out)
        return static + self.branch_madds() + dynamic

    # -- inference form ------------------------------------------------------------------------

    def fold_for_inference(self, native: bool = True) -> bool:
        """Fold the eval-mode constants (latent norms, gate range, both heads in one linear layer).

        The fold is used by forward() in eval mode with gradients off (torch.no_grad or
        torch.inference_mode) and gives the same outputs as the unfolded layer; changing a parameter
        or buffer in place, assigning the layer a new one (or a module), load_state_dict, moving
        the layer, or calling .train() makes forward() stop using it. A write through `.data`
        bypasses PyTorch's version counters and is not seen: after one, call this again.
        Under torch.compile the plain path is traced (no graph breaks; the compiler fuses it).
        With `native` (default), one sample on the CPU runs through the C kernel of ops/_native.c
        where it can be built. Returns False where there is nothing to fold (joint fusion), and for
        a subclass that redefines how the layer computes (see redefined), with a warning: its fold
        would compute as this class does.
        """
        redefined = self.redefined()
        if redefined:
            warnings.warn(f"{type(self).__name__} is not folded for inference: it redefines {', '.join(redefined)}, "
                          "which the fold would replace by DCDConv2d's own computation", stacklevel=2)
        self._folded = FoldedDCD(self, native) if self.fusion == "channel" and not redefined else None
        return self._folded is not None

    def redefined(self) -> list[str]:
        """The methods of DCDConv2d (and its branch's class) that this layer's class takes from
        outside this package: where there are any, the inference fold and a batch norm moved into
        the layer (optimize_for_inference) would not compute what the layer computes. Methods
        that compute nothing of the output (initialisation, counting, printing) do not count."""
        names = [f"{type(self).__name__}.{name}" for name, value in vars(DCDConv2d).items()
                 if callable(value) and not name.startswith("__") and name not in NOT_COMPUTING
                 and not getattr(getattr(type(self), name), "__module__", "").startswith(__package__ or "dcd_lightning")]
        if type(self.branch) is not DynamicBranch:
            names.append(f"its branch ({type(self.branch).__name__})")
        return names

    def __setattr__(self, name: str, value: object) -> None:
        """Assigning a tensor or a module (a new weight, a norm) drops the inference fold."""
        if isinstance(value, (Tensor, nn.Module)) and self.__dict__.get("_folded") is not None:
            self.__dict__["_folded"] = None
        super().__setattr__(name, value)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Loading a state dict (also with assign=True, which replaces the tensors) drops the fold."""
        self._folded = None
        super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> DCDConv2d:
        """Training mode drops the inference fold (the weights are about to change)."""
        if mode:
            self._folded = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        """Moving or converting the layer (.to, .double, ...) drops the inference fold."""
        self._folded = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the dynamic convolution to `x` of shape (N, C_in, H, W)."""
        folded = self._folded
        if (
            folded is not None
            and not self.training
            and not torch.is_grad_enabled()
            and x.dim() == 4
            and x.shape[1] == self.in_channels
            and not torch.compiler.is_compiling()  # a compiler traces the plain path and fuses it itself
            and not torch.is_autocast_enabled(x.device.type)  # the fold is float32/64 only: autocast takes the plain path
            and (  # folded.is_current(), building no tuple where one tensor is watched
                folded.watch._version == folded.watch_version
                if folded.watch is not None
                else folded.version == tuple(map(VERSION, folded.watched))
            )
        ):
            # the inference fold, with its checks written out here rather than called: inside
            # MobileNetV2 x0.5 at batch 1 the Python on the way to the C kernel cost several times
            # what it costs in a loop over one layer (measured against static in the same runs:
            # this forward bypassed, 0.06-0.07 less; the version check over the fold's 19
            # tensors alone, 0.03-0.04: each read reaches memory the convolutions have evicted;
            # in optimize_for_inference's copy they share one counter and one read does)
            if (
                folded.native is not None
                and x.shape[0] == 1
                and x.dtype == folded.dtype
                and x.is_contiguous()
                and not torch.jit.is_tracing()
            ):
                return folded.one_sample_native(x)
            return in_layout_of(folded.forward(x), x)
        self._check(x)
        # in x's layout: with a latent size of 1 the latent map (N, 1, H, W) is NCHW and
        # channels-last at once, and the convolution after it takes NCHW
        out = in_layout_of(self._forward_plain(x), x)
        return out if self.output_norm is None else self.output_norm(out)

    def _forward_plain(self, x: Tensor) -> Tensor:
        lam, phi = self.coefficients(x)
        n = reshape_dims(x)[0]
        h_out, w_out = output_size(x.shape[2], x.shape[3], self.stride)
        use_kernel = phi is not None and self._takes_kernel_route(x, h_out, w_out)
        if use_kernel and self.kernel_size == 1:
            return self._forward_merged_1x1(x, lam, phi)
        out = F.conv2d(x, self.static_kernel(), self.bias, self.stride, self.padding)
        if phi is None:
            return out * lam.view(n, self.out_channels, 1, 1)
        if use_kernel:
            residual = self._residual_by_kernel(x, phi)
        elif self.fusion == "joint":
            residual = self._residual_joint(x, phi)
        else:
            residual = self._residual_channel(x, phi)
        if lam is None:
            return out + residual
        return torch.addcmul(residual, out, lam.view(n, self.out_channels, 1, 1))

    def _project_latent(self, x: Tensor) -> Tensor:
        """Q^T x for each block: (N, B * L, H_out, W_out), a strided grouped 1x1 convolution.

        On the CPU an unstrided NCHW x is projected by one batched matrix product instead: there,
        oneDNN's 1x1 convolution with so few output channels (L, 8 in MobileNetV2 x0.5's wide
        layers) was slower, forward and backward. MobileNetV2 x0.5's training step at batch 32,
        DCD / static: 1.14-1.20 -> 1.06-1.14, paired in the same rounds (docs/benchmarks.md).
        """
        blocks, latent = self.num_blocks, self.latent_dim
        if self.stride == 1 and x.device.type == "cpu" and x.is_contiguous():
            n, c, h, w = reshape_dims(x)
            q = self.compress.view(blocks, latent, c // blocks)
            return torch.matmul(q, x.view(n, blocks, c // blocks, h * w)).view(n, blocks * latent, h, w)
        q = self.compress.view(blocks * latent, -1, 1, 1)
        return F.conv2d(x, q, stride=self.stride, groups=blocks)

    def _residual_channel(self, x: Tensor, phi: Tensor) -> Tensor:
        """P Phi Q^T applied to the activations: Q (1x1, strided), Phi (batched matmul), P (1x1),
        each in x's memory format (channels-last stays channels-last)."""
        z = self._project_latent(x)
        if self.latent_norm_in is not None:
            z = latent_batch_norm(self.latent_norm_in, z)
        fused = mix_latent(phi, z)
        if self.latent_norm_out is not None:
            fused = latent_batch_norm(self.latent_norm_out, fused) + z
        p = self.expand.view(self.out_channels, self.latent_dim, 1, 1)
        return F.conv2d(fused, p, groups=self.num_blocks)

    def _residual_joint(self, x: Tensor, phi: Tensor) -> Tensor:
        """Phi x_1 Q x_2 P x_3 R applied to the activations (Eq. 9), no k x k kernel per sample."""
        n, latent, kl, k = reshape_dims(x)[0], self.latent_dim, self.kernel_latent_dim, self.kernel_size
        z = F.conv2d(x, self.compress.view(latent, self.in_channels, 1, 1))
        basis = self.kernel_basis.t().reshape(kl, 1, k, k).repeat(latent, 1, 1, 1)
        u = F.conv2d(z, basis, stride=self.stride, padding=self.padding, groups=latent)
        # mix[n, b, a * L_k + t] = Phi[n, a, b, t]
        mix = phi.permute(0, 2, 1, 3).reshape(n, latent, latent * kl)
        fused = apply_sample_kernels(mix, u)
        return F.conv2d(fused, self.expand.view(self.out_channels, latent, 1, 1))

    def _latent_kernels(self, x: Tensor, phi: Tensor, reference: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-sample residual 1x1 kernels (N, C_out, C_in) and their bias (N, C_out) or None.

        With batch norms in the latent space the residual is P (A2 Phi + I)(A1 Q^T x + c1) + P c2,
        an affine map per sample: kernel P (A2 Phi + I) A1 Q^T and bias P ((A2 Phi + I) c1 + c2).
        A norm in training mode takes (A, c) from the batch's statistics: the reference reads them
        off the latent activations it computes; the fast path derives them from each sample's
        latent mean and covariance (see _latent_statistics) and updates the running statistics.
        """
        n, blocks, latent = x.shape[0], self.num_blocks, self.latent_dim
        rows, cols = self.out_channels // blocks, self.in_channels // blocks
        p = self.expand.view(blocks, rows, latent)
        q = self.compress.view(blocks, latent, cols)
        effective, latent_bias = phi, None
        if self.latent_norm_in is not None:
            if reference:
                scale1, shift1, scale2, shift2 = self._latent_affines_reference(x, phi)
            else:
                scale1, shift1, scale2, shift2 = self._latent_affines(x, phi)
            eye = torch.eye(latent, dtype=x.dtype, device=x.device)
            mixer = scale2[None, :, :, None] * phi + eye  # (A2 Phi + I)
            effective = mixer * scale1[None, :, None, :]
            latent_bias = torch.einsum("nbij,bj->nbi", mixer, shift1) + shift2
        blocks_kernel = torch.matmul(torch.matmul(p, effective), q)  # (N, B, C_out/B, C_in/B)
        kernel = place_blocks(blocks_kernel, self.out_channels, self.in_channels)
        bias = None
        if latent_bias is not None:
            bias = torch.einsum("bol,nbl->nbo", p, latent_bias).reshape(n, self.out_channels)
        return kernel, bias

    def _latent_affines_reference(self, x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A1, c1, A2, c2) as (B, L) each, read off the latent activations the residual produces."""
        n, blocks, latent = x.shape[0], self.num_blocks, self.latent_dim
        q = self.compress.view(blocks * latent, -1, 1, 1)  # Q^T x as a convolution, not _project_latent
        z = F.conv2d(x, q, stride=self.stride, groups=blocks).flatten(2)
        scale1, shift1 = batch_norm_affine(z, self.latent_norm_in, (0, 2))
        z1 = z * scale1[:, None] + shift1[:, None]
        fused = torch.matmul(phi, z1.view(n, blocks, latent, -1)).view(n, blocks * latent, -1)
        scale2, shift2 = batch_norm_affine(fused, self.latent_norm_out, (0, 2))
        return tuple(t.view(blocks, latent) for t in (scale1, shift1, scale2, shift2))

    def _latent_affines(self, x: Tensor, phi: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A1, c1, A2, c2) as (B, L) each without forming Phi's output on the feature map.

        A norm in eval mode uses its running statistics. In training mode the first norm's
        statistics come from z = Q^T x, and the second's from the per-sample moments of
        z1 = A1 z + c1: with m_n = mean(z1_n) and C_n = cov(z1_n) over positions, Phi_n z1_n has
        mean Phi_n m_n and covariance Phi_n C_n Phi_n^T, so (law of total variance) the batch
        variance of channel i is mean_n (Phi_n C_n Phi_n^T)_ii + var_n (Phi_n m_n)_i. Running
        statistics are updated as nn.BatchNorm1d updates them.
        """
        blocks, latent = self.num_blocks, self.latent_dim
        norm1, norm2 = self.latent_norm_in, self.latent_norm_out
        batch1 = norm1.training or norm1.running_mean is None
        batch2 = norm2.training or norm2.running_mean is None
        if not (batch1 or batch2):
            return tuple(t.view(blocks, latent) for t in (*running_affine(norm1), *running_affine(norm2)))
        z = self._project_latent(x)
        n, count = z.shape[0], z.shape[2] * z.shape[3]
        z = z.reshape(n, blocks * latent, count)
        mean_n = z.mean(dim=2)  # (N, BL)
        centred = z - mean_n[:, :, None]
        if batch1:
            within = centred.square().mean(dim=2)
            var1 = within.mean(dim=0) + mean_n.var(dim=0, unbiased=False)
            scale1, shift1 = affine_from_statistics(norm1, mean_n.mean(dim=0), var1, n * count)
        else:
            scale1, shift1 = running_affine(norm1)
        if batch2:
            # moments of z1 = A1 z + c1 per sample and block, then of Phi z1
            mean1 = (mean_n * scale1 + shift1).view(n, blocks, latent, 1)
            c = centred.view(n, blocks, latent, count) * scale1.view(1, blocks, latent, 1)
            covariance = torch.matmul(c, c.transpose(2, 3)) / count  # (N, B, L, L)
            fused_mean = torch.matmul(phi, mean1).squeeze(3)  # (N, B, L)
            fused_within = (torch.matmul(phi, covariance) * phi).sum(dim=3)
            var2 = fused_within.mean(dim=0) + fused_mean.var(dim=0, unbiased=False)
            scale2, shift2 = affine_from_statistics(
                norm2, fused_mean.mean(dim=0).reshape(-1), var2.reshape(-1), n * count
            )
        else:
            scale2, shift2 = running_affine(norm2)
        return tuple(t.view(blocks, latent) for t in (scale1, shift1, scale2, shift2))

    def _residual_by_kernel(self, x: Tensor, phi: Tensor) -> Tensor:
        """The 1x1 residual as a per-sample kernel applied by batched matmul (k > 1 route)."""
        kernel, bias = self._latent_kernels(x, phi)
        return apply_sample_kernels(kernel, x[:, :, :: self.stride, :: self.stride], bias)

    def _forward_merged_1x1(self, x: Tensor, lam: Tensor | None, phi: Tensor) -> Tensor:
        """1x1 layer by one per-sample kernel Lambda W0 + P Phi Q^T applied as a batched matmul."""
        kernel, bias = self._latent_kernels(x, phi)
        static = self.weight.view(1, self.out_channels, self.in_channels)
        kernel = kernel + (static * lam[:, :, None] if lam is not None else static)
        n = x.shape[0]
        total = self._static_bias(lam, n)
        if bias is not None:
            total = bias if total is None else total + bias
        # one sample: an ordinary convolution with its kernel (the fastest 1x1 on CPU); not in a
        # recorded graph (a user's jit.trace or torch.onnx.export at batch 1 must run at any batch)
        if n == 1 and not torch.jit.is_tracing():
            weight = kernel.view(self.out_channels, self.in_channels, 1, 1)
            return F.conv2d(x, weight, None if total is None else total[0], self.stride)
        return apply_sample_kernels(kernel, x[:, :, :: self.stride, :: self.stride], total)

    def _static_bias(self, lam: Tensor | None, n: int) -> Tensor | None:
        if self.bias is None:
            return None
        if lam is None:
            return self.bias.expand(n, -1)
        return lam * self.bias

    # -- reference ----------------------------------------------------------------------------

    def sample_kernels(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each sample's full kernel W(x) as (N, C_out, C_in, k, k) and its bias (N, C_out) or None."""
        lam, phi = self.coefficients(x)
        n, k = x.shape[0], self.kernel_size
        kernel = self.static_kernel().unsqueeze(0).expand(n, -1, -1, -1, -1)
        if lam is not None:
            kernel = kernel * lam[:, :, None, None, None]
        bias = self._static_bias(lam, n)
        if phi is None:
            return kernel, bias
        if self.fusion == "joint":
            residual = torch.einsum(
                "ob,nabt,ai,et->noie", self.expand, phi, self.compress, self.kernel_basis
            )
            return kernel + residual.reshape(n, self.out_channels, self.in_channels, k, k), bias
        residual, latent_bias = self._latent_kernels(x, phi, reference=True)
        centre = torch.zeros(k, k, dtype=x.dtype, device=x.device)
        centre[k // 2, k // 2] = 1
        kernel = kernel + residual[:, :, :, None, None] * centre
        if latent_bias is not None:
            bias = latent_bias if bias is None else bias + latent_bias
        return kernel, bias

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: form each sample's W(x) and run an ordinary convolution with it."""
        self._check(x)
        kernels, biases = self.sample_kernels(x)
        out = per_sample_conv(x, kernels, biases, self.stride, self.padding, 1)
        return out if self.output_norm is None else self.output_norm(out)
