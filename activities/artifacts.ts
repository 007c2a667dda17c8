// Artifact encoding. On the way into the blob store, a step's output is
// hashed, gzip-compressed when its format is not compressed already, then
// encrypted with age, and hashed again as stored. On the way out for verify
// and restore, the same stages run in reverse and both digests are checked.
import { createHash } from 'node:crypto';
import { createGunzip, createGzip } from 'node:zlib';
import { pipeline, Readable, Transform, type TransformCallback } from 'node:stream';
import type { ArtifactEncoding, ArtifactKind, Digest } from '../common/manifest';
import type { Plan } from '../common/plan';
import {
  AgeError,
  createDecryptStream,
  createEncryptStream,
  DamagedPayloadError,
  HeaderMacMismatchError,
  NoIdentityMatchError,
  parseIdentity,
  parseRecipient,
  WrongPassphraseError,
  type DecryptOptions,
  type EncryptOptions,
} from './crypto/age';
import { DigestStream } from './digest';
import { resolveSecret } from './secrets';
import { ObjectNotFoundError, openWriteStore, ReplicatedBlobStore, type BlobStore, type PutOptions, type StoredObject } from './storage';

/**
 * gzip level when the plan sets none. On an RDB of 1 million keys (bench/encoding.ts,
 * BENCHMARKS.md) level 1 ran at 118 MB/s and zlib's default of 6 at
 * 35 MB/s, slower than the dump itself, for 11% less output.
 */
export const DEFAULT_COMPRESSION_LEVEL = 1;

/** Artifact kinds whose format is compressed already; gzip would only cost time. */
const COMPRESSED_KINDS: ReadonlySet<string> = new Set(['opa-bundle', 'postgres-dump', 'bundle', 'git-bundle']);

/** Result of a put through an ArtifactStore: the stored object and the step's output before encoding. */
export interface EncodedObject extends ArtifactEncoding, Digest {
  /** Full key of the stored object, with ".gz" and ".age" appended as the encoding adds them. */
  key: string;
  plaintext: Digest;
  /** Replicated plans: destinations that failed to store the object, with their errors. */
  failedDestinations?: Record<string, string>;
}

/** Returns the age options for a plan's encryption settings, or undefined for a plan that stores plaintext. */
export function encryptOptions(plan: Plan): EncryptOptions | undefined {
  const { encryption } = plan;
  if (encryption.unencrypted) return undefined;
  if (encryption.passphrase) return { passphrase: resolveSecret(encryption.passphrase, 'encryption.passphrase') };
  return { recipients: (encryption.recipients ?? []).map((recipient) => parseRecipient(recipient)) };
}

/**
 * Returns the age options to decrypt a plan's artifacts: the identity
 * reference given on the command line, or else the plan's
 * encryption.identity, or the passphrase. Returns undefined when neither is
 * available, so callers can check stored digests only.
 */
export function decryptOptions(plan: Plan, identityReference?: string, where?: string): DecryptOptions | undefined {
  const reference = identityReference ?? plan.encryption.identity;
  if (reference) {
    const field = identityReference ? '--identity' : 'encryption.identity';
    const text = resolveSecret(reference, field, where);
    try {
      return { identities: parseIdentity(text) };
    } catch (error) {
      throw new Error(`${field} ${reference}: ${(error as Error).message}; give the age identity file (AGE-SECRET-KEY-1…), not the recipient`);
    }
  }
  if (plan.encryption.passphrase) return { passphrase: resolveSecret(plan.encryption.passphrase, 'encryption.passphrase', where) };
  return undefined;
}

/** Returns the manifest's summary of a plan's encryption: mode and recipient fingerprints, never keys. */
export function encryptionSummary(plan: Plan): { mode: 'x25519'; recipients: string[] } | { mode: 'scrypt' } | { mode: 'none' } {
  if (plan.encryption.unencrypted) return { mode: 'none' };
  if (plan.encryption.passphrase) return { mode: 'scrypt' };
  return { mode: 'x25519', recipients: plan.encryption.recipients ?? [] };
}

/**
 * A BlobStore whose put encodes: compression (when enabled) and age
 * encryption (when configured), with the stored key extended by ".gz" and
 * ".age". Reads, listings and deletes go to the underlying store unchanged.
 * After a put, encoded(key) returns the digests of both ends.
 */
export class ArtifactStore implements BlobStore {
  private readonly results = new Map<string, EncodedObject>();

