// Verification of a stored backup: the manifest's signature and format, then
// every artifact's size and stored digest and, given a key that opens it,
// its plaintext digest and format. Used by `opa-backup verify` directly and
// by the verifyBackup activity.
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../common/failures';
import { backupFolder, isBackupId } from '../common/layout';
import {
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  SIGNATURE_FILE,
  type ArtifactRecord,
  type Manifest,
} from '../common/manifest';
import type { Plan } from '../common/plan';
import {
  ArtifactDamagedError,
  ArtifactUnreadableError,
  decryptOptions,
  readAll,
  readArtifact,
  type StoredRecord,
} from './artifacts';
import type { DecryptOptions } from './crypto/age';
import { checkFormat, FormatError } from './formats';
import { loadVerifyKey, verifyManifest } from './signing';
import { ObjectNotFoundError, openNamedDestination, openReadStore, type BlobStore } from './storage';

/** Result of one check: ok, damaged (the bytes are not what was written) or unreadable (they cannot be read here). */
export type CheckOutcome = 'ok' | 'damaged' | 'unreadable';

export interface VerifyCheck {
  /** Object the check read, relative to the destination: "<plan>/<id>/redis/cache.rdb.gz.age". */
  object: string;
  check: 'manifest' | 'signature' | 'facts' | 'artifact';
  outcome: CheckOutcome;
  /** Kind of damage or reason, such as "digest mismatch" or "wrong identity". */
  reason?: string;
  message: string;
}

export interface VerifyReport {
  plan: string;
  backupId: string;
  destination: string;
  /** The worst outcome of all checks. */
  outcome: CheckOutcome;
  /** True when artifacts were decrypted and their plaintext and formats checked. */
  plaintextChecked: boolean;
  checks: VerifyCheck[];
}

/** A manifest that cannot be used: absent, not a manifest, of an unknown version, or failing its signature. */
export class ManifestError extends Error {
  constructor(
    readonly object: string,
    readonly outcome: 'damaged' | 'unreadable',
    readonly reason: string,
    detail: string,
  ) {
    super(`${object}: ${reason}: ${detail}`);
    this.name = 'ManifestError';
  }
}

/** Returns why an artifact key could leave its backup's folder, or undefined when it stays inside. */
function keyProblem(record: Pick<ArtifactRecord, 'key' | 'storedIn'>): string | undefined {
  const segments = record.key.split('/');
  if (record.key.startsWith('/') || segments.some((segment) => segment === '' || segment === '.' || segment === '..')) {
    return `key "${record.key}" leaves the backup's folder; keys are relative paths without empty, "." or ".." segments`;
  }
  if (record.storedIn !== undefined && !isBackupId(record.storedIn)) {
    return `storedIn "${record.storedIn}" is not a backup id of this plan`;
  }
  return undefined;
}

/**
 * Reads and checks manifest.json of a backup: present, JSON, of a known
 * format and version, and, when the plan names a signing key, signed by it.
 * Returns the manifest with each artifact's facts, decrypting the facts
 * object of an encrypted backup when `decrypt` is given.
 */
