# The control server and the dashboard (one image, two commands). No GPU needed.
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
RUN pip install ".[postgres]"
EXPOSE 8765 8501
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/healthz')" || exit 1
CMD ["runsteer", "server", "--host", "0.0.0.0", "--port", "8765", "--db", "/data/runsteer.db", "--tokens-file", "/run/secrets/runsteer_tokens"]
