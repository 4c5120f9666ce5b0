# syntax=docker/dockerfile:1.7
# Vigil: one image for every component (ingest, worker, serve-model, gateway, migrations); ENTRYPOINT vigil.
#
# Build (BuildKit / docker buildx); the training data set is not in the repo, so it comes in as the named
# build context "data" (a folder holding the PhysioNet 2019 archive):
#   docker buildx build -t vigil:0.1.0 \
#     --build-context data=/path/to/physionet2019 \
#     --build-arg VIGIL_TRAIN_DATA=/data/training_setA.tar.gz .
# Without a model baked in (store mounted from a PVC instead, chart value model.store.source=existingClaim):
#   docker buildx build -t vigil:0.1.0 --build-arg VIGIL_BAKE_MODEL=0 .
# See docs/operations.md, "Image".

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The ingest service's native fast path (Rust, services/ingest/native) is compiled in the stage "native";
# --build-arg VIGIL_NATIVE=0 leaves it out (the ingest service then runs its pure-Python path). The Rust
# image must have the C library of PYTHON_IMAGE (both Debian bookworm here).
ARG RUST_IMAGE=rust:1-slim-bookworm

# The data set, replaced by `--build-context data=<folder>`; empty by default.
FROM scratch AS data

# --- native: the ingest service's fast path, an abi3 extension module (no Python needed to build it) ---
FROM ${RUST_IMAGE} AS native
ARG VIGIL_NATIVE=1
WORKDIR /src
COPY services/ingest/native ./
RUN mkdir -p /out \
 && if [ "$VIGIL_NATIVE" = 1 ]; then \
      cargo build --release --locked \
      && cp target/release/lib_native.so /out/_native.abi3.so \
      && rm -rf target; \
    else \
      echo "native: left out (VIGIL_NATIVE=$VIGIL_NATIVE): the ingest service runs its Python path"; \
    fi

# --- builder: wheels for the project and its dependencies, installed into a venv ----------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vigil ./vigil
COPY services ./services
# _native.abi3.so when built (an empty folder otherwise); the wheel takes it as an artifact (pyproject.toml).
COPY --from=native /out/ ./services/ingest/vigil_ingest/
# DL3013: `vigil` is installed only from the wheels built on the line before (--no-index).
# hadolint ignore=DL3013
RUN pip wheel --wheel-dir /wheels . \
 && pip install --no-index --find-links /wheels vigil \
 && rm -rf /wheels \
 && vigil --help >/dev/null \
 && python -c "from vigil_ingest import native; print('ingest fast path:', 'native' if native.load() else 'Python')"

# --- model: train the XGBoost model into a BentoML store at /opt/vigil/bentoml ------------------------
FROM builder AS model
ARG VIGIL_BAKE_MODEL=1
ARG VIGIL_TRAIN_DATA=/data/training_setA.tar.gz
# Extra `vigil train` arguments, e.g. "--quick" for a fast smoke-test image.
ARG VIGIL_TRAIN_ARGS=""
ENV BENTOML_HOME=/opt/vigil/bentoml \
    BENTOML_DO_NOT_TRACK=true
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=SC2086
RUN --mount=type=bind,from=data,target=/data \
    mkdir -p /opt/vigil/bentoml/models \
 && if [ "$VIGIL_BAKE_MODEL" = 1 ]; then \
      test -e "$VIGIL_TRAIN_DATA" || { echo "no data set at $VIGIL_TRAIN_DATA: pass --build-context data=<folder> or --build-arg VIGIL_BAKE_MODEL=0" >&2; exit 1; }; \
      VIGIL_DATASET="$VIGIL_TRAIN_DATA" vigil train --data "$VIGIL_TRAIN_DATA" $VIGIL_TRAIN_ARGS; \
      test -n "$(ls -A /opt/vigil/bentoml/models)"; \
    fi

# --- runtime: slim, non-root, read-only-root friendly ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VIGIL_VERSION=0.1.0
LABEL org.opencontainers.image.title="vigil" \
      org.opencontainers.image.version="${VIGIL_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="Vigil: device readings to FHIR Observations, XGBoost risk, FHIR RiskAssessments"
RUN groupadd --system --gid 10001 vigil \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin vigil
COPY --from=builder /opt/venv /opt/venv
COPY --from=model --chown=10001:10001 /opt/vigil/bentoml /opt/vigil/bentoml
# Writable paths (emptyDir in Kubernetes, tmpfs with `docker run --read-only`): /tmp and BENTOML_HOME.
# The chart copies the baked store /opt/vigil/bentoml into a writable BENTOML_HOME (/var/lib/bentoml).
RUN mkdir -p /var/lib/bentoml && chown 10001:10001 /var/lib/bentoml
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BENTOML_HOME=/opt/vigil/bentoml \
    BENTOML_DO_NOT_TRACK=true \
    VIGIL_GRPC_LISTEN=0.0.0.0:50051 \
    VIGIL_HTTP_HOST=0.0.0.0 \
    VIGIL_HTTP_PORT=8080
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 8080 3000
ENTRYPOINT ["vigil"]
CMD ["--help"]
