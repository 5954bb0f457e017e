# One image for every tileseg process (api, worker, beat, migrate); the command picks the role.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TILESEG_DATA_DIR=/var/lib/tileseg
WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY worker worker
COPY api api
COPY pipelines pipelines
COPY adapters adapters
COPY migrations migrations
RUN pip install -e . && useradd --system --home /var/lib/tileseg tileseg \
    && mkdir -p /var/lib/tileseg /data/inputs && chown tileseg /var/lib/tileseg
USER tileseg
EXPOSE 8000
CMD ["tileseg", "api", "--host", "0.0.0.0", "--port", "8000"]
