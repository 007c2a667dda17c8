// Activities of backupWorkflow: load the plan, snapshot each OPA source into
// the blob store, and seal the backup by writing its manifest.
import { mkdtemp, rm } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../common/failures';
import { backupFolder, manifestKey, opaArtifactKey } from '../common/layout';
import {
  FACTS_FILE,
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  SIGNATURE_FILE,
  type ArtifactRecord,
  type Manifest,
  type OpaFacts,
} from '../common/manifest';
import type { Plan } from '../common/plan';
import type {
  ArtifactReference,
  BackupWorkflowInput,
  SealBackupInput,
  SealBackupResult,
  SnapshotOpaInput,
} from '../common/workflow-types';
import { DigestStream } from './digest';
import { connectOpa } from './opa/client';
import { packBundle } from './opa/bundle';
import { policyFiles, snapshotOpa } from './opa/snapshot';
import { checkPlanReferences, loadPlanFile, PlanError, relativePathIssues, validatePlan } from './plan-loader';
import { openBlobStore, openDestinations, openWriteStore, type BlobStore } from './storage';
import { ArtifactStore, encryptionSummary, openArtifactStore } from './artifacts';
import { loadSigningKey, signManifest } from './signing';
import { activityLogger } from './logging';
import { recordSealedBackup } from './metrics';

/** gzip level of OPA bundles: 1 is fastest. Bundles of base documents compress well even at 1. */
const BUNDLE_GZIP_LEVEL = 1;

function invalidPlan(error: PlanError): ApplicationFailure {
  return ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message: error.message });
}

/** Validates the workflow's plan on the worker and checks that its secret references resolve here. */
export async function loadPlan(input: BackupWorkflowInput): Promise<Plan> {
  let plan: Plan;
  try {
    if (input.plan && input.planFile) {
      throw new PlanError('workflow input', [{ path: '', message: 'set either "plan" or "planFile", not both' }]);
    }
    if (input.planFile) {
      if (!path.isAbsolute(input.planFile)) {
        throw new PlanError('workflow input', [
          { path: 'planFile', message: `"${input.planFile}" must be an absolute path that the worker can read` },
        ]);
      }
      plan = loadPlanFile(input.planFile);
    } else if (input.plan) {
      plan = validatePlan(input.plan, 'workflow input plan');
      const relative = relativePathIssues(plan);
      if (relative.length > 0) throw new PlanError('workflow input plan', relative);
    } else {
      throw new PlanError('workflow input', [
        { path: '', message: 'missing "plan" (the plan document) or "planFile" (an absolute path); for example {"planFile": "/etc/opa-backup/plan.yaml"}' },
      ]);
    }
  } catch (error) {
    if (error instanceof PlanError) throw invalidPlan(error);
    throw error;
  }
  const secretIssues = checkPlanReferences(plan);
  if (secretIssues.length > 0) {
    throw ApplicationFailure.create({
      type: FailureType.MissingSecret,
      nonRetryable: true,
      message: new PlanError(input.planFile ?? `plan ${plan.name}`, secretIssues).message,
    });
  }
  return plan;
}

/**
 * Snapshots one OPA source into a bundle in the blob store. A retry starts
 * from the beginning and overwrites the same keys. The blob store never shows
 * a half-written object, and nothing counts as a backup before the manifest.
 */