  constructor(
    readonly inner: BlobStore,
    private readonly encoding: { gzipLevel?: number; encrypt?: EncryptOptions },
  ) {}

  get description(): string {
    return this.inner.description;
  }

  /** Key under which a put of `key` stores its object. */
  storedKey(key: string): string {
    return `${key}${this.encoding.gzipLevel !== undefined ? '.gz' : ''}${this.encoding.encrypt ? '.age' : ''}`;
  }

  async put(key: string, body: Readable, options?: PutOptions): Promise<{ size: number }> {
    // The dumps stream through a DigestStream already; its digest is the plaintext's, so it is not computed twice.
    const plain = body instanceof DigestStream ? body : new DigestStream();
    const stored = new DigestStream();
    const stages: NodeJS.ReadWriteStream[] = plain === body ? [] : [plain];
    if (this.encoding.gzipLevel !== undefined) stages.push(createGzip({ level: this.encoding.gzipLevel }));
    if (this.encoding.encrypt) stages.push(createEncryptStream(this.encoding.encrypt));
    // A failure anywhere, in the source or in an encoder, destroys `stored`,
    // so the put below fails and leaves no object behind.
    pipeline([body, ...stages, stored], () => undefined);
    const storedKey = this.storedKey(key);
    const { size } = await this.inner.put(storedKey, stored, options);
    this.results.set(key, {
      key: storedKey,
      size,
      sha256: stored.digest(),
      plaintext: { size: plain.bytes, sha256: plain.digest() },
      ...(this.encoding.gzipLevel !== undefined ? { compression: 'gzip' as const } : {}),
      ...(this.encoding.encrypt ? { encryption: 'age' as const } : {}),
      ...(this.inner instanceof ReplicatedBlobStore && Object.keys(this.inner.failedDestinations(storedKey)).length > 0
        ? { failedDestinations: this.inner.failedDestinations(storedKey) }
        : {}),
    });
    return { size };
  }

  /** Returns what the put of `key` stored; undefined before that put completed. */
  encoded(key: string): EncodedObject | undefined {
    return this.results.get(key);
  }

  get(key: string): Promise<Readable> {
    return this.inner.get(key);
  }

  stat(key: string): Promise<StoredObject | undefined> {
    return this.inner.stat(key);
  }

  list(prefix: string): AsyncIterable<StoredObject> {
    return this.inner.list(prefix);
  }

  listFolders(prefix: string): AsyncIterable<string> {
    return this.inner.listFolders(prefix);
  }

  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }
}

/** Opens the plan's destination for storing artifacts of `kind`, encoded with the plan's compression and encryption settings. */
export function openArtifactStore(plan: Plan, kind: ArtifactKind | 'facts'): ArtifactStore {
  const level = plan.compression?.level ?? DEFAULT_COMPRESSION_LEVEL;
  const gzipLevel = level > 0 && !COMPRESSED_KINDS.has(kind) ? level : undefined;
  return new ArtifactStore(openWriteStore(plan), { gzipLevel, encrypt: encryptOptions(plan) });
}

/** The kind of damage found in a stored object. */
export type DamageKind =
  | 'missing'
  | 'size mismatch'
  | 'truncated'
  | 'digest mismatch'
  | 'damaged encryption'
  | 'damaged compression'
  | 'plaintext digest mismatch'
  | 'invalid format';

/** A stored object that is not what the manifest recorded. */
export class ArtifactDamagedError extends Error {
  constructor(
    readonly key: string,
    readonly damage: DamageKind,
    detail: string,
  ) {
    super(`${key}: ${damage}: ${detail}`);
    this.name = 'ArtifactDamagedError';
  }
}

/** A stored object that may be intact but cannot be decrypted with the keys given. */
export class ArtifactUnreadableError extends Error {
  constructor(
    readonly key: string,
    readonly reason: 'no identity' | 'wrong identity' | 'wrong passphrase',
    detail: string,
  ) {
    super(`${key}: cannot decrypt (${reason}): ${detail}`);
    this.name = 'ArtifactUnreadableError';
  }
}

/** A pass-through that fails at the end when the bytes differ in size or SHA-256 from `expected`. */
class ExpectDigest extends Transform {
  private readonly hash = createHash('sha256');
  private bytes = 0;

  constructor(
    private readonly expected: Digest,
    private readonly describe: (actual: Digest) => Error,
  ) {
    super({ highWaterMark: 1 << 20 });
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    callback(null, chunk);
  }

