# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target api    -t poisonaudit-api .     (no torch: the API never imports it)
#   docker build --target worker -t poisonaudit-worker .  (torch, runs the attacks)
# Dependencies come from pyproject.toml (one list); the API image drops the engine's.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    POISONAUDIT_DATA_DIR=/var/lib/poisonaudit
WORKDIR /srv
RUN useradd --create-home --uid 10001 app && mkdir -p /var/lib/poisonaudit && chown app /var/lib/poisonaudit
COPY pyproject.toml ./

FROM base AS api
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
engine = ('torch', 'torchvision', 'scikit-learn', 'mlxtend', 'safetensors', 'tqdm'); \
print('\n'.join(d for d in deps if not d.startswith(engine)))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY alembic.ini ./
COPY migrations/ migrations/
COPY attacks/ attacks/
COPY app/ app/
COPY worker/ worker/
USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=5 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

FROM base AS worker
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
COPY alembic.ini ./
COPY migrations/ migrations/
COPY attacks/ attacks/
COPY app/ app/
COPY worker/ worker/
USER app
# prefork with one child: Celery's hard time limit can kill a stuck job, and a lost child
# puts its message back (task_reject_on_worker_lost).
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu,cpu", "--concurrency=1", "--prefetch-multiplier=1", \
     "-n", "worker@%h", "--loglevel=INFO"]
