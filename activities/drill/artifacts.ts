// Reads a backup's manifest and artifacts for a drill, and keeps verified
// copies of the artifacts in the drill's scratch directory.
import { createHash } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { PassThrough, Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../../common/failures';
import { backupFolder, manifestKey } from '../../common/layout';
import type { ArtifactRecord, Manifest } from '../../common/manifest';
import type { Plan } from '../../common/plan';
import { ArtifactDamagedError, ArtifactUnreadableError, decryptOptions, readArtifact, type StoredRecord } from '../artifacts';
import type { BlobStore } from '../storage';
import { loadManifest } from '../verify';
import type { Scratch } from './scratch';

/** An artifact that cannot be read as the manifest recorded it: missing, damaged, or encrypted without a key. */
export class ArtifactDigestError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ArtifactDigestError';
  }
}

/** Failure type of a manifest that changed since the drill resolved it, or cannot be read. */
export const MANIFEST_CHANGED = 'ManifestChanged';

/** Returns the artifact's object key relative to the destination's prefix. A `storedIn` backup id points to the earlier backup whose folder contains the bytes. */
export function artifactObjectKey(plan: Plan, backupId: string, record: ArtifactRecord): string {
  return `${backupFolder(plan.name, record.storedIn ?? backupId)}/${record.key}`;
}

/**
 * Opens an artifact as a plaintext stream: decrypted and decompressed as the
 * manifest records, failing at its end unless the stored and plaintext sizes
 * and SHA-256 digests match. Every drill read goes through here.
 */
export async function openArtifact(store: BlobStore, plan: Plan, backupId: string, record: ArtifactRecord): Promise<Readable> {
  const key = artifactObjectKey(plan, backupId, record);
  let decrypt;
  try {
    decrypt = plan.encryption.unencrypted ? undefined : decryptOptions(plan);
  } catch (error) {
    throw new ArtifactDigestError(`${key}: cannot decrypt: ${(error as Error).message}`);
  }
  let opened;
  try {
    opened = await readArtifact({ store, key, record: record as StoredRecord, decrypt });
  } catch (error) {
    if (error instanceof ArtifactDamagedError) throw new ArtifactDigestError(error.message);
    throw error;
  }
  if (!opened.decrypted) {
    opened.stream.destroy();
    throw new ArtifactDigestError(`${key} is encrypted, and the plan gives no encryption.identity or passphrase to decrypt it for the drill`);
  }
  const output = new PassThrough();
  opened.stream.on('error', (error) => {
    output.destroy(error instanceof ArtifactDamagedError || error instanceof ArtifactUnreadableError ? new ArtifactDigestError(error.message) : error);
  });
  return opened.stream.pipe(output);
}

/**
 * Reads the backup's manifest, with each artifact's facts (decrypted for an
 * encrypted backup). With `expectedSha256`, a manifest that changed since the
 * drill started fails with MANIFEST_CHANGED, so each step checks the backup
 * the drill resolved.
 */
export async function readManifest(store: BlobStore, plan: Plan, backupId: string, expectedSha256?: string): Promise<{ manifest: Manifest; sha256: string }> {
  const key = manifestKey(plan.name, backupId);
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  const sha256 = createHash('sha256').update(Buffer.concat(chunks)).digest('hex');
  if (expectedSha256 !== undefined && sha256 !== expectedSha256) {
    throw ApplicationFailure.create({
      type: MANIFEST_CHANGED,
      nonRetryable: true,
      message: `${key} in ${store.description} changed while the drill ran (sha256 ${sha256}, expected ${expectedSha256}); start the drill again`,
    });
  }
  try {
    const decrypt = plan.encryption.unencrypted ? undefined : decryptOptions(plan);
    return { manifest: await loadManifest(store, plan, backupId, { decrypt }), sha256 };
  } catch (error) {
    throw ApplicationFailure.create({ type: MANIFEST_CHANGED, nonRetryable: true, message: `cannot read backup ${backupId} for the drill: ${(error as Error).message}` });
  }
}

/** Returns the manifest's record of `key`, or throws when the manifest lists no such artifact. */
export function findArtifact(manifest: Manifest, key: string): ArtifactRecord {
  const record = manifest.artifacts.find((artifact) => artifact.key === key);
  if (!record) {
    throw ApplicationFailure.create({
      type: MANIFEST_CHANGED,
      nonRetryable: true,
      message: `the manifest of backup ${manifest.backupId} lists no artifact ${key}`,
    });
  }
  if (!record.facts) {
    throw ApplicationFailure.create({
      type: FailureType.MissingSecret,
      nonRetryable: true,
      message: `the facts of ${key} in backup ${manifest.backupId} cannot be read: the backup is encrypted and the plan gives no encryption.identity or passphrase`,
    });
  }
  return record;
}

/** Returns where the verified copy of an artifact lives in the scratch directory. */
function localPath(scratch: Scratch, key: string): string {
  return path.join(scratch.directory, 'artifacts', ...key.split('/'));
}

/**
 * Returns the path of a verified copy of the artifact in the scratch
 * directory, copying it from the store first unless an earlier step on this
 * host already did. The copy is written under a temporary name and renamed
 * once its digest matched, and a marker file records the digest it matched.
 */
export async function localArtifact(
  scratch: Scratch,
  store: BlobStore,
  plan: Plan,
  backupId: string,
  record: ArtifactRecord,
  options: { signal?: AbortSignal; onBytes?: (bytes: number) => void } = {},
): Promise<string> {
  const file = localPath(scratch, record.key);
  const marker = `${file}.sha256`;
  if (existsSync(file) && existsSync(marker) && (await readFile(marker, 'utf8')).trim() === record.sha256) return file;

  await mkdir(path.dirname(file), { recursive: true });
  const temporary = `${file}.partial`;
  let bytes = 0;
  const counter = new Transform({
    transform(chunk: Buffer, _encoding, callback) {
      bytes += chunk.length;
      options.onBytes?.(bytes);
      callback(null, chunk);
    },
  });
  try {
    await pipeline(await openArtifact(store, plan, backupId, record), counter, createWriteStream(temporary, { mode: 0o600 }), {
      signal: options.signal,
    });
    await rename(temporary, file);
    await writeFile(marker, `${record.sha256}\n`);
  } catch (error) {
    await rm(temporary, { force: true });
    throw error;
  }
  return file;
}
