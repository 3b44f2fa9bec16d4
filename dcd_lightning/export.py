"""`python -m dcd_lightning export-onnx`: a model as ONNX with a dynamic batch axis, checked with onnxruntime.

    python -m dcd_lightning export-onnx --model mobilenetv2_x0.5_dcd --out model.onnx
    python -m dcd_lightning export-onnx --config configs/quickstart.yaml --checkpoint runs/.../last.ckpt --out m.onnx

The model's optimize_for_inference copy (batch norms and DCD constants folded, no C kernel) is
traced at batch 2 (so no route meant for one sample is baked in), with every size but the batch a
constant in the graph. With --check, onnxruntime runs it at batch 3 against the model as given in
PyTorch: the command fails (exit status 1) where the largest
difference of the logits exceeds both --tolerance times PyTorch's largest |logit| and ten times what
float32 rounding alone does to the model's logits (against a float64 copy), or where PyTorch's own
logits are not finite (nothing to compare: an untrained DCD ResNet in eval mode overflows).

Dynamic operators export without per-sample groups: CondConv and DY-Conv mix their experts'
outputs, depthwise DCD applies its basis kernels to the activations, and DCD applies each sample's
1x1 residual by a batched matrix product, so the batch size is an input of the graph, not a
constant in it.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ._args import positive_int
from .profiling import input_channels

BATCH_TRACED, BATCH_CHECKED = 2, 3
# --check passes where the largest |onnxruntime - PyTorch| over the logits is at most TOLERANCE of
# PyTorch's largest |logit|, or at most ROUNDING_FACTOR times how far float32 rounding alone moves
# PyTorch's own logits (float32 against a float64 copy of the model): onnxruntime computes the same
# float32 function with other roundings. Measured at 224x224, batch norms set from a random batch,
# every registry model: onnxruntime 7.5e-7 to 5.9e-4 of the largest logit, that largest where
# PyTorch's own float32 error was 9.5e-4 (MobileNetV2 x0.5 DCD, fusion only, two diagonal blocks:
# random models can be ill-conditioned; at 64x64 MobileNetV2 x1.0 DCD had 9e-3 against its own
# 1.5e-2).
# A graph with a batch size or route baked in errs by the order of the logits.
TOLERANCE = 1e-3
ROUNDING_FACTOR = 10.0


def export_onnx(model: nn.Module, image_size: int = 224, path: str | Path | None = None, opset: int = 17) -> bytes:
    """Export `model` (in eval mode) to ONNX with input "images" (N, C, S, S) and output "logits"
    (N, classes), N dynamic; writes `path` if given and returns the serialised model.

    What is exported is optimize_for_inference's copy of the model (without the C kernel, which a
    graph cannot hold): batch norms folded into the convolutions before them, and each DCD layer's
    eval-mode constants folded, so a DCD layer is its branch, one head and the residual's few
    products; every size but the batch is a constant in the graph (ops._common.reshape_dims).
    `model` itself is left as it was."""
    from .inference import optimize_for_inference
    from .ops._common import constant_sizes

    model = optimize_for_inference(model, native=False)  # an eval-mode copy
    example = torch.randn(BATCH_TRACED, input_channels(model), image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), constant_sizes():
        warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic and Python scalars
        torch.onnx.export(
            model, (example,), buffer, dynamo=False, opset_version=opset,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def check_onnx(
    model: nn.Module, data: bytes, image_size: int, batch: int = BATCH_CHECKED
) -> tuple[float, float, float]:
    """Run the ONNX model `data` in onnxruntime and `model` in PyTorch (eval mode) on a random batch
    of `batch` images (`model` is left in the mode it was in). Returns the largest |difference| of their logits; that as a fraction of
    PyTorch's largest |logit|; and, as the same fraction, the largest difference between PyTorch's
    logits and a float64 copy's (what float32 rounding alone does to this model's logits). Raises
    ValueError where PyTorch's logits are not all finite."""
    import onnxruntime

    images = torch.randn(batch, input_channels(model), image_size, image_size, generator=torch.Generator().manual_seed(0))
    from .inference import kept_modes

    with torch.no_grad(), kept_modes(model):
        expected = model.eval()(images)
    bad = int((~torch.isfinite(expected)).sum())  # checked first: then onnxruntime need not run
    if bad:
        raise ValueError(
            f"PyTorch's own logits for {batch} random images are not finite ({bad} of {expected.numel()} values "
            "are inf or NaN), so there is nothing to compare them with. An untrained DCD ResNet does this in "
            "eval mode: its batch norms hold no running statistics yet (mean 0, variance 1) and the dynamic "
            "residual grows from block to block until it overflows (the official release initialises its "
            "layers the same way). Check trained weights instead (--config FILE --checkpoint last.ckpt)"
        )
    scale = float(expected.abs().max()) or 1.0
    spread = float((expected - expected[:1]).abs().max())
    if batch > 1 and spread <= 1e-6 * scale:  # one image has no other to differ from
        print(f"export-onnx --check: note: PyTorch's logits are the same for all {batch} random images (they differ "
              f"by at most {spread:.1e}), so the comparison checks little of the model. An untrained model can do "
              "this in eval mode, where its batch norms hold no running statistics yet; check trained weights "
              "(--config FILE --checkpoint last.ckpt)", file=sys.stderr)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    if logits.shape != tuple(expected.shape):
        raise RuntimeError(f"export-onnx: onnxruntime gave shape {logits.shape}, PyTorch {tuple(expected.shape)}")
    with torch.no_grad():
        exact = copy.deepcopy(model).double().eval()(images.double())
    difference = float((torch.from_numpy(logits) - expected).abs().max())
    rounding = float((expected.double() - exact).abs().max())
    return difference, difference / scale, rounding / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning export-onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a registry model (dcd_lightning.list_models() lists them)")
    source.add_argument("--config", action="append", help="a fit config (repeat to stack), as for fit")
    parser.add_argument("--checkpoint", help="a checkpoint of this project's training (.ckpt) to load")
    parser.add_argument("--num-classes", type=positive_int, default=1000, help="with --model (default 1000)")
    parser.add_argument("--image-size", type=positive_int, help="input size (default: the config's, or 224)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--check", action="store_true",
                        help="compare onnxruntime with PyTorch at batch 3; exit status 1 if they differ")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="with --check: the difference always allowed, as a fraction of PyTorch's "
                             "largest |logit| (default %(default)g; more where float32 rounding alone moves "
                             "the model's logits more: 10 x that)")
    args = parser.parse_args(argv)
    if not args.tolerance > 0:
        parser.error(f"--tolerance must be positive, got {args.tolerance}")
    if args.model:
        from .models import create_model

        try:
            model, size = create_model(args.model, num_classes=args.num_classes), 224
        except ValueError as error:
            parser.error(f"--model: {error}")
    else:
        from .profile_cmd import model_from_config

        model, size = model_from_config(args.config, [])
    if args.checkpoint:
        if not Path(args.checkpoint).is_file():
            parser.error(f"--checkpoint {args.checkpoint}: no such file; expected a .ckpt written by `fit`")
        from .models.weights import checkpoint_model_weights

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        weights = checkpoint_model_weights(state)
        if not weights:
            parser.error(f"{args.checkpoint} holds no 'model.*' weights; expected a checkpoint of `fit`")
        try:
            model.load_state_dict(weights)
        except RuntimeError as error:
            hint = (" (with --model, the checkpoint must be of that registry model, with --num-classes its classes;"
                    " or give the run's config with --config)") if args.model else ""
            parser.error(f"{args.checkpoint} does not fit this model{hint}: {str(error).splitlines()[-1].strip()}")
    if args.image_size is not None:
        size = args.image_size
    data = export_onnx(model, size, args.out)
    print(f"wrote {args.out} ({len(data) / 2**20:.1f} MiB), input images (N, {input_channels(model)}, {size}, {size}), N dynamic")
    if args.check:
        try:
            difference, relative, rounding = check_onnx(model, data, size)
        except ValueError as error:
            print(f"export-onnx --check: {error}", file=sys.stderr)
            return 1
        allowed = max(args.tolerance, ROUNDING_FACTOR * rounding)
        passed = relative <= allowed  # False for NaN too
        print(f"onnxruntime vs PyTorch at batch {BATCH_CHECKED}: max |difference| {difference:.2e}, "
              f"{relative:.1e} of the largest |logit| (PyTorch float32 vs float64: {rounding:.1e}; allowed "
              f"{allowed:.1e}): {'ok' if passed else 'FAILED'}")
        if not passed:
            print(f"export-onnx --check: onnxruntime's logits differ from PyTorch's by {relative:.1e} of the "
                  f"largest |logit|, more than --tolerance {args.tolerance:g} and {ROUNDING_FACTOR:g} x float32's "
                  f"own error here; {args.out} is written but does not compute what the PyTorch model does",
                  file=sys.stderr)
            return 1
    return 0