  override _flush(callback: TransformCallback): void {
    const actual = { size: this.bytes, sha256: this.hash.digest('hex') };
    if (actual.size !== this.expected.size || actual.sha256 !== this.expected.sha256) callback(this.describe(actual));
    else callback();
  }
}

/** Maps an age failure to what it means for the artifact: damaged bytes, or keys that do not fit. */
function ageFailure(key: string, error: Error): Error {
  if (error instanceof NoIdentityMatchError) {
    return new ArtifactUnreadableError(key, 'wrong identity', `${error.message}; pass the identity of one of the plan's recipients`);
  }
  if (error instanceof WrongPassphraseError) return new ArtifactUnreadableError(key, 'wrong passphrase', error.message);
  if (error instanceof HeaderMacMismatchError || error instanceof DamagedPayloadError || error instanceof AgeError) {
    return new ArtifactDamagedError(key, 'damaged encryption', error.message);
  }
  return error;
}

/** A manifest record to read: an artifact or the facts object. */
export interface StoredRecord extends ArtifactEncoding, Digest {
  key: string;
  plaintext: Digest;
}

/**
 * Opens a stored object and returns its plaintext as a stream. The stream
 * fails with ArtifactDamagedError when the stored bytes or the plaintext
 * differ from `record`, and with ArtifactUnreadableError when the keys in
 * `decrypt` do not open it. It emits plaintext before the final checks, so a
 * consumer must discard what it read when the stream fails. Without
 * `decrypt`, an encrypted object is only checked against its stored digest
 * and the returned stream is empty.
 */
export async function readArtifact(options: {
  store: BlobStore;
  /** Full key of the stored object. */
  key: string;
  record: StoredRecord;
  decrypt?: DecryptOptions;
}): Promise<{ stream: Readable; decrypted: boolean }> {
  const { store, key, record } = options;
  let body: Readable;
  try {
    body = await store.get(key);
  } catch (error) {
    if (error instanceof ObjectNotFoundError) {
      throw new ArtifactDamagedError(key, 'missing', `the manifest lists it, but ${store.description} has no such object`);
    }
    throw error;
  }
  const checkStored = new ExpectDigest(record, (actual) => {
    if (actual.size < record.size) {
      return new ArtifactDamagedError(key, 'truncated', `${actual.size} bytes stored, the manifest recorded ${record.size}`);
    }
    if (actual.size !== record.size) {
      return new ArtifactDamagedError(key, 'size mismatch', `${actual.size} bytes stored, the manifest recorded ${record.size}`);
    }
    return new ArtifactDamagedError(key, 'digest mismatch', `stored SHA-256 is ${actual.sha256}, the manifest recorded ${record.sha256}`);
  });
  const stages: NodeJS.ReadWriteStream[] = [checkStored];
  let decrypted = true;
  if (record.encryption === 'age') {
    if (!options.decrypt) {
      decrypted = false;
    } else {
      const decryptStream = createDecryptStream(options.decrypt);
      stages.push(decryptStream);
    }
  }
  if (decrypted && record.compression === 'gzip') stages.push(createGunzip());
  if (decrypted) {
    stages.push(
      new ExpectDigest(
        record.plaintext,
        (actual) =>
          new ArtifactDamagedError(
            key,
            'plaintext digest mismatch',
            `the decoded content has ${actual.size} bytes and SHA-256 ${actual.sha256}, the manifest recorded ${record.plaintext.size} bytes and ${record.plaintext.sha256}`,
          ),
      ),
    );
  }
  const output = new Transform({
    transform(chunk, _encoding, callback) {
      callback(null, decrypted ? chunk : undefined);
    },
  });
  // `output` stays out of the pipeline: pipeline would destroy it with the
  // raw error (an age or zlib error) before the callback could name the
  // object and the kind of damage.
  const last = stages[stages.length - 1] as unknown as Readable;
  pipeline([body, ...stages], (error) => {
    if (error) output.destroy(describeReadError(key, error));
  });
  last.pipe(output);
  return { stream: output, decrypted };
}

function describeReadError(key: string, error: Error): Error {
  if (error instanceof ArtifactDamagedError || error instanceof ArtifactUnreadableError) return error;
  if (error instanceof AgeError) return ageFailure(key, error);
  if ((error as NodeJS.ErrnoException).code?.startsWith('Z_')) {
    return new ArtifactDamagedError(key, 'damaged compression', error.message);
  }
  return error;
}

/** Reads a whole stream; for small objects such as manifests and facts. */
export async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

