# syntax=docker/dockerfile:1

# Image of the opa-backup worker (the default command) and of the CLI, which
# is on PATH as `opa-backup`. Besides Node.js it contains the programs that
# activities run: opa, the PostgreSQL client tools, redis-cli, age and git.
#
#   docker build -t opa-backup .
#   docker run --rm -e TEMPORAL_ADDRESS=temporal.example:7233 opa-backup
#   docker run --rm opa-backup opa-backup --help

ARG NODE_IMAGE=node:20-bookworm-slim
ARG OPA_IMAGE=openpolicyagent/opa:1.22.4-static

# The static OPA build is a single binary at /opa with no shared libraries.
FROM ${OPA_IMAGE} AS opa

# Compiles the TypeScript sources with the full dependency set.
FROM ${NODE_IMAGE} AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY . .
RUN npx tsc -p .

# Installs the production dependencies only. The Temporal core bridge ships
# prebuilt binaries for glibc on x64 and arm64, so no compiler is needed.
FROM ${NODE_IMAGE} AS production-dependencies
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund \
 && npm cache clean --force

FROM ${NODE_IMAGE}

# pg_dump rejects a server whose major version is newer than its own, and
# Debian bookworm's postgresql-client is version 15. The client therefore
# comes from the PostgreSQL project's apt repository (apt.postgresql.org),
# whose signing key ships in Debian's postgresql-common package. Set this to
# the highest server major version that the worker backs up; the compose
# setup runs PostgreSQL 16.
ARG POSTGRES_CLIENT_MAJOR=16

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-common \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends \
      "postgresql-client-${POSTGRES_CLIENT_MAJOR}" \
      redis-tools \
      age \
      git \
 && rm -rf /var/lib/apt/lists/*

COPY --from=opa /opa /usr/local/bin/opa

ENV NODE_ENV=production
WORKDIR /app
COPY --from=production-dependencies /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY package.json ./
COPY bin ./bin
RUN ln -s /app/bin/opa-backup /usr/local/bin/opa-backup

# uid 1000 is "node", the unprivileged user of the official Node.js images.
# The numeric form lets Kubernetes verify runAsNonRoot.
USER 1000:1000

# The worker stops on SIGTERM and lets running activities finish for
# OPA_BACKUP_SHUTDOWN_GRACE (default 20s). Stop it with a longer timeout than
# that, such as `docker stop --time 30`.
CMD ["node", "dist/worker/main.js"]
