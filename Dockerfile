# Training and deployment image: an NGC PyTorch container (PyTorch, Triton, TensorRT, trtexec)
# plus the few libraries it lacks.
#   docker build -t llama3_pyt .
#   docker run -it --rm --gpus all --shm-size=32gb -v "$PWD:/workspace" llama3_pyt
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.03-py3
FROM ${BASE_IMAGE}

# NGC images keep trtexec beside the TensorRT samples.
ENV PATH=/usr/src/tensorrt/bin:${PATH}
RUN command -v trtexec >/dev/null \
    || { echo "trtexec is not on PATH in ${BASE_IMAGE}: choose an NGC PyTorch image with TensorRT" >&2; exit 1; }

# Keep the container's torch, triton and tensorrt; add only what it does not ship.
COPY pyproject.toml README.md /opt/llama3/
COPY llama3 /opt/llama3/llama3
RUN pip install --no-cache-dir sentencepiece zstandard onnx onnxscript onnxruntime-gpu tqdm \
    && pip install --no-cache-dir --no-deps /opt/llama3 \
    && python -c "import llama3, sentencepiece, zstandard, onnx, onnxruntime, tensorrt"

WORKDIR /workspace
