# AgentChat server image. Build: docker build -t agentchat .
# Run one process on the embedded defaults:   docker run -p 8080:8080 agentchat
# Several processes on Redis + S3/R2: see deploy/compose.yaml and the README.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    AGENTCHAT_HOST=0.0.0.0 AGENTCHAT_PORT=8080 AGENTCHAT_STORE=file:///var/lib/agentchat \
    AGENTCHAT_ALLOW_DEV_PAYMENTS_PUBLIC=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY agentchat ./agentchat
COPY protocol ./protocol
# Editable install: the server reads protocol/ (served at /api/v1/openapi.json) from the source tree.
RUN pip install -e ".[redis,s3,stripe]" \
 && useradd --system --uid 10001 --home /var/lib/agentchat --create-home agentchat

USER agentchat
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import os,urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('AGENTCHAT_PORT','8080'), timeout=2); sys.exit(0)"
# SIGTERM: sockets get 1001 going-away after queued messages are stored.
STOPSIGNAL SIGTERM
CMD ["agentchat", "serve"]
