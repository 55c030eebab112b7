# Distillery dashboard. Build: docker build -t distillery .
# Run:   docker run -p 127.0.0.1:8501:8501 -v distillery-data:/data distillery
# (inside the container the server listens on all interfaces so the port can be published; the -p
#  mapping above keeps it reachable from this machine only.)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DISTILLERY_HOME=/data \
    DISTILLERY_DB_URL=sqlite:////data/distillery.db \
    DISTILLERY_ARTIFACTS=/data/artifacts

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
RUN useradd --create-home distillery && mkdir -p /data && chown distillery /data
USER distillery
VOLUME /data
EXPOSE 8501
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health')"
CMD ["python", "-m", "streamlit", "run", "app.py", "--server.address", "0.0.0.0", "--server.port", "8501"]
