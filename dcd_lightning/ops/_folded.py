"""Inference form of DCDConv2d: every constant of an eval-mode layer folded once.

In eval mode the latent batch norms are fixed affine maps and the gates' factor 2 is a constant,
so a DCD layer computes, per sample,

    W(x) = g Lambda'(x) W0 + P Phi'(x) (A1 Q^T),     b(x) = g Lambda'(x) b0 + P Phi'(x) c1 + P c2

with Lambda' = sigmoid or hard sigmoid of the attention head (g = 2 is the gate's range),
Phi' = A2 Phi + I (the release's identity path around Phi, with the second norm's scale A2 folded
into the fusion head's rows) and (A1, c1), (A2, c2) the norms' scales and shifts. One linear layer
then gives both heads' outputs; the residual needs no batch-norm calls. `FoldedDCD` holds these
tensors; DCDConv2d.fold_for_inference() builds it and forward() uses it while the layer is in eval
mode with gradients off, for as long as no parameter or buffer of the layer has changed in place;
moving the layer (.to, .cuda, .double) or switching it to training mode drops the fold.

One sample (batch 1, the latency case) takes its own paths: on the CPU, the C kernel of
ops/_native.c runs the branch and either forms the sample's kernel for one convolution or, after
the static convolution, adds P Phi' Q1 applied to the activations to its output, in one call
(forms_kernel decides per layer and input size);
without the kernel, a 1x1 layer's branch and kernel take a few PyTorch calls on 1-d vectors.
Batches take the batched routes below.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _native
from ._common import (
    apply_sample_kernels,
    hard_sigmoid,
    mix_latent,
    output_size,
    pool_input,
    pooling_matrix,
    reshape_dims,
    running_affine,
)


def place_blocks(blocks_kernel: Tensor, out_channels: int, in_channels: int) -> Tensor:
    """(N, B, C_out/B, C_in/B) diagonal blocks -> (N, C_out, C_in) block-diagonal kernels."""
    n, blocks = reshape_dims(blocks_kernel)[:2]
    if blocks == 1:
        return blocks_kernel.reshape(n, out_channels, in_channels)
    # block b of the output rows meets block b of the input columns only: a product with the
    # identity places them (no in-place writes, which traced and exported graphs mishandle)
    eye = torch.eye(blocks, dtype=blocks_kernel.dtype, device=blocks_kernel.device)
    kernel = blocks_kernel[:, :, :, None, :] * eye[None, :, None, :, None]
    return kernel.reshape(n, out_channels, in_channels)


# writing one element of a formed kernel (a pass over W0, in and out of memory) costs about as much
# as this many multiply-adds of a matrix product. Both batch-1 routes are one C call and one
# convolution, so forms_kernel weighs MAdds and this only: measured against static in the same
# runs, MobileNetV2 x0.5 1.263-1.266 with this rule, 1.271 with the activation route taken more
# often (its MAdds halved), 1.284-1.285 less often (x2, x4); ResNet-18 1.075 / 1.070 / 1.120
ELEMENT_MADDS = 4

# a 1x1, stride-1 layer whose convolution takes at most this many multiply-adds runs whole in the C
# kernel (branch, kernel or residual, and the convolution as a matrix product), which spares two
# allocations and a PyTorch call; larger ones leave the convolution to PyTorch, whose matrix
# products are faster at that size (ResNet-50's 51M-MAdd layers: 1.08 -> 1.12 whole). The C kernel
# runs on one thread: with more than two PyTorch threads the limit shrinks in proportion (measured
# at one and two threads, where every MobileNetV2 layer gains whole: x0.5 at two threads 1.21 ->
# 0.95-0.96 of static, x1.0 1.27 -> 1.22; beyond, a guess that leaves the larger convolutions to
# PyTorch's threads). Only where the kernel's vectors are AVX-512's (64 bytes) or AVX2's (32), the
# machines it was measured on. On an AVX2 CPU (AMD EPYC), with 6 x 2 register blocks (see
# _native.c), the blocked product took the 1x1 stride-1 layer sizes of MobileNetV2 (x0.5, x1.0) in
# 0.87 of the time of PyTorch's single-thread convolution in all (33-42 GMAdd/s; slower only with
# few inputs on the 112x112 map), and whole layers up to this limit took MobileNetV2 from 1.13-1.19x
# static to 1.03-1.07x (x0.5) and from 1.12-1.18x to 1.04-1.07x (x1.0), against 1.03-1.04 and
# 1.08-1.13 up to 10M (paired runs); with AVX-512's 4 x 4 blocks it ran at 23-27 GMAdd/s there
WHOLE_MADDS = 20_000_000

# ...and only where the vector lanes its product wastes stay below this many multiply-adds: the
# product computes whole vectors of columns (pixels), a last vector at most a quarter full one
# column at a time (dot products); a fuller one is padded. Before the column-at-a-time ending, a 7x7
# map (49 pixels) was computed as 64 with AVX-512's 16 floats, and MobileNetV2 x1.0's 7x7 layers
# (7.5M and 15M MAdds, 2.3M and 4.6M wasted) ran faster with PyTorch's convolution (paired against
# static: 1.138/1.143 -> 1.127/1.128), x0.5's (1.9M, 0.6M wasted) and x1.0's 14x14 layers (10.8M,
# 0.7M) whole. With it, x1.0's 7x7 layers run whole again: 1.124/1.129 -> 1.103/1.098
WHOLE_WASTE_MADDS = 1_000_000


def whole_in_c(out_channels: int, in_channels: int, height: int, width: int, element_size: int) -> bool:
    """Whether a 1x1, stride-1 convolution of one (in_channels, height, width) sample is computed by
    the C kernel's blocked product rather than PyTorch's convolution: where the kernel's vectors are
    AVX-512's or AVX2's, up to WHOLE_MADDS (shrinking with more than two PyTorch threads) and
    WHOLE_WASTE_MADDS. The rule of DCD's whole 1x1 layers, and of the static 1x1 convolutions to
    which optimize_for_inference gives the same product (ops/static.py)."""
    vector_bytes = _native.vector_bytes()
    if vector_bytes not in (32, 64):
        return False
    pixels = height * width
    lanes = vector_bytes // element_size
    # the pixels in a last, partial vector: at most a quarter of it go one by one (as in
    # matmul_part of _native.c), a fuller one is computed padded
    spare = pixels % lanes
    padding = 0 if pixels > lanes and 4 * spare <= lanes else -pixels % lanes
    madds = out_channels * in_channels * pixels
    return (
        madds * max(torch.get_num_threads(), 2) <= 2 * WHOLE_MADDS
        and out_channels * in_channels * padding <= WHOLE_WASTE_MADDS
    )


def layer_tensors(layer: nn.Module) -> list[Tensor]:
    """Every parameter and buffer a fold depends on (their versions tell when it is stale)."""
    return [*layer.parameters(), *(b for b in layer.buffers() if b.dtype.is_floating_point)]


def tensors_version(tensors: list[Tensor]) -> tuple[int, ...]:
    """The in-place version counters of `tensors` (DCDConv2d.forward reads them once per folded
    forward, with this expression written out)."""
    return tuple(map(VERSION, tensors))


VERSION = operator.attrgetter("_version")


def share_version_counter(layer: nn.Module, model: nn.Module) -> bool:
    """Make `layer`'s parameters and floating buffers views of one flat tensor, so that they share
    one in-place version counter (PyTorch gives all views of a base its counter): a fold built
    right after this then reads one version per forward instead of one per tensor (19 for a DCD
    layer with its norms). Values, shapes, requires_grad and the module structure are unchanged;
    the parameters become new Parameter objects, so this is only for a model that no optimizer
    holds: optimize_for_inference's own copy. Returns False, changing nothing, where the tensors
    differ in dtype or device, one is not contiguous, or one is shared with a module outside
    `layer`; also where the counter turns out not to be shared (checked with an in-place write of
    no elements)."""
    tensors = layer_tensors(layer)
    if not tensors or len({(t.dtype, t.device) for t in tensors}) > 1 or not all(t.is_contiguous() for t in tensors):
        return False
    inside, own = {id(t) for t in tensors}, {id(m) for m in layer.modules()}
    for module in model.modules():
        held = () if id(module) in own else (*module._parameters.values(), *module._buffers.values())
        if any(id(t) in inside for t in held if t is not None):
            return False
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    views = [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    new = {id(t): nn.Parameter(v, t.requires_grad) if isinstance(t, nn.Parameter) else v for t, v in zip(tensors, views)}
    versions = [v._version for v in new.values()]
    with torch.no_grad():
        flat[:0].zero_()  # bumps the shared counter, and only it
    if [v._version for v in new.values()] != [version + 1 for version in versions]:
        return False
    for module in layer.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None and id(t) in new:
                    table[name] = new[id(t)]
    layer._version_storage = flat.untyped_storage().data_ptr()  # where FoldedDCD expects its sources
    return True


class FoldedDCD:
    """Folded constants of one eval-mode DCDConv2d (channel fusion or Lambda alone) and its forward."""

    def __init__(self, layer: nn.Module, native: bool = True) -> None:
        with torch.no_grad():
            self._build(layer)
        self.use_native = native
        self._prepare_native()
        self.sources = layer_tensors(layer)
        # the tensors whose versions forward() reads: one, where share_version_counter made all of
        # them views of one base (one counter) and each still lies in that base's storage
        storage = getattr(layer, "_version_storage", 0)
        shared = storage != 0 and all(t.untyped_storage().data_ptr() == storage for t in self.sources)
        self.watched = tuple(self.sources[:1] if shared else self.sources)
        self._watch()

    def __getstate__(self) -> dict:
        """Copies and pickles leave the C kernel's handle out (ctypes objects do not copy); the
        copy points the kernel at its own tensors again. Copied tensors no longer share a version
        counter, so the copy watches each of them (from the versions they have when it is made,
        if this fold was current)."""
        state = dict(self.__dict__)
        state["native"] = None
        state["current"] = self.is_current()
        return state

    def __setstate__(self, state: dict) -> None:
        current = state.pop("current", False)  # a fold pickled before this key: treated as stale
        self.__dict__.update(state)
        self.watched = tuple(self.sources)
        self._watch(current)
        self._prepare_native()

    def _watch(self, current: bool = True) -> None:
        """Record the watched tensors' versions (a version that never matches if not `current`);
        `watch` is the one tensor, where one is watched, for a check that builds no tuple."""
        self.version = tensors_version(self.watched) if current else None
        self.watch = self.watched[0] if len(self.watched) == 1 else None
        self.watch_version = self.watch._version if self.watch is not None and current else -1

    def is_current(self) -> bool:
        """True while no parameter or buffer the fold was built from has been changed in place."""
        return tensors_version(self.watched) == self.version

    def _build(self, layer: nn.Module) -> None:
        branch = layer.branch
        self.out_channels, self.in_channels = layer.out_channels, layer.in_channels
        self.stride, self.padding, self.kernel_size = layer.stride, layer.padding, layer.kernel_size
        self.blocks, self.latent = layer.num_blocks, layer.latent_dim
        self.attention = branch.attention is not None
        self.gate = torch.sigmoid if branch.gate_kind == "sigmoid" else hard_sigmoid
        gain = 2.0 if self.attention else 1.0  # both gates are 2 x (hard) sigmoid
        self.weight = layer.static_kernel() * gain
        self.bias = None if layer.bias is None else layer.bias * gain
        heads, head_bias = [], []
        if self.attention:
            heads.append(branch.attention.weight)
            head_bias.append(branch.attention.weight.new_zeros(self.out_channels))
        self.fusion = branch.fusion is not None
        self.latent_bias = self.expand_bias = None
        if self.fusion:
            blocks, latent = self.blocks, self.latent
            rows, cols = self.out_channels // blocks, self.in_channels // blocks
            fusion_weight = branch.fusion.weight
            compress = layer.compress.view(blocks, latent, cols)
            eye = torch.eye(latent, dtype=fusion_weight.dtype, device=fusion_weight.device)
            if layer.latent_norm_in is not None:
                scale1, shift1 = (t.view(blocks, latent) for t in running_affine(layer.latent_norm_in))
                scale2, shift2 = (t.view(blocks, latent) for t in running_affine(layer.latent_norm_out))
                row_scale = scale2[:, :, None].expand(blocks, latent, latent).reshape(-1, 1)
                fusion_weight = fusion_weight * row_scale  # A2 Phi
                phi_bias = eye.expand(blocks, latent, latent).reshape(-1)  # + I
                compress = compress * scale1[:, :, None]  # A1 Q^T
                self.latent_bias = shift1  # c1
                expand = layer.expand.view(blocks, rows, latent)
                self.expand_bias = torch.matmul(expand, shift2[:, :, None]).reshape(-1)  # P c2
            else:
                phi_bias = fusion_weight.new_zeros(fusion_weight.shape[0])
            heads.append(fusion_weight)
            head_bias.append(phi_bias)
            self.expand = layer.expand.view(blocks, rows, latent).clone()
            self.compress = compress.detach().contiguous()  # without norms, a view of the parameter
        # the squeeze-and-excitation gate is 2 x hard sigmoid; its 2 goes into the heads (linear in h)
        self.fc_weight = branch.fc.weight.clone()
        self.se_weight = None if branch.se is None else branch.se.weight.clone()
        se_gain = 1.0 if branch.se is None else 2.0
        self.head_weight = (torch.cat(heads) * se_gain).contiguous()
        self.head_bias = torch.cat(head_bias)
        self.pool_size = layer.pool_size
        self.route = layer.prefers_kernel_route
        if layer.output_norm is not None:
            self._absorb(*running_affine(layer.output_norm))

    def _absorb(self, scale: Tensor, shift: Tensor) -> None:
        """Fold a following eval-mode batch norm y -> scale y + shift: every output row is scaled
        (W0 and its bias, P) and the shift joins the constant term P c2 (which Lambda does not scale)."""
        self.weight = self.weight * scale.view(-1, 1, 1, 1)
        self.bias = None if self.bias is None else self.bias * scale
        if self.fusion:
            self.expand = self.expand * scale.view(self.blocks, -1, 1)
        self.expand_bias = shift if self.expand_bias is None else self.expand_bias * scale + shift

    # -- forward ------------------------------------------------------------------------------

    def coefficients(self, x: Tensor) -> Tensor:
        """Both heads' outputs (N, C_out + B L^2): attention logits, then Phi' = A2 Phi + I."""
        hidden = F.linear(pool_input(x, self.pool_size), self.fc_weight)
        if self.se_weight is None:
            hidden = torch.relu(hidden)
        else:
            hidden = hidden * hard_sigmoid(F.linear(hidden, self.se_weight))
        return F.linear(hidden, self.head_weight, self.head_bias)

    def forward(self, x: Tensor) -> Tensor:
        # one sample takes its own paths, except in a recorded graph (jit.trace, the ONNX
        # exporter), which must work at any batch size (in export_onnx's, n is -1: reshape_dims).
        # The C kernel's case never gets here: DCDConv2d.forward, this method's only caller, sends
        # it to one_sample_native itself
        n = reshape_dims(x)[0]
        one = n == 1 and not torch.jit.is_tracing()
        if one and self.kernel_size == 1 and self.blocks == 1 and self.fusion:
            h_out, w_out = output_size(x.shape[2], x.shape[3], self.stride)
            if self.route(h_out, w_out):
                return self._one_sample_1x1(x)
        coefficients = self.coefficients(x)
        c_out = self.out_channels
        lam = self.gate(coefficients[:, :c_out]) if self.attention else None
        if not self.fusion:
            out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding) * lam.view(n, c_out, 1, 1)
            return out if self.expand_bias is None else out + self.expand_bias.view(1, c_out, 1, 1)
        phi = coefficients[:, c_out if self.attention else 0 :].view(n, self.blocks, self.latent, self.latent)
        h_out, w_out = output_size(x.shape[2], x.shape[3], self.stride)
        if not self.route(h_out, w_out):
            return self._by_activations(x, lam, phi)
        return self._by_kernel(x, lam, phi)

    # -- one sample ---------------------------------------------------------------------------

    def _prepare_native(self) -> None:
        """Point the C kernel (ops/_native.c) at this fold's tensors, where it applies: channel
        fusion in one block, on the CPU, in float32 or float64, with the kernel built."""
        self.native = None
        self.dtype = self.weight.dtype
        self.kernel_shape = tuple(self.weight.shape)
        self.plans: dict[tuple[int, int], tuple[bool, bool]] = {}  # the route per input size (plan)
        if not (self.use_native and self.fusion and self.blocks == 1 and self.weight.device.type == "cpu"):
            return
        functions = _native.functions(self.weight.dtype)
        if functions is None:
            return
        tensors = {
            "fc": self.fc_weight,
            "se": self.se_weight,
            "head_t": self.head_weight.t(),  # the C kernel takes the heads input-major
            "head_bias": self.head_bias,
            "weight": self.weight,
            "bias": self.bias,
            "expand": self.expand[0],
            "compress": self.compress[0],
            "latent_bias": None if self.latent_bias is None else self.latent_bias[0],
            "expand_bias": self.expand_bias,
        }
        kept = {name: None if t is None else t.detach().contiguous() for name, t in tensors.items()}
        if any(t is not None and t.dtype != self.weight.dtype for t in kept.values()):
            return
        layer = _native.Layer(
            c_in=self.in_channels,
            c_out=self.out_channels,
            latent=self.latent,
            hidden=self.fc_weight.shape[0],
            kernel_size=self.kernel_size,
            pool=self.pool_size,
            attention=int(self.attention),
            hard_gate=int(self.gate is hard_sigmoid),
            **{name: None if t is None else t.data_ptr() for name, t in kept.items()},
        )
        self.native = (*functions, layer, kept)  # kept: the tensors it points to

    def forms_kernel(self, height: int, width: int) -> bool:
        """At batch 1: form the sample's kernel, or apply P Phi' Q1 to the activations (both in the
        C kernel, beside one convolution)? By MAdds, counting each element of the formed kernel (a
        pass over W0) as ELEMENT_MADDS."""
        h_out, w_out = output_size(height, width, self.stride)
        c_in, c_out, latent = self.in_channels, self.out_channels, self.latent
        form = latent * c_in * (latent + c_out) + ELEMENT_MADDS * c_out * c_in * self.kernel_size**2
        apply = h_out * w_out * (c_in * latent + latent * latent + c_out * latent + c_out)
        return form <= apply

    def plan(self, height: int, width: int) -> tuple[bool, bool]:
        """The batch-1 route for this input size: (forms_kernel, whole in the C kernel), made at the
        first call with that size for the number of PyTorch threads then (see WHOLE_MADDS and
        WHOLE_WASTE_MADDS; a new fold plans anew)."""
        whole = (
            self.kernel_size == 1
            and self.stride == 1
            and self.padding == 0
            and whole_in_c(self.out_channels, self.in_channels, height, width, self.weight.element_size())
        )
        return self.forms_kernel(height, width), whole

    def one_sample_native(self, x: Tensor) -> Tensor:
        """One sample through the C kernel: branch and kernel in one call, then one convolution;
        or the static convolution, then one call for the branch and the residual on the
        activations (see forms_kernel). A 1x1 stride-1 layer up to WHOLE_MADDS, and any 1x1 layer
        on a 1x1 map (the dynamic classifier), is one call that computes the output itself."""
        function, vector_function, apply_function, whole_function, layer, _ = self.native
        _, _, h, w = x.shape
        if h == w == 1 and self.kernel_size == 1:  # a dynamic linear layer: matrix-vector products
            out = x.new_empty(1, self.out_channels, 1, 1)
            _native.check(vector_function(layer, x.data_ptr(), out.data_ptr()))
            return out
        plan = self.plans.get((h, w))
        if plan is None:  # the route for this input size
            plan = self.plans[h, w] = self.plan(h, w)
        forms, whole = plan
        if whole:  # 1x1, stride 1: the convolution is a matrix product, done in the same call
            out = x.new_empty(1, self.out_channels, h, w)
            status = whole_function(layer, x.data_ptr(), h, w, forms, out.data_ptr())
            if status:
                _native.check(status)
            return out
        if forms:
            kernel = x.new_empty(self.kernel_shape)
            bias = x.new_empty(self.out_channels)
            status = function(layer, x.data_ptr(), h, w, kernel.data_ptr(), bias.data_ptr())
            if status:
                _native.check(status)
            return F.conv2d(x, kernel, bias, self.stride, self.padding)
        # the activation route: the static convolution, then the C kernel's branch and, in place,
        # out = lam out + P (Phi' (Q1 x + c1)) + P c2 (no kernel formed, no further calls)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding).contiguous()
        status = apply_function(layer, x.data_ptr(), h, w, self.stride, out.data_ptr())
        if status:
            _native.check(status)
        return out

    def _one_sample_1x1(self, x: Tensor) -> Tensor:
        """One sample of a 1x1 layer in PyTorch calls (where the C kernel is not available): the
        branch on 1-d vectors, W = lam W0' + (P Phi') Q1 and its bias, then one convolution."""
        c_out, c_in, latent = self.out_channels, self.in_channels, self.latent
        # coefficients() for one sample on 1-d vectors: as many calls, each cheaper (1.56-1.57x
        # static for MobileNetV2 x0.5 on this path, against 1.60-1.63x through coefficients())
        pixels = x.reshape(c_in, -1)  # a view in both memory formats
        pooled = torch.mm(pixels, pooling_matrix(x.shape[2], x.shape[3], self.pool_size, x.dtype, x.device))
        hidden = torch.mv(self.fc_weight, pooled.view(-1))
        if self.se_weight is None:
            hidden = torch.relu(hidden)
        else:
            hidden = hidden * hard_sigmoid(torch.mv(self.se_weight, hidden))
        coefficients = torch.addmv(self.head_bias, self.head_weight, hidden)
        phi = (coefficients[c_out:] if self.attention else coefficients).view(latent, latent)
        mixed = torch.mm(self.expand[0], phi)
        static = self.weight.view(c_out, c_in)
        if self.attention:
            lam = self.gate(coefficients[:c_out])
            kernel = torch.mul(static, lam[:, None]).addmm_(mixed, self.compress[0])  # one pass over W0
        else:
            kernel = torch.addmm(static, mixed, self.compress[0])
        bias = None if self.bias is None else (lam * self.bias if self.attention else self.bias)
        if self.latent_bias is not None:
            latent_bias = torch.addmv(self.expand_bias, mixed, self.latent_bias[0])
            bias = latent_bias if bias is None else bias + latent_bias
        elif self.expand_bias is not None:
            bias = self.expand_bias if bias is None else bias + self.expand_bias
        return F.conv2d(x, kernel.view(c_out, c_in, 1, 1), bias, self.stride)

    def _static_bias(self, lam: Tensor | None) -> Tensor | None:
        """The static bias, scaled by each sample's lam: (N, C_out), or (1, C_out) without lam."""
        if self.bias is None:
            return None
        return self.bias[None] if lam is None else lam * self.bias

    def _by_kernel(self, x: Tensor, lam: Tensor | None, phi: Tensor) -> Tensor:
        n, c_out, c_in = reshape_dims(x)[0], self.out_channels, self.in_channels
        mixed = torch.matmul(self.expand, phi)  # P Phi': (N, B, C_out/B, L)
        residual = place_blocks(torch.matmul(mixed, self.compress), c_out, c_in)
        bias = self._static_bias(lam)  # (N or 1, C_out); every use below broadcasts
        if self.latent_bias is not None:
            latent_bias = torch.matmul(mixed, self.latent_bias[:, :, None]).view(n, c_out) + self.expand_bias
            bias = latent_bias if bias is None else bias + latent_bias
        elif self.expand_bias is not None:
            bias = self.expand_bias[None] if bias is None else bias + self.expand_bias
        k = self.kernel_size
        if n == 1 and not torch.jit.is_tracing():  # one sample: a plain convolution with its kernel
            if k == 1:
                static = self.weight.view(c_out, c_in)
                kernel = torch.addcmul(residual[0], static, lam.view(c_out, 1)) if lam is not None else residual[0] + static
                kernel = kernel.view(c_out, c_in, 1, 1)
            else:
                kernel = self.weight * lam.view(c_out, 1, 1, 1) if lam is not None else self.weight.clone()
                kernel[:, :, k // 2, k // 2] += residual[0]
            return F.conv2d(x, kernel, None if bias is None else bias[0], self.stride, self.padding)
        xs = x[:, :, :: self.stride, :: self.stride]
        if k == 1:
            static = self.weight.view(1, c_out, c_in)
            kernel = residual + (static * lam[:, :, None] if lam is not None else static)
            return apply_sample_kernels(kernel, xs, bias)
        out = F.conv2d(x, self.weight, None, self.stride, self.padding)
        res = apply_sample_kernels(residual, xs, bias)
        return res + out if lam is None else torch.addcmul(res, out, lam.view(n, c_out, 1, 1))

    def _by_activations(self, x: Tensor, lam: Tensor | None, phi: Tensor) -> Tensor:
        n, blocks, latent = reshape_dims(x)[0], self.blocks, self.latent
        q = self.compress.view(blocks * latent, -1, 1, 1)
        c1 = None if self.latent_bias is None else self.latent_bias.reshape(-1)
        z = F.conv2d(x, q, c1, self.stride, groups=blocks)
        fused = mix_latent(phi, z)
        p = self.expand.view(self.out_channels, latent, 1, 1)
        residual = F.conv2d(fused, p, self.expand_bias, groups=blocks)
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        if lam is None:
            return out + residual
        return torch.addcmul(residual, out, lam.view(n, self.out_channels, 1, 1))
