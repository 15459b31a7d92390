# Training and deployment image: an NGC PyTorch container (PyTorch, Triton, TensorRT, trtexec)
# plus the few libraries it lacks, checked before the build succeeds.
#   docker build -t llama3_pyt .
#   docker build -t llama3_pyt --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:YY.MM-py3 .
#   docker run -it --rm --gpus all --shm-size=32gb -v "$PWD:/workspace" llama3_pyt
#
# BASE_IMAGE must carry a torch within pyproject.toml's range (torch>=2.11, PEP 440: the
# 2.11.0a0 snapshots of 26.02/26.03 precede 2.11) and TensorRT 10.x or 11.x. 26.05 ships torch
# 2.12.0a0 on CUDA 13.2. ORT_GPU_VERSION must match the image's CUDA major: onnxruntime-gpu wheels
# on PyPI are built for CUDA 12 up to 1.26 and for CUDA 13 from 1.27 (x86_64 and Python 3.12 here).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.05-py3
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG ORT_GPU_VERSION=1.31.1
# Installed only where the image lacks them: an image's own onnx/onnxscript are kept, as its
# /etc/pip/constraint.txt pins them.
ARG ONNX_VERSION=1.23.2
ARG ONNXSCRIPT_VERSION=0.7.2
ARG SENTENCEPIECE_VERSION=0.2.3
ARG ZSTANDARD_VERSION=0.25.0
ARG TQDM_VERSION=4.70.1

# NGC images keep trtexec beside the TensorRT samples.
ENV PATH=/usr/src/tensorrt/bin:${PATH}
RUN command -v trtexec >/dev/null || { echo "error: trtexec is not on PATH in ${BASE_IMAGE}:" \
    "choose an NGC PyTorch image with TensorRT" >&2; exit 1; }

# --no-deps keeps the image's torch; first judge that torch against our range.
COPY pyproject.toml README.md /opt/llama3/
COPY llama3 /opt/llama3/llama3
RUN pip install --no-cache-dir --no-deps /opt/llama3 \
    && python -m llama3.deploy.container_check --image "${BASE_IMAGE}" --version_only

# Keep the container's torch, triton and tensorrt; add only what it does not ship.
RUN missing=""; \
    for spec in "onnx==${ONNX_VERSION}" "onnxscript==${ONNXSCRIPT_VERSION}" \
                "sentencepiece==${SENTENCEPIECE_VERSION}" "zstandard==${ZSTANDARD_VERSION}" \
                "tqdm==${TQDM_VERSION}"; do \
        pip show -q "${spec%%==*}" 2>/dev/null || missing="${missing} ${spec}"; \
    done; \
    if pip show -q onnxruntime 2>/dev/null; then pip uninstall -y onnxruntime; fi; \
    pip install --no-cache-dir ${missing} "onnxruntime-gpu==${ORT_GPU_VERSION}"

# Import the model, export tiny models to ONNX and run them in ONNX Runtime; require the CUDA
# provider (for torch's CUDA major) and a supported TensorRT, so a broken image fails here.
RUN python -m llama3.deploy.container_check --image "${BASE_IMAGE}" \
        --require_cuda_provider --require_tensorrt

WORKDIR /workspace