export async function snapshotOpaSource(input: SnapshotOpaInput): Promise<ArtifactReference> {
  const context = Context.current();
  const { plan, backupId } = input;
  const index = (plan.sources.opa ?? []).findIndex((source) => source.name === input.source);
  if (index < 0) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no OPA source named "${input.source}"`,
    });
  }
  const source = plan.sources.opa![index];
  const log = activityLogger({ backupId, source: source.name, plan: plan.name });
  const startedAt = new Date().toISOString();
  log.info({ url: source.url, attempt: context.info.attempt }, 'OPA snapshot started');

  const store = openArtifactStore(plan, 'opa-bundle');
  const folder = backupFolder(plan.name, backupId);
  const key = opaArtifactKey(source.name);
  const workDirectory = await mkdtemp(path.join(tmpdir(), `opa-backup-${source.name}-`));
  const signal = context.cancellationSignal;
  let uploadedBytes = 0;
  let phase = 'policies';
  let dataBytes = 0;
  const heartbeat = (): void => context.heartbeat({ phase, dataBytes, uploadedBytes });
  const stopHeartbeat = heartbeatTimer(() => ({ phase, dataBytes, uploadedBytes }));

  try {
    const connection = connectOpa(source, index);
    const snapshot = await snapshotOpa(connection, {
      probes: source.probes ?? [],
      dataFile: path.join(workDirectory, 'data.json'),
      signal,
      onProgress: (progress) => {
        phase = progress.phase;
        dataBytes = progress.dataBytes;
        heartbeat();
      },
    });

    phase = 'upload';
    heartbeat();
    const policies = policyFiles(snapshot.modules);
    const revision = `${plan.name}/${backupId}/${source.name}`;
    const bundle = packBundle({
      revision,
      regoVersion: snapshot.regoVersion,
      modules: snapshot.modules,
      policies,
      dataFile: path.join(workDirectory, 'data.json'),
      gzipLevel: BUNDLE_GZIP_LEVEL,
      metadata: {
        opa_backup: {
          plan: plan.name,
          backup_id: backupId,
          source: source.name,
          policy_ids: Object.fromEntries(policies.map((policy) => [policy.file, policy.id])),
        },
      },
    });
    const hasher = new DigestStream();
    bundle.stream.on('error', (error) => hasher.destroy(error));
    bundle.stream.pipe(hasher);
    const { size } = await store.put(`${folder}/${key}`, hasher, {
      contentType: 'application/gzip',
      signal,
      onProgress: (bytes) => {
        uploadedBytes = bytes;
        heartbeat();
      },
    });
    const sha256 = hasher.digest();

    const facts: OpaFacts = {
      url: source.url,
      opaVersion: snapshot.opaVersion,
      regoVersion: snapshot.regoVersion,
      policies,
      rulePaths: snapshot.rulePaths,
      dataSha256: await bundle.dataSha256,
      dataBytes: snapshot.dataBytes,
      loadedBundles: snapshot.loadedBundles,
      probes: snapshot.probes,
      bundleRevision: revision,
    };
    const reference = await artifactReference({
      store,
      folder,
      kind: 'opa-bundle',
      source: source.name,
      key,
      stored: { size, sha256 },
      facts,
      startedAt,
    });
    log.info({ key, size, sha256, policies: policies.length, dataBytes: snapshot.dataBytes }, 'OPA snapshot stored');
    return reference;
  } catch (error) {
    log.warn({ error: (error as Error).message, attempt: context.info.attempt }, 'OPA snapshot failed');
    if (error instanceof ApplicationFailure || (error as Error).name === 'AbortError') throw error;
    // Before the upload, an unexpected error comes from reading OPA (a
    // response cut short, a policy AST of another shape); after, from the store.
    if (phase !== 'upload') {
      throw ApplicationFailure.create({
        type: FailureType.SourceUnavailable,
        message: `snapshot of OPA "${source.name}" failed while reading ${phase} from ${source.url}: ${(error as Error).message}`,
        cause: error as Error,
      });
    }
    throw ApplicationFailure.create({
      type: FailureType.StorageFailed,
      message: `snapshot of OPA "${source.name}" failed: writing to ${store.description}: ${(error as Error).message}`,
      cause: error as Error,
    });
  } finally {
    stopHeartbeat();
    await rm(workDirectory, { recursive: true, force: true });
  }
}

/**
 * Stores a step's facts as a small JSON object beside its artifact and
 * returns the step's result: the artifact's key and digests. sealBackup
 * later moves the facts into the manifest. With an ArtifactStore, the key
 * and digests are those of the encoded object the step's put stored.
 */
export async function artifactReference(options: {
  store: BlobStore;
  folder: string;
  kind: ArtifactReference['kind'];
  source: string;
  key: string;
  stored: { size: number; sha256: string };
  facts: unknown;
  startedAt: string;
}): Promise<ArtifactReference> {
  const factsKey = `${options.key}.facts.json`;
  const text = JSON.stringify(options.facts);
  const target = options.store instanceof ArtifactStore ? options.store.inner : options.store;
  // Facts stay plaintext only until sealBackup moves them into the manifest
  // or, for an encrypted backup, into the encrypted facts object.
  await target.put(`${options.folder}/${factsKey}`, Readable.from([Buffer.from(text)]), {
    contentType: 'application/json',
  });
  const encoded = options.store instanceof ArtifactStore ? options.store.encoded(`${options.folder}/${options.key}`) : undefined;
  if (options.store instanceof ArtifactStore && !encoded) {
    throw new Error(`internal error: no object was stored for ${options.key} through the artifact store`);
  }
  const stored = encoded
    ? {
        key: encoded.key.slice(options.folder.length + 1),
        size: encoded.size,
        sha256: encoded.sha256,
        plaintext: encoded.plaintext,
        ...(encoded.compression ? { compression: encoded.compression } : {}),
        ...(encoded.encryption ? { encryption: encoded.encryption } : {}),
        ...(encoded.failedDestinations ? { failedDestinations: encoded.failedDestinations } : {}),
      }
    : { key: options.key, ...options.stored, plaintext: options.stored };
  return {
    kind: options.kind,
    source: options.source,
    ...stored,
    factsKey,
    factsSha256: createHash('sha256').update(text).digest('hex'),
    startedAt: options.startedAt,
    completedAt: new Date().toISOString(),
  };
}

/**
 * Heartbeats on a timer at a third of the heartbeat timeout, with the
 * details `details()` returns. One slow request must not look like a dead
 * worker; request and dump timeouts bound a hung step instead. Returns the
 * function that stops the timer.
 */
export function heartbeatTimer(details: () => unknown): () => void {
  const context = Context.current();
  const timeoutMs = context.info.heartbeatTimeoutMs ?? 30_000;
  const ticker = setInterval(() => context.heartbeat(details()), Math.max(100, Math.floor(timeoutMs / 3)));
  return () => clearInterval(ticker);
}

async function readSmallObject(store: ReturnType<typeof openBlobStore>, key: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/**
 * Writes manifest.json, the commit point of a backup. Before that it checks
 * each artifact's stored size and reads its facts, so the manifest only ever
 * lists objects that exist as they were written.
 */
export async function sealBackup(input: SealBackupInput): Promise<SealBackupResult> {
  const { plan, backupId } = input;
  const log = activityLogger({ backupId, plan: plan.name });
  // Reads go to the first destination that has the object; writes of the
  // manifest go to each destination that contains every artifact.
  const store = openWriteStore(plan);
  const destinations = openDestinations(plan);
  const folder = backupFolder(plan.name, backupId);
  const key = manifestKey(plan.name, backupId);
  const destinationErrors = new Map<string, string>();
  const failDestination = (name: string, message: string): void => {
    if (!destinationErrors.has(name)) destinationErrors.set(name, message);
  };

  // A retry after the manifest was written (say the worker died before it
  // reported back) finds the manifest and returns it instead of writing anew.
  if (await store.stat(key)) {
    const existing = await readSmallObject(store, key);
    const manifest = JSON.parse(existing.toString('utf8')) as Manifest;
    if (manifest.workflow.runId === input.workflow.runId) {
      return {
        manifestKey: key,
        manifestSha256: createHash('sha256').update(existing).digest('hex'),
        status: manifest.status,
        ...(manifest.destinations ? { destinations: manifest.destinations } : {}),
        failures: manifest.failures,
      };
    }
  }

  const artifacts: ArtifactRecord[] = [];
  for (const reference of input.artifacts) {
    // An artifact reused from an earlier backup keeps its bytes in that backup's folder.
    const location = reference.storedIn ? backupFolder(plan.name, reference.storedIn) : folder;
    for (const [name, message] of Object.entries(reference.failedDestinations ?? {})) {
      failDestination(name, `storing ${reference.key} failed: ${message}`);
    }
    for (const destination of destinations) {
      if (destinationErrors.has(destination.name)) continue;
      let problem: string | undefined;
      try {
        const stored = await destination.store.stat(`${location}/${reference.key}`);
        if (!stored || stored.size !== reference.size) {
          problem = `${reference.key} has ${stored ? `${stored.size} bytes` : 'disappeared'}, expected ${reference.size} bytes`;
        }
      } catch (error) {
        problem = `cannot check ${reference.key}: ${(error as Error).message}`;
      }
      if (problem) failDestination(destination.name, problem);
    }
    if (destinations.every((destination) => destinationErrors.has(destination.name))) {
      throw ApplicationFailure.create({
        type: FailureType.StorageFailed,
        message: `cannot seal backup ${backupId}: no destination contains every artifact: ${[...destinationErrors].map(([name, message]) => `${name}: ${message}`).join('; ')}`,
      });
    }
    const factsText = await readSmallObject(store, `${folder}/${reference.factsKey}`);
    const factsSha256 = createHash('sha256').update(factsText).digest('hex');
    if (factsSha256 !== reference.factsSha256) {
      throw ApplicationFailure.create({
        type: FailureType.StorageFailed,
        message: `cannot seal backup ${backupId}: ${reference.factsKey} in ${store.description} changed after it was written`,
      });
    }
    artifacts.push({
      kind: reference.kind,
      source: reference.source,
      key: reference.key,
      size: reference.size,
      sha256: reference.sha256,
      plaintext: reference.plaintext,
      ...(reference.compression ? { compression: reference.compression } : {}),
      ...(reference.encryption ? { encryption: reference.encryption } : {}),
      startedAt: reference.startedAt,
      ...(reference.storedIn ? { storedIn: reference.storedIn } : {}),
      completedAt: reference.completedAt,
      facts: JSON.parse(factsText.toString('utf8')) as OpaFacts,
    });
  }

  const failures = [...input.failures];
  const manifest: Manifest = {
    format: MANIFEST_FORMAT,
    version: MANIFEST_VERSION,
    backupId,
    plan: plan.name,
    // Set below, once the destinations' states are known.
    status: 'complete',
    startedAt: input.startedAt,
    completedAt: new Date().toISOString(),
    workflow: input.workflow,
    encryption: encryptionSummary(plan),
    artifacts,
    failures,
  };

  // An encrypted backup keeps its facts (probe inputs and decisions, table
  // names, row counts) in an encrypted object; manifest.json keeps only
  // keys, sizes and digests.
  if (!plan.encryption.unencrypted) {
    const factsStore = openArtifactStore(plan, 'facts');
    const facts = Object.fromEntries(artifacts.map((artifact) => [artifact.key, artifact.facts]));
    const factsKey = `${folder}/${FACTS_FILE}`;
    await factsStore.put(factsKey, Readable.from([Buffer.from(JSON.stringify(facts))]), { contentType: 'application/octet-stream' });
    const encoded = factsStore.encoded(factsKey)!;
    for (const [name, message] of Object.entries(encoded.failedDestinations ?? {})) failDestination(name, `storing ${FACTS_FILE} failed: ${message}`);
    manifest.facts = {
      key: encoded.key.slice(folder.length + 1),
      size: encoded.size,
      sha256: encoded.sha256,
      plaintext: encoded.plaintext,
      ...(encoded.compression ? { compression: encoded.compression } : {}),
      ...(encoded.encryption ? { encryption: encoded.encryption } : {}),
    };
    for (const artifact of artifacts) delete artifact.facts;
  }

  let signing: ReturnType<typeof loadSigningKey>;
  try {
    signing = loadSigningKey(plan);
  } catch (error) {
    if (error instanceof ApplicationFailure) throw error;
    throw ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message: (error as Error).message });
  }
  if (signing) manifest.signing = { algorithm: 'Ed25519', keyId: signing.keyId };

  // Every destination gets the same manifest bytes, so one signature fits
  // all, and the destinations' states are fixed before the first write.
  // NOTE: a destination whose manifest write fails below is listed as
  // complete in the others' manifests but has none; `list` shows it absent.
  if (plan.replicas) {
    manifest.destinations = destinations.map((destination) =>
      destinationErrors.has(destination.name)
        ? { name: destination.name, state: 'failed' as const, error: destinationErrors.get(destination.name) }
        : { name: destination.name, state: 'complete' as const },
    );
  }
  const complete = destinations.filter((destination) => !destinationErrors.has(destination.name));
  for (const [name, message] of destinationErrors) {
    failures.push({ kind: 'destination', source: name, type: FailureType.StorageFailed, message });
  }
  const status = failures.length > 0 ? 'partial' : 'complete';
  manifest.status = status;
  const text = Buffer.from(JSON.stringify(manifest, null, 2) + '\n');
  const written: string[] = [];
  const writeErrors: string[] = [];
  for (const destination of complete) {
    try {
      // The signature goes first: manifest.json is the commit point, so a
      // committed backup never lacks its signature.
      if (signing) {
        await destination.store.put(`${folder}/${SIGNATURE_FILE}`, Readable.from([signManifest(text, signing.privateKey)]), {
          contentType: 'application/octet-stream',
        });
      }
      await destination.store.put(key, Readable.from([text]), { contentType: 'application/json' });
      written.push(destination.name);
    } catch (error) {
      writeErrors.push(`${destination.name}: ${(error as Error).message}`);
      log.warn({ destination: destination.name, error: (error as Error).message }, 'writing the manifest failed');
    }
  }
  if (written.length === 0) {
    throw ApplicationFailure.create({
      type: FailureType.StorageFailed,
      message: `cannot seal backup ${backupId}: writing ${MANIFEST_FILE} failed in every destination: ${writeErrors.join('; ')}`,
    });
  }
  for (const reference of input.artifacts) await store.delete(`${folder}/${reference.factsKey}`).catch(() => undefined);
  log.info({ key, status, artifacts: artifacts.length, failures: failures.length, destinations: written }, 'backup sealed');
  recordSealedBackup(manifest);
  return {
    manifestKey: key,
    manifestSha256: createHash('sha256').update(text).digest('hex'),
    status,
    ...(plan.replicas ? { destinations: manifest.destinations } : {}),
    failures,
  };
}

/** Describes the plan's destination and replicas, for results and messages. */
export async function describeDestination(plan: Plan): Promise<string> {
  return openWriteStore(plan).description;
}
