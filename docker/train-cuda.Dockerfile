# Training on NVIDIA GPUs: PyTorch's CUDA runtime image; run with `--gpus all`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY protocols protocols
COPY control_server control_server
COPY trainer trainer
COPY agents agents
COPY dashboard dashboard
RUN pip install .
ENTRYPOINT ["runsteer", "train", "--device", "cuda"]
