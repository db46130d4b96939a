# Optimove Relay image. One image for every process; docker-compose.yml (or the platform's
# Procfile) chooses the command: `relay db upgrade`, `relay web`, `relay worker`, `relay beat`,
# `relay flower`. There is deliberately no ENTRYPOINT.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Sources only (see .dockerignore); `pip install .` builds and installs the `relay` command.
COPY . /app
RUN pip install . \
    && useradd --create-home --uid 10001 --user-group relay

# Run as an unprivileged user; the installed code stays root-owned and read-only to it.
USER relay
WORKDIR /home/relay

EXPOSE 8000
CMD ["relay", "--help"]
