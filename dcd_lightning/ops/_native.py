"""The C kernel of _native.c: one sample of a folded DCD layer's branch and kernel in one call.

`library()` compiles _native.c with the system's C compiler on first use (6 s with GCC on a 2-core
AVX2 machine; 9 s there with the 4 x 4 blocks) into a per-user cache and loads it with ctypes;
later runs load the cached build. It returns None, and the folded layers keep their PyTorch path,
where that is not possible: no C compiler, a failed build (a warning says why), or
DCD_LIGHTNING_NATIVE=0 in the environment. Plain C with no PyTorch headers, so the build needs
nothing but a compiler.

The build is for this CPU (-march=native); the cache key includes the source, the flags, the
compiler and the CPU's identity, so a cache shared between different machines (a network home)
never hands one machine another's build. DCD_LIGHTNING_CACHE moves the cache; where the cache
cannot be written, the build goes to a temporary folder for this process.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_native.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
SUFFIXES = {torch.float32: "_f32", torch.float64: "_f64"}


class Layer(ctypes.Structure):
    """The C struct dcd_layer: a folded layer's sizes and its tensors' addresses."""

    _fields_ = [
        *((name, ctypes.c_long) for name in ("c_in", "c_out", "latent", "hidden", "kernel_size", "pool")),
        ("attention", ctypes.c_long),
        ("hard_gate", ctypes.c_long),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "fc", "se", "head_t", "head_bias", "weight", "bias",
                "expand", "compress", "latent_bias", "expand_bias",
            )
        ),
    ]


_lock = threading.Lock()
_state: dict[str, object] = {}


def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it is disabled or cannot be built."""
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                _state["library"] = _load()
    return _state["library"]  # type: ignore[return-value]


def enabled() -> bool:
    """False when DCD_LIGHTNING_NATIVE=0 asks for PyTorch calls only."""
    return os.environ.get("DCD_LIGHTNING_NATIVE", "1") != "0"


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, gcc or clang on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cache_dir() -> Path:
    """Where builds are kept: $DCD_LIGHTNING_CACHE, else $XDG_CACHE_HOME or ~/.cache, /dcd_lightning."""
    base = os.environ.get("DCD_LIGHTNING_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcd_lightning"


def _cpu_identity() -> str:
    """What distinguishes one CPU's -march=native build from another's."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _build(cc: str, directory: Path, name: str) -> Path:
    """directory/name, compiled from SOURCE unless it is there already."""
    path = directory / name
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            built = Path(tmp) / name
            command = [*shlex.split(cc), *FLAGS, str(SOURCE), "-o", str(built), "-lm"]  # CC may hold words
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode:
                error = result.stderr.strip()[-2000:]
                raise RuntimeError(f"{cc} exited with {result.returncode}: {error}")
            os.replace(built, path)  # atomic: processes building at once each install a whole file
    return path


def _load() -> ctypes.CDLL | None:
    """Build (or find) and load the kernel; None, with a warning for a failed build, where it cannot."""
    if not enabled():
        return None
    cc = compiler()
    if cc is None:
        return None
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), cc.encode(), _cpu_identity().encode()])
    ).hexdigest()[:20]
    name = f"dcd_native_{key}.so"
    try:
        try:
            path = _build(cc, cache_dir(), name)
        except OSError:  # no usable cache folder (unwritable, not a folder): build for this process only
            path = _build(cc, Path(tempfile.mkdtemp(prefix="dcd_lightning-")), name)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as error:
        warnings.warn(
            f"dcd_lightning: the C kernel for batch-1 DCD inference could not be built or loaded ({error}); "
            "folded DCD layers use their PyTorch path (same results, slower at batch 1). "
            "Set DCD_LIGHTNING_NATIVE=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_long
    for suffix in SUFFIXES.values():
        # (layer, x, h, w, kernel, bias), (layer, x, out), (layer, x, h, w, stride, out) and
        # (layer, x, h, w, forms, out); see _native.c
        sample, vector, apply, whole = (getattr(lib, name + suffix) for name in FUNCTIONS)
        sample.argtypes = [ctypes.POINTER(Layer), pointer, size, size, pointer, pointer]
        vector.argtypes = [ctypes.POINTER(Layer), pointer, pointer]
        apply.argtypes = [ctypes.POINTER(Layer), pointer, size, size, size, pointer]
        whole.argtypes = [ctypes.POINTER(Layer), pointer, size, size, size, pointer]
        sample.restype = vector.restype = apply.restype = whole.restype = ctypes.c_int
        pool = getattr(lib, "dcd_max_pool" + suffix)  # (x, planes, h, w, kh, kw, sh, sw, ph, pw, out)
        pool.argtypes = [pointer, *[size] * 9, pointer]
        conv = getattr(lib, "dcd_conv_1x1" + suffix)  # (weight, bias, x, c_out, c_in, pixels, out)
        conv.argtypes = [pointer, pointer, pointer, size, size, size, pointer]
        linear = getattr(lib, "dcd_linear" + suffix)  # (weight, bias, x, c_out, c_in, out)
        linear.argtypes = [pointer, pointer, pointer, size, size, pointer]
        pool.restype = conv.restype = linear.restype = ctypes.c_int
    lib.dcd_vector_bytes.argtypes, lib.dcd_vector_bytes.restype = [], ctypes.c_int
    lib.dcd_register_block.argtypes, lib.dcd_register_block.restype = [], ctypes.c_int
    return lib


FUNCTIONS = ("dcd_one_sample", "dcd_one_vector", "dcd_one_sample_apply", "dcd_one_sample_1x1")


def functions(dtype: torch.dtype) -> tuple[ctypes._CFuncPtr, ...] | None:
    """The kernel's (dcd_one_sample, dcd_one_vector, dcd_one_sample_apply, dcd_one_sample_1x1) for
    tensors of `dtype`, or None."""
    lib = library() if dtype in SUFFIXES else None
    if lib is None:
        return None
    return tuple(getattr(lib, name + SUFFIXES[dtype]) for name in FUNCTIONS)


def _function(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel's function `name` for tensors of `dtype`, or None."""
    lib = library() if dtype in SUFFIXES else None
    return None if lib is None else getattr(lib, name + SUFFIXES[dtype])


def max_pool(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel's dcd_max_pool for tensors of `dtype` (max pooling of NCHW planes), or None."""
    return _function("dcd_max_pool", dtype)


def conv_1x1(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel's dcd_conv_1x1 for tensors of `dtype` (one sample's 1x1 convolution), or None."""
    return _function("dcd_conv_1x1", dtype)


def linear(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The kernel's dcd_linear for tensors of `dtype` (one sample's linear layer), or None."""
    return _function("dcd_linear", dtype)


def vector_bytes() -> int:
    """The width of the C kernel's vectors (64 with AVX-512, 32 with AVX, 16 otherwise), 0 without it."""
    lib = library()
    return 0 if lib is None else int(lib.dcd_vector_bytes())


def register_block() -> tuple[int, int]:
    """The register block of the C kernel's matrix products, (rows, vectors of columns): (4, 4) with
    AVX-512 and where nothing else was measured, (6, 2) with AVX2 (see _native.c); (0, 0) without it."""
    lib = library()
    if lib is None:
        return 0, 0
    block = int(lib.dcd_register_block())
    return block // 100, block % 100


def check(status: int) -> None:
    """Raise for a non-zero status of a kernel call (its only failure: no memory for scratch space)."""
    if status:
        raise MemoryError("DCD C kernel: out of memory for its scratch space")
