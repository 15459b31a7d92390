"""The image check the Dockerfile runs (``python -m llama3.deploy.container_check``): torch version
strings of NGC images judged against pyproject.toml's range, the export check, the ONNX Runtime
CUDA provider check, and the Dockerfile's and pyproject's agreement with the code."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from packaging.requirements import Requirement

from llama3.deploy import container_check
from llama3.deploy.tensorrt import SUPPORTED_MAJORS

REPO = Path(__file__).resolve().parents[2]


def run_check(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama3.deploy.container_check", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "version, ok",
    [
        (
            "2.7.0a0+7c8ec84dab.nv25.03",
            False,
        ),  # NGC 25.03, the image this project once defaulted to
        ("2.10.0a0+b4e4ee81d3", False),  # NGC 25.12
        ("2.11.0a0+eb65b36914.nv26.02", False),  # a 2.11 development snapshot: precedes 2.11
        ("2.11.0", True),
        ("2.12.0a0+nv26.05", True),
        ("2.13.0+cpu", True),
    ],
)
def test_torch_version_strings_against_the_range(version, ok, capsys):
    status = container_check.main(
        [
            "--torch_version",
            version,
            "--version_only",
            "--image",
            "nvcr.io/nvidia/pytorch:YY.MM-py3",
        ]
    )
    out, err = capsys.readouterr()
    assert status == (0 if ok else 1)
    if ok:
        assert out == f"torch {version}: within torch>=2.11\n" and err == ""
    else:
        assert out == "" and len(err.splitlines()) == 1
        assert err.startswith(
            f"error: torch {version} in nvcr.io/nvidia/pytorch:YY.MM-py3 is "
            "outside this project's range (torch>=2.11)"
        )
        assert "--build-arg BASE_IMAGE=" in err


def test_the_script_runs_as_the_dockerfile_runs_it():
    done = run_check("--torch_version", "2.7.0a0+7c8ec84dab.nv25.03", "--version_only")
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "outside this project's range" in done.stderr
    assert run_check("--torch_version", "not a version", "--version_only").returncode == 1


def test_export_check_then_a_missing_cuda_provider_is_one_line(capsys):
    """Here onnxruntime is the CPU build: the export check passes, the provider check fails."""
    assert "CUDAExecutionProvider" not in ort.get_available_providers()
    status = container_check.main(["--require_cuda_provider"])
    out, err = capsys.readouterr()
    assert status == 1
    lines = out.splitlines()
    assert lines[0] == f"torch {torch.__version__}: within torch>=2.11"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "ONNX export of a tiny softplus model",
        "ONNX export of a tiny softmax model",
    ]
    assert all("matches PyTorch" in line for line in lines[1:])
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: onnxruntime {ort.__version__} has no CUDAExecutionProvider")
    assert "onnxruntime-gpu>=1.27 for CUDA 13" in err


@pytest.mark.parametrize(
    "ort_cuda, torch_cuda, ok",
    [("13.0", "13.2", True), ("12.8", "13.2", False), ("13.1", "12.9", False)],
)
def test_cuda_provider_must_match_torch_cuda_major(ort_cuda, torch_cuda, ok, monkeypatch):
    from onnxruntime.capi import build_and_package_info

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(build_and_package_info, "cuda_version", ort_cuda, raising=False)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    if ok:
        assert f"for CUDA {ort_cuda}" in container_check.check_cuda_provider()
    else:
        with pytest.raises(
            container_check.CheckFailed,
            match=f"built for CUDA {ort_cuda}, the image's torch for CUDA {torch_cuda}",
        ):
            container_check.check_cuda_provider()


def test_dockerfile_runs_the_check_with_flags_it_has():
    """A renamed flag would break ``docker build``, which no test machine can run."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/pytorch:\S+$", dockerfile, re.M)
    calls = re.findall(
        r"python -m llama3\.deploy\.container_check((?:[^\n]*\\\n)*[^\n]*)", dockerfile
    )
    assert len(calls) == 2
    parsed = [
        container_check.parse_args(shlex.split(c.replace("\\\n", " ").split("&&")[0]))
        for c in calls
    ]
    assert parsed[0].version_only and not parsed[1].version_only
    assert parsed[1].require_cuda_provider and parsed[1].require_tensorrt
    # the torch version is judged before anything is installed
    assert dockerfile.index("container_check") < dockerfile.index("onnxruntime-gpu==")


def test_tensorrt_extra_admits_exactly_the_supported_versions():
    (specifier,) = [
        r.specifier
        for r in map(Requirement, importlib.metadata.requires(container_check.PROJECT))
        if r.name == "tensorrt"
    ]
    for major in SUPPORTED_MAJORS:
        assert f"{major}.0.0" in specifier and f"{major}.99.99" in specifier
    assert f"{min(SUPPORTED_MAJORS) - 1}.99.99" not in specifier
    assert f"{max(SUPPORTED_MAJORS) + 1}.0.0" not in specifier
