"""`python -m dcd_lightning export-onnx`: a model as ONNX with a dynamic batch axis, checked with onnxruntime.

    python -m dcd_lightning export-onnx --model mobilenetv2_x0.5_dcd --out model.onnx
    python -m dcd_lightning export-onnx --config configs/quickstart.yaml --checkpoint runs/.../last.ckpt --out m.onnx

The model is traced at batch 2 (so no route meant for one sample is baked in) and, with --check,
run by onnxruntime at batch 3 against PyTorch. Dynamic operators export without per-sample groups:
CondConv and DY-Conv mix their experts' outputs, depthwise DCD applies its basis kernels to the
activations, and DCD applies each sample's 1x1 residual by a batched matrix product, so the batch
size is an input of the graph, not a constant in it.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import torch
from torch import nn

BATCH_TRACED, BATCH_CHECKED = 2, 3


def export_onnx(model: nn.Module, image_size: int = 224, path: str | Path | None = None, opset: int = 17) -> bytes:
    """Export `model` (in eval mode) to ONNX with input "images" (N, 3, S, S) and output "logits"
    (N, classes), N dynamic; writes `path` if given and returns the serialised model."""
    model = model.eval()
    example = torch.randn(BATCH_TRACED, 3, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
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


def check_onnx(model: nn.Module, data: bytes, image_size: int, batch: int = BATCH_CHECKED) -> float:
    """Largest |onnxruntime - PyTorch| over the logits of a random batch of `batch` images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(images)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    if logits.shape != tuple(expected.shape):
        raise RuntimeError(f"export-onnx: onnxruntime gave shape {logits.shape}, PyTorch {tuple(expected.shape)}")
    return float((torch.from_numpy(logits) - expected).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcd_lightning export-onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a registry model (python -m dcd_lightning profile --help lists them)")
    source.add_argument("--config", action="append", help="a fit config (repeat to stack), as for fit")
    parser.add_argument("--checkpoint", help="a checkpoint of this project's training (.ckpt) to load")
    parser.add_argument("--num-classes", type=int, default=1000, help="with --model (default 1000)")
    parser.add_argument("--image-size", type=int, help="input size (default: the config's, or 224)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch at batch 3")
    args = parser.parse_args(argv)
    if args.model:
        from .models import create_model

        model, size = create_model(args.model, num_classes=args.num_classes), 224
    else:
        from .profile_cmd import model_from_config

        model, size = model_from_config(args.config, [])
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        if not weights:
            parser.error(f"{args.checkpoint} holds no 'model.*' weights; expected a checkpoint of `fit`")
        model.load_state_dict(weights)
    size = args.image_size or size
    data = export_onnx(model, size, args.out)
    print(f"wrote {args.out} ({len(data) / 2**20:.1f} MiB), input images (N, 3, {size}, {size}), N dynamic")
    if args.check:
        print(f"onnxruntime vs PyTorch at batch {BATCH_CHECKED}: max |difference| {check_onnx(model, data, size):.2e}")
    return 0
