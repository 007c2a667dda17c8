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
  /** Cluster sources: the master this dump read, from its CLUSTER NODES line just before the dump. */
  cluster?: RedisClusterNodeFacts;
}

/** One master of a Redis Cluster. */
export interface RedisClusterNodeFacts {
  /** The 40-character node id. */
  nodeId: string;
  /** host:port the dump connected to. */
  address: string;
  /** Hash slot ranges the master served, inclusive: [first, last]. */
  slots: Array<[number, number]>;
}

/** Result of checking a bundle's .signatures.json against the plan's verificationKey. */
export interface BundleSignatureFacts {
  /** True when the bundle contains a .signatures.json. */
  signed: boolean;
  /**
   * true: the JWT verifies with the plan's key and every file's digest matches.
   * false: it does not; `reason` gives the cause. "not checked": the plan sets no
   * verificationKey, the bundle is unsigned, or a data file is too large to check.
   */
  verified: true | false | 'not checked';
  /** JWT `alg` header, such as "RS256". */
  algorithm?: string;
  /** JWT `kid` header, or the deprecated `keyid` claim. */
  keyId?: string;
  /** Files the signature covers. */
  files?: number;
  reason?: string;
}

/** Facts of a bundle downloaded from a bundle service or bucket. */
export interface BundleFacts {
  url: string;
  /** ETag of the response (HTTP) or the object (S3), as the server sent it. */
  etag?: string;
  /** Size and SHA-256 of the bundle as it was served, before any encoding in the store. */
  bundleSize: number;
  bundleSha256: string;
  /** From the bundle's .manifest; absent when the bundle has none. */
  revision?: string;
  roots?: string[];
  regoVersion?: number;
  /** Files in the bundle, .signatures.json included. */
  files: number;
  signature: BundleSignatureFacts;
  /** True when the bundle equals the one of the previous backup, whose stored bytes this backup reuses (see `storedIn`). */
  unchanged?: boolean;
  /** How it was found unchanged: the server returned 304 to If-None-Match, or the SHA-256 was equal. */
  unchangedBy?: 'etag' | 'sha256';
}

/** Facts of a Git repository stored as a `git bundle`. */
export interface GitFacts {
  url: string;
  gitVersion: string;
  /** Commit that HEAD points to; absent when HEAD names a branch without commits. */
  head?: string;
  /** Branch HEAD names, such as "refs/heads/main". */
  defaultBranch?: string;
  /** Every ref of the repository and the object it points to (for annotated tags, the tag object). */
  refs: Array<{ name: string; object: string }>;
}

export type ArtifactKind =
  | 'opa-bundle'
  | 'postgres-dump'
  | 'postgres-globals'
  | 'redis-rdb'
  | 'redis-keys'
  | 'bundle'
  | 'git-bundle';

/** Size and SHA-256 (lowercase hex) of a byte stream. */
export interface Digest {
  size: number;
  sha256: string;
}

/**
 * Encoding of a step's output into the stored object: gzip first (for
 * formats that are not compressed already), then age. Recovery undoes them
 * in reverse: `age -d`, then `gunzip`.
 */
export interface ArtifactEncoding {
  compression?: 'gzip';
  encryption?: 'age';
}

export interface ArtifactRecord extends ArtifactEncoding {
  kind: ArtifactKind;
  source: string;
  /** Object key relative to the backup's folder, such as "redis/cache.rdb.gz.age". */
  key: string;
  /** Stored size in bytes. */
  size: number;
  /** SHA-256 of the stored bytes, lowercase hex. */
  sha256: string;
  /** Size and SHA-256 of the step's output before compression and encryption. */
  plaintext: Digest;
  /** Backup id of an earlier backup of the plan whose folder contains the bytes, for an artifact stored once and reused unchanged. */
  storedIn?: string;
  startedAt: string;
  completedAt: string;
  /** What the step recorded. Absent in manifest.json of an encrypted backup: the facts object contains it. */
  facts?: OpaFacts | PostgresFacts | RedisFacts | BundleFacts | GitFacts;
}

/**
 * The facts of an encrypted backup: an age-encrypted JSON object beside the
 * manifest that maps each artifact key to its facts. Facts contain probe
 * inputs and decisions, which may be personal data.
 */
export interface FactsObject extends ArtifactEncoding {
  key: string;
  size: number;
  sha256: string;
  plaintext: Digest;
}

/** Name of the facts object of an encrypted backup, before the encoding suffixes. */
export const FACTS_FILE = 'facts.json';

/** Key file name of the detached manifest signature: 64 raw Ed25519 signature bytes over manifest.json. */
export const SIGNATURE_FILE = 'manifest.json.sig';

export interface SourceFailure {
  /** The source kind, or "destination" for a replica that did not receive the backup. */
  kind: 'opa' | 'postgres' | 'redis' | 'bundle' | 'git' | 'destination';
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
  /** Encryption of the artifacts: to X25519 recipients (by fingerprint), with a passphrase, or not at all. */
  encryption: { mode: 'x25519'; recipients: string[] } | { mode: 'scrypt' } | { mode: 'none' };
  /** The key that signed manifest.json (see SIGNATURE_FILE); absent when the plan does not sign. */
  signing?: { algorithm: 'Ed25519'; keyId: string };
  /** Location and digests of an encrypted backup's facts object. */
  facts?: FactsObject;
  /** Plans with replicas: each destination and whether it contains every artifact and this manifest. */
  destinations?: DestinationState[];
  artifacts: ArtifactRecord[];
  failures: SourceFailure[];
}

/**
 * Status of a backup as seen from a destination that has its manifest.
 * The manifest is written only to destinations that contain every
 * artifact, so a backup that is partial only because another destination
 * missed it is complete here.
 */
export function statusInDestination(manifest: Pick<Manifest, 'status' | 'failures'>): Manifest['status'] {
  if (manifest.status === 'complete') return 'complete';
  const failures = Array.isArray(manifest.failures) ? manifest.failures : [];
  return failures.length > 0 && failures.every((failure) => failure?.kind === 'destination') ? 'complete' : 'partial';
}

export interface DestinationState {
  /** "primary" for the plan's destination, or a replica's name. */
  name: string;
  state: 'complete' | 'failed';
  error?: string;
}
