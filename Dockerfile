# conveyor: one image for every role (api, worker, scheduler, flower, migrate); docker-compose.yml
# picks the role with its command. Build: docker build -t conveyor .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so editing conveyor's code does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p domain worker scheduler api conveyor migrations examples \
    && pip install . \
    && pip uninstall -y conveyor

# The code (.dockerignore keeps out tests, benches, virtualenvs and local state).
COPY . .
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 conveyor \
    && mkdir -p /app/.conveyor /data \
    && chown conveyor /app/.conveyor /data

# Nothing here needs root (and Celery warns when a worker runs as root).
USER conveyor
ENV CONVEYOR_PIPELINES_DIR=/app/pipelines
EXPOSE 8000 5555
CMD ["conveyor", "api", "--host", "0.0.0.0", "--port", "8000"]