export async function loadManifest(
  store: BlobStore,
  plan: Plan,
  backupId: string,
  options: { decrypt?: DecryptOptions; checks?: VerifyCheck[] } = {},
): Promise<Manifest> {
  const folder = backupFolder(plan.name, backupId);
  const object = `${folder}/${MANIFEST_FILE}`;
  let text: Buffer;
  try {
    text = await readAll(await store.get(object));
  } catch (error) {
    if (error instanceof ObjectNotFoundError) {
      throw new ManifestError(object, 'unreadable', 'no such backup', `${store.description} has no manifest for backup ${backupId} of plan ${plan.name}; run "opa-backup list --plan FILE" for the ids`);
    }
    throw new ManifestError(object, 'unreadable', 'store error', (error as Error).message);
  }
  let manifest: Manifest;
  try {
    manifest = JSON.parse(text.toString('utf8')) as Manifest;
  } catch (error) {
    throw new ManifestError(object, 'damaged', 'invalid JSON', (error as Error).message);
  }
  if (manifest?.format !== MANIFEST_FORMAT) {
    throw new ManifestError(object, 'damaged', 'not a manifest', `format is ${JSON.stringify(manifest?.format)}, expected "${MANIFEST_FORMAT}"`);
  }
  if (manifest.version !== MANIFEST_VERSION) {
    throw new ManifestError(
      object,
      'unreadable',
      'unknown format version',
      `manifest format version ${JSON.stringify(manifest.version)}; this opa-backup reads version ${MANIFEST_VERSION}. Use the opa-backup release that wrote it`,
    );
  }
  if (manifest.backupId !== backupId || manifest.plan !== plan.name || !Array.isArray(manifest.artifacts)) {
    throw new ManifestError(object, 'damaged', 'wrong manifest', `it names backup ${manifest.backupId} of plan ${manifest.plan}`);
  }
  const digestProblem = (value: unknown): boolean => {
    const digest = value as { size?: unknown; sha256?: unknown } | undefined;
    return typeof digest?.size !== 'number' || typeof digest.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(digest.sha256);
  };
  manifest.artifacts.forEach((artifact, index) => {
    if (typeof artifact?.key !== 'string' || digestProblem(artifact) || digestProblem(artifact.plaintext)) {
      throw new ManifestError(object, 'damaged', 'invalid manifest', `artifacts[${index}] lacks a key, a size and SHA-256, or the plaintext size and SHA-256`);
    }
  });

  const verifyKey = loadVerifyKey(plan);
  const signatureObject = `${folder}/${SIGNATURE_FILE}`;
  if (verifyKey) {
    let signature: Buffer;
    try {
      signature = await readAll(await store.get(signatureObject));
    } catch (error) {
      if (error instanceof ObjectNotFoundError) {
        throw new ManifestError(signatureObject, 'damaged', 'signature missing', `the plan signs manifests with key ${verifyKey.keyId}, but ${SIGNATURE_FILE} is absent`);
      }
      throw error;
    }
    if (!verifyManifest(text, signature, verifyKey.publicKey)) {
      throw new ManifestError(
        object,
        'damaged',
        'signature mismatch',
        `the Ed25519 signature in ${SIGNATURE_FILE} does not match manifest.json and key ${verifyKey.keyId}: the manifest changed after it was signed, or another key signed it`,
      );
    }
    options.checks?.push({ object, check: 'signature', outcome: 'ok', message: `signed by Ed25519 key ${verifyKey.keyId}` });
  } else if (manifest.signing) {
    options.checks?.push({
      object,
      check: 'signature',
      outcome: 'ok',
      reason: 'not checked',
      message: `signed by key ${manifest.signing.keyId}, not checked: the plan names no signing.publicKeyFile`,
    });
  }

  if (manifest.facts) {
    const problem = keyProblem(manifest.facts);
    const factsObject = `${folder}/${manifest.facts.key}`;
    if (problem) throw new ManifestError(object, 'damaged', 'key outside the backup', problem);
    if (options.decrypt) {
      const { stream } = await readArtifact({ store, key: factsObject, record: manifest.facts, decrypt: options.decrypt });
      const facts = JSON.parse((await readAll(stream)).toString('utf8')) as Record<string, ArtifactRecord['facts']>;
      for (const artifact of manifest.artifacts) artifact.facts = facts[artifact.key];
      options.checks?.push({ object: factsObject, check: 'facts', outcome: 'ok', message: 'facts decrypt and match their digests' });
    } else {
      // Without a key the facts cannot be read, but their stored bytes can be checked.
      const { stream } = await readArtifact({ store, key: factsObject, record: manifest.facts });
      await readAll(stream);
      options.checks?.push({ object: factsObject, check: 'facts', outcome: 'ok', message: `${manifest.facts.size} bytes, stored SHA-256 matches; contents not checked without an identity` });
    }
  }
  return manifest;
}

function checkFromError(object: string, error: unknown): VerifyCheck {
  if (error instanceof ArtifactDamagedError) {
    return { object, check: 'artifact', outcome: 'damaged', reason: error.damage, message: error.message };
  }
  if (error instanceof ArtifactUnreadableError) {
    return { object, check: 'artifact', outcome: 'unreadable', reason: error.reason, message: error.message };
  }
  if (error instanceof FormatError) {
    return { object, check: 'artifact', outcome: 'damaged', reason: 'invalid format', message: `${object}: invalid format: ${error.message}` };
  }
  return { object, check: 'artifact', outcome: 'unreadable', reason: 'read error', message: `${object}: ${(error as Error).message}` };
}

