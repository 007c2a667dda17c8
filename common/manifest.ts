// The backup manifest: one JSON document per backup, written after every
// artifact is stored. Its presence is the commit point: listing, restore and
// retention see a backup only once its manifest exists.

export const MANIFEST_FORMAT = 'opa-backup.manifest';
export const MANIFEST_VERSION = 1;
export const MANIFEST_FILE = 'manifest.json';

/** The decision a live OPA returned for one probe when the snapshot was taken. */
export interface RecordedProbe {
  path: string;
  input?: unknown;
  /** The input as JSON text, when the plan gave it so. */
  inputJson?: string;
  /** HTTP status of POST /v1/data/{path}. */
  status: number;
  /** The result exactly as OPA serialised it; absent when the document is undefined or on error. */
  resultJson?: string;
  /** True when OPA returned 200 without a result (the document is undefined). */
  undefinedResult?: boolean;
  /** OPA's error code ("internal_error") and the codes of its nested errors ("eval_conflict_error"). */
  errorCodes?: string[];
  errorMessage?: string;
}

/** A policy module of the snapshot and the bundle file that contains it. */
export interface PolicyRecord {
  /** Policy id on the live OPA (PUT /v1/policies/{id}). */
  id: string;
  /** Path of the module inside the bundle. */
  file: string;
  sha256: string;
}

/** Facts the snapshot of one OPA instance recorded. */
export interface OpaFacts {
  url: string;
  opaVersion?: string;
  /** Rego version the live OPA parsed its REST-managed policies with: 0 when run with --v0-compatible. */
  regoVersion: 0 | 1;
  policies: PolicyRecord[];
  /** Rule paths that were left out of data.json because rules, not base documents, produce them. */
  rulePaths: string[];
  dataSha256: string;
  dataBytes: number;
  /** Bundles the live OPA had activated, from data.system.bundles: name to revision. */
  loadedBundles: Record<string, { revision?: string; etag?: string }>;
  probes: RecordedProbe[];
  bundleRevision: string;
}

/** Facts of a PostgreSQL dump, from the snapshot pg_dump read. */
export interface PostgresFacts {
  database?: string;
  serverVersion: string;
  pgDumpVersion: string;
  /** Rows of every plain table and leaf partition, counted in the dump's snapshot. */
  tables?: Array<{ schema: string; name: string; rows: number }>;
}

/** Facts of a Redis dump. */
export interface RedisFacts {
  mode: 'rdb' | 'keys';
  redisVersion: string;
  /** Database index to key count, from INFO keyspace when the dump started. */
  keyspace: Record<string, number>;
  /** Keys mode: database index to records written. */
  records?: Record<string, number>;
  /** Keys mode: keys that expired between SCAN and DUMP. */
  expiredSkipped?: number;
}

export type ArtifactKind = 'opa-bundle' | 'postgres-dump' | 'postgres-globals' | 'redis-rdb' | 'redis-keys';

export interface ArtifactRecord {
  kind: ArtifactKind;
  source: string;
  /** Object key relative to the backup's folder, such as "opa/edge-1.tar.gz". */
  key: string;
  /** Stored size in bytes. */
  size: number;
  /** SHA-256 of the stored bytes, lowercase hex. */
  sha256: string;
  startedAt: string;
  completedAt: string;
  facts: OpaFacts | PostgresFacts | RedisFacts;
}

export interface SourceFailure {
  kind: 'opa' | 'postgres' | 'redis';
  source: string;
  /** Failure type, such as "Unauthorized" or "SourceUnavailable". */
  type: string;
  message: string;
  attempts?: number;
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  backupId: string;
  plan: string;
  /** "partial" when at least one source failed; the failures name which and why. */
  status: 'complete' | 'partial';
  startedAt: string;
  completedAt: string;
  workflow: { workflowId: string; runId: string };
  artifacts: ArtifactRecord[];
  failures: SourceFailure[];
}
