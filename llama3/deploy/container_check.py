"""Can this environment (a container image being built) run the project? One line per check.

1. torch's version lies within the installed project's ``torch`` requirement (pyproject.toml),
   compared as PEP 440 versions: NVIDIA's ``2.11.0a0+…`` snapshots precede 2.11 and are refused;
2. the model imports, a tiny softplus and a tiny softmax model export to ONNX, and ONNX Runtime
   reproduces PyTorch on the CPU;
3. with ``--require_cuda_provider``: onnxruntime has its CUDA provider, built for torch's CUDA
   major version;
4. with ``--require_tensorrt``: tensorrt imports and is a supported version.

    python -m llama3.deploy.container_check [--torch_version V] [--version_only] ...

Exits 0 when every check passes; otherwise one line on stderr names the failed check and what to
change, and the exit status is 1. The Dockerfile runs it as its last build step, so a broken image
fails at ``docker build``. Heavy imports happen inside the checks, so a torch outside the range is
reported before anything depends on it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
from pathlib import Path

PROJECT = "llama3-softplus"
LOGITS_TOLERANCE = 1e-4  # fp32 ONNX Runtime against fp32 PyTorch on a tiny model
TINY_MODELS = {
    "softplus": dict(attention="softplus", dim=32, n_layers=2, core_dim=16),
    "softmax": dict(
        attention="softmax", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16
    ),
}


class CheckFailed(Exception):
    """A failed check; its message is the one line printed."""


def torch_requirement() -> object:
    """The installed project's requirement on torch, a ``packaging.requirements.Requirement``."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        raise CheckFailed("the 'packaging' module is missing: pip install packaging") from None

    try:
        lines = importlib.metadata.requires(PROJECT) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckFailed(
            f"{PROJECT} is not installed: pip install --no-deps the repository "
            "first, so its torch requirement can be read"
        ) from None
    for line in lines:
        requirement = Requirement(line)
        if requirement.name == "torch" and (
            not requirement.marker or requirement.marker.evaluate()
        ):
            return requirement
    raise CheckFailed(f"{PROJECT}'s metadata names no torch requirement")


def check_torch_version(version: str, image: str | None = None) -> str:
    """Raise CheckFailed unless torch ``version`` satisfies the project's requirement."""
    requirement = torch_requirement()
    from packaging.version import InvalidVersion, Version

    where = f" in {image}" if image else ""
    try:
        inside = requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        raise CheckFailed(
            f"torch{where} reports version {version!r}, which is not a PEP 440 version"
        ) from None
    if not inside:
        raise CheckFailed(
            f"torch {version}{where} is outside this project's range "
            f"({requirement}); build with --build-arg BASE_IMAGE=<an NGC PyTorch "
            "image whose torch is in range> (README: Docker)"
        )
    return f"torch {version}: within {requirement}"


def installed_torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise CheckFailed("torch is not installed") from None


def check_onnx_export() -> list[str]:
    """Export tiny models of both attentions and compare ONNX Runtime with PyTorch on the CPU."""
    import onnxruntime as ort
    import torch

    from llama3.deploy.accuracy import check_inputs, compare_outputs
    from llama3.deploy.onnx_export import export_onnx
    from llama3.deploy.runners import OnnxRuntimeRunner, TorchRunner
    from llama3.model import ModelArgs, Transformer

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for attention, shape in TINY_MODELS.items():
            torch.manual_seed(0)
            args = ModelArgs(vocab_size=64, max_seq_len=32, **shape)
            model = Transformer.build(args).eval()
            path = export_onnx(model, Path(tmp) / f"{attention}.onnx")
            runner = OnnxRuntimeRunner(path, args, torch.device("cpu"))
            worst = max(
                compare_outputs(
                    TorchRunner(model), runner, *check_inputs(args, 2, query, cached)
                ).logits_abs
                for query, cached in ((7, 0), (1, 6))
            )
            if not worst <= LOGITS_TOLERANCE:
                raise CheckFailed(
                    f"ONNX Runtime {ort.__version__} differs from PyTorch by "
                    f"{worst:.2e} on a tiny {attention} model (tolerance "
                    f"{LOGITS_TOLERANCE})"
                )
            lines.append(
                f"ONNX export of a tiny {attention} model: ONNX Runtime {ort.__version__} "
                f"matches PyTorch (largest logits difference {worst:.1e})"
            )
    return lines


def cuda_major(version: str | None) -> str | None:
    return version.split(".")[0] if version else None


def check_cuda_provider() -> str:
    """onnxruntime has the CUDA provider, built for the CUDA major version torch uses."""
    import onnxruntime as ort
    import torch
    from onnxruntime.capi import build_and_package_info

    from llama3.deploy.runners import CUDA_PROVIDER, ORT_CUDA_HINT

    providers = ort.get_available_providers()
    if CUDA_PROVIDER not in providers:
        raise CheckFailed(
            f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (it has "
            f"{', '.join(providers)}): install {ORT_CUDA_HINT}"
        )
    built_for = getattr(build_and_package_info, "cuda_version", None)
    if cuda_major(built_for) != cuda_major(torch.version.cuda):
        raise CheckFailed(
            f"onnxruntime {ort.__version__} is built for CUDA {built_for}, the "
            f"image's torch for CUDA {torch.version.cuda}: install {ORT_CUDA_HINT}"
        )
    return f"ONNX Runtime {ort.__version__}: {CUDA_PROVIDER} for CUDA {built_for}, as torch's"


def check_tensorrt() -> str:
    from llama3.deploy.tensorrt import SUPPORTED, engine_typing, import_tensorrt

    trt, reason = import_tensorrt()
    if trt is None:
        raise CheckFailed(
            f"import tensorrt failed: {reason}; choose an NGC PyTorch image with "
            f"TensorRT {SUPPORTED}"
        )
    try:
        engine_typing(trt, "fp32")
    except RuntimeError as err:
        raise CheckFailed(str(err)) from None
    return f"TensorRT {trt.__version__}: supported"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llama3.deploy.container_check",
        description="Check that this environment can run the project; one line per check, exit "
        "status 1 and one line on stderr at the first failure.",
    )
    parser.add_argument(
        "--torch_version",
        metavar="VERSION",
        help="judge this torch version instead of the installed one",
    )
    parser.add_argument("--image", metavar="NAME", help="image name, for the messages")
    parser.add_argument(
        "--version_only", action="store_true", help="stop after the torch version check"
    )
    parser.add_argument(
        "--require_cuda_provider",
        action="store_true",
        help="also require onnxruntime's CUDA provider, built for torch's CUDA",
    )
    parser.add_argument(
        "--require_tensorrt",
        action="store_true",
        help="also require an importable, supported TensorRT",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(
            check_torch_version(args.torch_version or installed_torch_version(), args.image),
            flush=True,
        )
        if args.version_only:
            return 0
        for line in check_onnx_export():
            print(line, flush=True)
        if args.require_cuda_provider:
            print(check_cuda_provider(), flush=True)
        if args.require_tensorrt:
            print(check_tensorrt(), flush=True)
    except CheckFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