/** Reads one artifact through its digests and, with plaintext, its format check. */
async function verifyArtifact(store: BlobStore, plan: Plan, folder: string, record: ArtifactRecord, decrypt: DecryptOptions | undefined): Promise<VerifyCheck> {
  const location = record.storedIn ? backupFolder(plan.name, record.storedIn) : folder;
  const object = `${location}/${record.key}`;
  const problem = keyProblem(record);
  if (problem) return { object: `${folder}/${record.key}`, check: 'artifact', outcome: 'damaged', reason: 'key outside the backup', message: problem };
  try {
    const { stream, decrypted } = await readArtifact({ store, key: object, record: record as StoredRecord, decrypt });
    if (!decrypted) {
      await readAll(stream);
      return { object, check: 'artifact', outcome: 'ok', message: `${record.size} bytes, stored SHA-256 matches; plaintext not checked without an identity` };
    }
    // The format check and the digest checks read the same stream; a digest
    // failure at its end is the more precise finding, so it wins.
    let streamError: unknown;
    stream.on('error', (error) => {
      streamError = error;
    });
    let summary: string | undefined;
    try {
      summary = await checkFormat(record, stream);
      if (!stream.readableEnded) await readAll(stream);
    } catch (error) {
      throw streamError ?? error;
    }
    if (streamError) throw streamError;
    return { object, check: 'artifact', outcome: 'ok', message: `${record.size} bytes, stored and plaintext SHA-256 match${summary ? `; ${summary}` : ''}` };
  } catch (error) {
    return checkFromError(object, error);
  }
}

const OUTCOME_RANK: Record<CheckOutcome, number> = { ok: 0, unreadable: 1, damaged: 2 };

/**
 * Verifies one backup of a plan. `identity` is a secret reference to an age
 * identity file; without it the plan's encryption.identity is used, and
 * without either only stored digests are checked. `destination` names the
 * one destination to check; without it each object is read from the first
 * destination that has it. Damage and unreadable objects are listed in the
 * report rather than thrown.
 */
export async function verifyStoredBackup(
  plan: Plan,
  backupId: string,
  options: { identity?: string; onCheck?: (check: VerifyCheck) => void; where?: string; destination?: string } = {},
): Promise<VerifyReport> {
  const store = options.destination ? openNamedDestination(plan, options.destination) : openReadStore(plan);
  const folder = backupFolder(plan.name, backupId);
  const checks: VerifyCheck[] = [];
  const report = (): VerifyReport => ({
    plan: plan.name,
    backupId,
    destination: store.description,
    outcome: checks.reduce<CheckOutcome>((worst, check) => (OUTCOME_RANK[check.outcome] > OUTCOME_RANK[worst] ? check.outcome : worst), 'ok'),
    plaintextChecked: decrypt !== undefined || plan.encryption.unencrypted === true,
    checks,
  });
  const add = (check: VerifyCheck): void => {
    checks.push(check);
    options.onCheck?.(check);
  };
  let decrypt: DecryptOptions | undefined;
  try {
    decrypt = plan.encryption.unencrypted ? undefined : decryptOptions(plan, options.identity, options.where);
  } catch (error) {
    add({ object: options.identity ?? plan.encryption.identity ?? 'encryption.passphrase', check: 'manifest', outcome: 'unreadable', reason: 'no key', message: (error as Error).message });
    return report();
  }

  let manifest: Manifest;
  const manifestChecks: VerifyCheck[] = [];
  try {
    manifest = await loadManifest(store, plan, backupId, { decrypt, checks: manifestChecks });
  } catch (error) {
    manifestChecks.forEach(add);
    if (error instanceof ManifestError) {
      add({ object: error.object, check: 'manifest', outcome: error.outcome, reason: error.reason, message: error.message });
    } else {
      add(checkFromError(`${folder}/${MANIFEST_FILE}`, error));
    }
    return report();
  }
  add({ object: `${folder}/${MANIFEST_FILE}`, check: 'manifest', outcome: 'ok', message: `${manifest.status} backup with ${manifest.artifacts.length} artifact${manifest.artifacts.length === 1 ? '' : 's'}` });
  manifestChecks.forEach(add);
  for (const record of manifest.artifacts) add(await verifyArtifact(store, plan, folder, record, decrypt));
  return report();
}

/** Activity: verifies a backup on a worker and returns the report; damage is a result, not a failure. */
export async function verifyBackup(input: { plan: Plan; backupId: string }): Promise<VerifyReport> {
  const context = Context.current();
  let checked = 0;
  const ticker = setInterval(() => context.heartbeat({ checked }), 5_000);
  try {
    return await verifyStoredBackup(input.plan, input.backupId, {
      onCheck: () => {
        checked++;
      },
    });
  } catch (error) {
    throw ApplicationFailure.create({
      type: error instanceof ApplicationFailure ? (error.type ?? FailureType.StorageFailed) : FailureType.StorageFailed,
      message: `verify of backup ${input.backupId} failed: ${(error as Error).message}`,
    });
  } finally {
    clearInterval(ticker);
  }
}
