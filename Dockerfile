# The MIRAGE platform on the Ray 2.60 GPU image: one image for Ray head/workers, the RayJob
# submitter, Serve and the MLflow server (PostgreSQL and S3 clients and the basic-auth app included).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/mirage
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 platform ./platform
COPY --chown=1000:100 jobs ./jobs
RUN pip install --no-cache-dir -e . psycopg2-binary boto3 "mlflow[auth]"

USER 1000:100
ENV PYTHONUNBUFFERED=1
