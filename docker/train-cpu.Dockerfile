# Training on CPU: the built-in run, or your own script using trainer.Steer.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
COPY pyproject.toml README.md ./
COPY protocols protocols
COPY control_server control_server
COPY trainer trainer
COPY agents agents
COPY dashboard dashboard
RUN pip install .
ENTRYPOINT ["runsteer", "train"]
