// The activity that backs up a bundle the way OPA downloads it: from a bundle
// service over HTTP(S), or from an object in an S3-compatible bucket. The
// bytes are stored unchanged, so a signed bundle keeps its signature. The
// download goes to a temporary file through a SHA-256 digest, the file is
// read twice more to record its .manifest and check its .signatures.json, and
// it is uploaded from there only when it differs from the previous backup's.
import { createHash, createHmac, createPublicKey, createSecretKey, constants, timingSafeEqual, verify, X509Certificate, type KeyObject } from 'node:crypto';
import { createReadStream, createWriteStream, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import http, { type IncomingMessage } from 'node:http';
import https from 'node:https';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { GetObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import tar from 'tar-stream';
import { parse as parseYaml } from 'yaml';
import { compareStrings } from '../../common/compare';
import { FailureType } from '../../common/failures';
import { backupFolder, isBackupId, manifestKey, servedBundleKey } from '../../common/layout';
import type { ArtifactRecord, BundleFacts, BundleSignatureFacts, Manifest } from '../../common/manifest';
import type { BundleSource, Plan } from '../../common/plan';
import type { ArtifactReference } from '../../common/workflow-types';
import { artifactReference, heartbeatTimer } from '../backup';
import { DigestStream } from '../digest';
import { activityLogger } from '../logging';
import { resolveSecret } from '../secrets';
import { encryptionSummary, openArtifactStore } from '../artifacts';
import type { BlobStore } from '../storage';

/** Limit of one request without a byte received. */
const IDLE_TIMEOUT_MS = 120_000;
const MAX_REDIRECTS = 5;
/** Limit of .manifest and .signatures.json, which are read into memory. */
const MAX_METADATA_BYTES = 16 * 1024 * 1024;
/**
 * Limit of a data.json or data.yaml whose signature is checked: its digest is
 * taken over a canonical form, which needs the whole document in memory.
 * Larger files leave the signature "not checked".
 */
const MAX_STRUCTURED_BYTES = 256 * 1024 * 1024;

export interface BundleStepInput {
  plan: Plan;
  source: string;
  backupId: string;
}

/** A download's outcome: the bundle in `file`, or the server's 304 to If-None-Match. */
type Download = { notModified: true } | { notModified: false; etag?: string; size: number; sha256: string };

/** The previous backup's artifact of this source, whose stored bytes an unchanged bundle reuses. */
interface PreviousBundle {
  /** Backup id of the folder that contains the bytes. */
  storedIn: string;
  record: ArtifactRecord;
  /** Absent when the previous manifest keeps its facts encrypted. */
  facts?: BundleFacts;
  /** SHA-256 of the bundle as it was served. */
  bundleSha256?: string;
}

function findSource(plan: Plan, name: string): { source: BundleSource; index: number } {
  const index = (plan.sources.bundle ?? []).findIndex((source) => source.name === name);
  if (index < 0) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no bundle source named "${name}"`,
    });
  }
  return { source: plan.sources.bundle![index], index };
}

/**
 * Downloads one bundle source into the blob store, or reuses the previous
 * backup's bytes when the bundle did not change. A retry starts over and
 * overwrites the same key.
 */
export async function fetchBundleSource(input: BundleStepInput): Promise<ArtifactReference> {
  const { plan, backupId } = input;
  const { source, index } = findSource(plan, input.source);
  const context = Context.current();
  const log = activityLogger({ backupId, plan: plan.name, source: source.name });
  // Puts encode with the plan's compression and encryption; reads go to the destination as stored.
  const artifactStore = openArtifactStore(plan, 'bundle');
  const store = artifactStore.inner;
  const folder = backupFolder(plan.name, backupId);
  const key = servedBundleKey(source.name);
  const startedAt = new Date().toISOString();
  let phase = 'lookup';
  let bytes = 0;
  const stopHeartbeat = heartbeatTimer(() => ({ phase, bytes }));
  const workDirectory = await mkdtemp(path.join(tmpdir(), `opa-backup-bundle-${source.name}-`));
  log.info({ url: source.url, attempt: context.info.attempt }, 'bundle download started');

  try {
    const previous = await findPreviousBundle(store, plan, backupId, { source: source.name, url: source.url, storedKey: artifactStore.storedKey(key) });
    phase = 'download';
    const file = path.join(workDirectory, 'bundle.tar.gz');
    const options = {
      source,
      index,
      file,
      etag: previous?.facts?.etag,
      signal: context.cancellationSignal,
      onProgress: (received: number) => {
        bytes = received;
      },
    };
    const download = source.url.startsWith('s3://') ? await downloadFromS3(options) : await downloadFromHttp(options);

    if (download.notModified) {
      // Only a previous backup with readable facts sends If-None-Match.
      const facts: BundleFacts = { ...previous!.facts!, unchanged: true, unchangedBy: 'etag' };
      log.info({ etag: facts.etag, storedIn: previous!.storedIn }, 'bundle not modified; the earlier backup keeps its bytes');
      return await reuse(previous!, facts);
    }

    phase = 'inspect';
    const verificationKey = source.verificationKey
      ? resolveSecret(source.verificationKey, `sources.bundle[${index}].verificationKey`)
      : undefined;
    let inspection: BundleInspection;
    try {
      inspection = await inspectBundle(file, { verificationKey, scope: source.verificationScope ?? '' });
    } catch (error) {
      throw ApplicationFailure.create({
        type: FailureType.InvalidResponse,
        message: `bundle source "${source.name}": the bundle from ${source.url} cannot be read: ${(error as Error).message}`,
      });
    }
    if (inspection.signature.verified === false) {
      log.warn({ reason: inspection.signature.reason }, 'bundle signature does not verify');
    }
    const facts: BundleFacts = {
      url: source.url,
      ...(download.etag !== undefined ? { etag: download.etag } : {}),
      bundleSize: download.size,
      bundleSha256: download.sha256,
      ...inspection,
    };

    if (previous && previous.bundleSha256 === download.sha256) {
      log.info({ sha256: download.sha256, storedIn: previous.storedIn }, 'bundle unchanged; the earlier backup keeps its bytes');
      return await reuse(previous, { ...facts, unchanged: true, unchangedBy: 'sha256' });
    }

    phase = 'upload';
    const { size } = await artifactStore.put(`${folder}/${key}`, createReadStream(file), {
      contentType: 'application/gzip',
      signal: context.cancellationSignal,
      onProgress: (stored) => {
        bytes = stored;
      },
    });
    const reference = await artifactReference({
      store: artifactStore,
      folder,
      kind: 'bundle',
      source: source.name,
      key,
      stored: { size: download.size, sha256: download.sha256 },
      facts,
      startedAt,
    });
    log.info({ key: reference.key, size, sha256: reference.sha256, revision: facts.revision, verified: facts.signature.verified }, 'bundle stored');
    return reference;
  } catch (error) {
    log.warn({ error: (error as Error).message, phase, attempt: context.info.attempt }, 'bundle download failed');
    if (error instanceof ApplicationFailure || (error as Error).name === 'AbortError') throw error;
    if (phase === 'lookup' || phase === 'upload') {
      const what = phase === 'lookup' ? 'reading the previous backup from' : 'writing to';
      throw ApplicationFailure.create({
        type: FailureType.StorageFailed,
        message: `bundle source "${source.name}": ${what} ${store.description} failed: ${(error as Error).message}`,
      });
    }
    throw ApplicationFailure.create({
      type: FailureType.SourceUnavailable,
      message: `bundle source "${source.name}" failed during ${phase} of ${source.url}: ${(error as Error).message}`,
    });
  } finally {
    stopHeartbeat();
    await rm(workDirectory, { recursive: true, force: true });
  }

  async function reuse(previous: PreviousBundle, facts: BundleFacts): Promise<ArtifactReference> {
    phase = 'upload';
    const { record } = previous;
    // The plain store writes the facts only; the reference then takes the stored object's key, digests and encoding from the earlier record.
    const reference = await artifactReference({
      store,
      folder,
      kind: 'bundle',
      source: source.name,
      key: record.key,
      stored: { size: record.size, sha256: record.sha256 },
      facts,
      startedAt,
    });
    return {
      ...reference,
      plaintext: record.plaintext,
      ...(record.compression ? { compression: record.compression } : {}),
      ...(record.encryption ? { encryption: record.encryption } : {}),
      storedIn: previous.storedIn,
    };
  }
}

/** Reads and parses a backup's manifest.json, or returns undefined when the backup is not committed. */
async function readManifest(store: BlobStore, plan: Plan, backupId: string): Promise<Manifest | undefined> {
  const key = manifestKey(plan.name, backupId);
  if (!(await store.stat(key))) return undefined;
  const chunks: Buffer[] = [];
  for await (const chunk of await store.get(key)) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as Manifest;
}

/**
 * Returns the plan's latest committed manifest other than this backup's.
 * Backup ids sort by their start second; between backups that started in
 * the same second, the one completed last counts.
 */
async function latestManifest(store: BlobStore, plan: Plan, backupId: string): Promise<{ backupId: string; manifest: Manifest } | undefined> {
  // NOTE: this lists every backup folder of the plan on each run.
  const startSecond = (id: string): string => id.slice(0, id.indexOf('-'));
  const earlier: string[] = [];
  for await (const folder of store.listFolders(`${plan.name}/`)) {
    if (folder !== backupId && isBackupId(folder) && compareStrings(startSecond(folder), startSecond(backupId)) <= 0) earlier.push(folder);
  }
  earlier.sort(compareStrings).reverse();
  let index = 0;
  while (index < earlier.length) {
    const second = startSecond(earlier[index]);
    let latest: { backupId: string; manifest: Manifest } | undefined;
    for (; index < earlier.length && startSecond(earlier[index]) === second; index++) {
      const manifest = await readManifest(store, plan, earlier[index]);
      if (manifest && (!latest || compareStrings(manifest.completedAt, latest.manifest.completedAt) > 0)) {
        latest = { backupId: earlier[index], manifest };
      }
    }
    if (latest) return latest;
  }
  return undefined;
}

/**
 * Finds this source's artifact in the plan's latest committed backup, when
 * it was downloaded from the same URL, stored with the encoding this backup
 * would use (same key suffixes, same encryption recipients), and its bytes
 * are still stored. Only the latest manifest counts: a bundle that failed
 * there is downloaded and stored anew.
 */
async function findPreviousBundle(
  store: BlobStore,
  plan: Plan,
  backupId: string,
  wanted: { source: string; url: string; storedKey: string },
): Promise<PreviousBundle | undefined> {
  const latest = await latestManifest(store, plan, backupId);
  if (!latest) return undefined;
  const record = latest.manifest.artifacts.find((artifact) => artifact.kind === 'bundle' && artifact.source === wanted.source);
  if (!record || record.key !== wanted.storedKey) return undefined;
  const previousEncryption = latest.manifest.encryption ?? { mode: 'none' };
  if (JSON.stringify(previousEncryption) !== JSON.stringify(encryptionSummary(plan))) return undefined;
  const facts = record.facts as BundleFacts | undefined;
  if (facts && facts.url !== wanted.url) return undefined;
  const storedIn = record.storedIn ?? latest.backupId;
  if (!isBackupId(storedIn)) return undefined;
  const stored = await store.stat(`${backupFolder(plan.name, storedIn)}/${record.key}`);
  if (!stored || stored.size !== record.size) return undefined;
  // An encrypted backup keeps its facts apart; its record still has the digest of the bundle as served.
  return { storedIn, record, facts, bundleSha256: record.plaintext?.sha256 ?? facts?.bundleSha256 };
}

interface DownloadOptions {
  source: BundleSource;
  index: number;
  file: string;
  /** ETag of the previous backup's bundle, sent as If-None-Match. */
  etag?: string;
  signal: AbortSignal;
  onProgress: (bytes: number) => void;
}

/** Streams `body` into `file` through a SHA-256 digest. */
async function saveBody(body: NodeJS.ReadableStream, options: DownloadOptions): Promise<{ size: number; sha256: string }> {
  const digest = new DigestStream();
  digest.on('data', () => options.onProgress(digest.bytes));
  await pipeline(body, digest, createWriteStream(options.file), { signal: options.signal });
  return { size: digest.bytes, sha256: digest.digest() };
}

function unauthorized(source: BundleSource, what: string, hint: string): ApplicationFailure {
  return ApplicationFailure.create({
    type: FailureType.Unauthorized,
    nonRetryable: true,
    message: `bundle source "${source.name}": ${what}; ${hint}`,
  });
}

async function readSnippet(response: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of response) {
    if (size < 4096) chunks.push(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return Buffer.concat(chunks).toString('utf8').trim().slice(0, 300);
}

/** Sends one GET and returns the response. Network errors become SourceUnavailable. */
function get(url: URL, headers: Record<string, string>, agent: http.Agent, options: DownloadOptions): Promise<IncomingMessage> {
  const transport = url.protocol === 'https:' ? https : http;
  return new Promise<IncomingMessage>((resolve, reject) => {
    const request = transport.request(url, { method: 'GET', headers, agent, signal: options.signal }, resolve);
    request.setTimeout(IDLE_TIMEOUT_MS, () => request.destroy(new Error(`timed out: no data for ${IDLE_TIMEOUT_MS} ms`)));
    request.on('error', (error: NodeJS.ErrnoException) => {
      if (error.name === 'AbortError') {
        reject(error);
        return;
      }
      // TLS alerts by which the server rejects the client certificate, or its absence.
      if (/ALERT_(CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN|CERTIFICATE_REVOKED|CERTIFICATE_EXPIRED|ACCESS_DENIED)/.test(error.code ?? '')) {
        const source = options.source;
        const hint = source.tls?.certFile
          ? `check the client certificate ${source.tls.certFile} and its key`
          : 'the server requires a client certificate; set tls.certFile and tls.key';
        reject(unauthorized(source, `the TLS handshake with ${url.origin} failed: ${error.code}`, hint));
        return;
      }
      reject(
        ApplicationFailure.create({
          type: FailureType.SourceUnavailable,
          message: `bundle source "${options.source.name}": GET ${url.origin}${url.pathname} failed: ${error.code ?? error.message}`,
        }),
      );
    });
    request.end();
  });
}

/**
 * Downloads from a bundle service as OPA does: GET with a bearer token or a
 * client certificate, following up to 5 redirects. The token goes only to
 * the origin of the plan's URL.
 */
async function downloadFromHttp(options: DownloadOptions): Promise<Download> {
  const { source, index } = options;
  const token = source.token ? resolveSecret(source.token, `sources.bundle[${index}].token`) : undefined;
  const origin = new URL(source.url);
  const agent =
    origin.protocol === 'https:'
      ? new https.Agent({
          ca: source.tls?.caFile ? readFileSync(source.tls.caFile) : undefined,
          cert: source.tls?.certFile ? readFileSync(source.tls.certFile) : undefined,
          key: source.tls?.key ? resolveSecret(source.tls.key, `sources.bundle[${index}].tls.key`) : undefined,
          rejectUnauthorized: !(source.tls?.insecureSkipVerify ?? false),
        })
      : new http.Agent();
  try {
    let url = origin;
    for (let redirects = 0; ; redirects++) {
      const headers: Record<string, string> = { accept: 'application/gzip, application/octet-stream, */*' };
      if (token && url.origin === origin.origin) headers.authorization = `Bearer ${token}`;
      if (options.etag) headers['if-none-match'] = options.etag;
      const response = await get(url, headers, agent, options);
      const status = response.statusCode ?? 0;
      const what = `GET ${url.origin}${url.pathname} returned ${status}`;

      if (status >= 300 && status < 400 && status !== 304 && response.headers.location) {
        response.resume();
        if (redirects >= MAX_REDIRECTS) {
          throw ApplicationFailure.create({ type: FailureType.InvalidResponse, message: `bundle source "${source.name}": more than ${MAX_REDIRECTS} redirects from ${source.url}` });
        }
        url = new URL(response.headers.location, url);
        continue;
      }
      if (status === 304 && options.etag) {
        response.resume();
        return { notModified: true };
      }
      if (status === 401 || status === 403) {
        response.resume();
        const hint = source.token
          ? `check the token in ${source.token.replace(':', ' ')}`
          : source.tls?.certFile
            ? `check the client certificate ${source.tls.certFile}`
            : 'the plan sets no token for this source; add one with token: env:NAME';
        throw unauthorized(source, what, hint);
      }
      if (status === 404) {
        response.resume();
        throw ApplicationFailure.create({
          type: FailureType.InvalidPlan,
          nonRetryable: true,
          message: `bundle source "${source.name}": ${what} (not found); check the url ${source.url}`,
        });
      }
      if (status < 200 || status >= 300) {
        const detail = await readSnippet(response);
        throw ApplicationFailure.create({
          type: status >= 500 || status === 429 ? FailureType.SourceUnavailable : FailureType.InvalidResponse,
          message: `bundle source "${source.name}": ${what}${detail ? `: ${detail}` : ''}`,
        });
      }
      const etag = typeof response.headers.etag === 'string' ? response.headers.etag : undefined;
      const saved = await saveBody(response, options);
      return { notModified: false, etag, ...saved };
    }
  } finally {
    agent.destroy();
  }
}

/** Splits s3://BUCKET/KEY. */
function parseS3Url(url: string): { bucket: string; key: string } {
  const match = /^s3:\/\/([^/]+)\/(.+)$/.exec(url);
  if (!match) throw new Error(`"${url}" is not an s3://BUCKET/KEY URL`);
  return { bucket: match[1], key: match[2] };
}

/** Downloads an object with GetObject, sending If-None-Match; credentials come from the AWS SDK's default chain. */
async function downloadFromS3(options: DownloadOptions): Promise<Download> {
  const { source } = options;
  const { bucket, key } = parseS3Url(source.url);
  const client = new S3Client({
    region: source.s3?.region ?? process.env.AWS_REGION ?? 'us-east-1',
    endpoint: source.s3?.endpoint,
    forcePathStyle: source.s3?.forcePathStyle ?? source.s3?.endpoint !== undefined,
    // Temporal retries the step; retries inside the SDK would hide attempts from it.
    maxAttempts: 1,
  });
  try {
    let response;
    try {
      response = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key, IfNoneMatch: options.etag }), {
        abortSignal: options.signal,
      });
    } catch (error) {
      const status = (error as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
      const name = (error as Error).name;
      if (name === 'AbortError') throw error;
      if (status === 304 && options.etag) return { notModified: true };
      const what = `GetObject ${source.url} failed with ${status ?? 'no response'} ${name}: ${(error as Error).message}`;
      if (status === 401 || status === 403) {
        throw unauthorized(source, what, 'check the AWS credentials of the worker (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or its role) and the bucket policy');
      }
      if (status === 404) {
        throw ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message: `bundle source "${source.name}": ${what}; check the url` });
      }
      throw ApplicationFailure.create({
        type: status === undefined || status >= 500 || status === 429 ? FailureType.SourceUnavailable : FailureType.InvalidResponse,
        message: `bundle source "${source.name}": ${what}`,
      });
    }
    const saved = await saveBody(response.Body as NodeJS.ReadableStream, options);
    return { notModified: false, etag: response.ETag, ...saved };
  } finally {
    client.destroy();
  }
}

// ---------------------------------------------------------------------------
// Reading the bundle: .manifest facts and the .signatures.json check.

const SIGNATURES_SUFFIX = '.signatures.json';
/** Files OPA hashes in canonical JSON form instead of as bytes (IsStructuredDoc in OPA's bundle package, v1.22). */
const STRUCTURED_FILES = new Set(['data.json', 'data.yaml', '.manifest']);

/** Calls `onFile` with each regular file of a .tar.gz, path without its leading "/". */
async function eachFile(file: string, onFile: (name: string, entry: Readable) => Promise<void>): Promise<void> {
  const extract = tar.extract();
  const source = createReadStream(file);
  const gunzip = createGunzip();
  const piping = pipeline(source, gunzip, extract);
  // The loop below reports a pipeline error too; this keeps it from also being unhandled.
  piping.catch(() => undefined);
  for await (const entry of extract) {
    const name = entry.header.name.replace(/^(\.?\/)+/, '');
    if (entry.header.type === 'file' || entry.header.type === 'contiguous-file') await onFile(name, entry as unknown as Readable);
    else entry.resume();
  }
  await piping;
}

/** Reads an entry into memory; returns undefined, after draining it, when it has more than `limit` bytes. */
async function readLimited(entry: Readable, limit: number): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of entry) {
    size += (chunk as Buffer).length;
    if (size <= limit) chunks.push(chunk as Buffer);
  }
  return size > limit ? undefined : Buffer.concat(chunks);
}

async function readMetadata(entry: Readable, name: string): Promise<Buffer> {
  const text = await readLimited(entry, MAX_METADATA_BYTES);
  if (!text) throw new Error(`${name} in the bundle is larger than ${MAX_METADATA_BYTES} bytes`);
  return text;
}

export type BundleInspection = Pick<BundleFacts, 'revision' | 'roots' | 'regoVersion' | 'files' | 'signature'>;

/**
 * Reads a bundle's .manifest and checks its .signatures.json as OPA does:
 * one JWT whose signature verifies with the key, whose scope matches, and
 * whose file list has the digest of every other file, no more and no less.
 * A bundle that is not a gzip tar archive raises InvalidResponse.
 */
export async function inspectBundle(file: string, options: { verificationKey?: string; scope: string }): Promise<BundleInspection> {
  let manifestText: Buffer | undefined;
  let signaturesText: Buffer | undefined;
  let files = 0;
  try {
    await eachFile(file, async (name, entry) => {
      files++;
      if (name === '.manifest') manifestText = await readMetadata(entry, name);
      else if (name.endsWith(SIGNATURES_SUFFIX)) signaturesText = await readMetadata(entry, name);
      else entry.resume();
    });
  } catch (error) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidResponse,
      message: `invalid gzip tar archive: ${(error as Error).message}`,
    });
  }

  const inspection: BundleInspection = { files, signature: { signed: signaturesText !== undefined, verified: 'not checked' } };
  if (manifestText) {
    let manifest: { revision?: unknown; roots?: unknown; rego_version?: unknown };
    try {
      manifest = JSON.parse(manifestText.toString('utf8')) as typeof manifest;
    } catch (error) {
      throw ApplicationFailure.create({ type: FailureType.InvalidResponse, message: `invalid JSON in .manifest: ${(error as Error).message}` });
    }
    if (typeof manifest.revision === 'string') inspection.revision = manifest.revision;
    if (Array.isArray(manifest.roots)) inspection.roots = manifest.roots.map(String);
    if (typeof manifest.rego_version === 'number') inspection.regoVersion = manifest.rego_version;
  }
  if (!signaturesText) {
    if (options.verificationKey) inspection.signature.reason = 'the bundle has no .signatures.json';
    return inspection;
  }
  inspection.signature = await checkSignatures(file, signaturesText, options);
  return inspection;
}

interface SignedFile {
  name: string;
  hash: string;
  algorithm: string;
}

/** Node's names of the digest algorithms OPA accepts in a signature's file list. */
const HASH_ALGORITHMS: Record<string, string> = {
  MD5: 'md5',
  'SHA-1': 'sha1',
  'SHA-224': 'sha224',
  'SHA-256': 'sha256',
  'SHA-384': 'sha384',
  'SHA-512': 'sha512',
  'SHA-512-224': 'sha512-224',
  'SHA-512-256': 'sha512-256',
};

async function checkSignatures(
  file: string,
  signaturesText: Buffer,
  options: { verificationKey?: string; scope: string },
): Promise<BundleSignatureFacts> {
  const facts: BundleSignatureFacts = { signed: true, verified: 'not checked' };
  let token: string;
  let header: { alg?: string; kid?: string };
  let payload: { files?: SignedFile[]; scope?: string; keyid?: string };
  try {
    const signatures = JSON.parse(signaturesText.toString('utf8')) as { signatures?: unknown };
    if (!Array.isArray(signatures.signatures) || signatures.signatures.length !== 1 || typeof signatures.signatures[0] !== 'string') {
      return { ...facts, verified: options.verificationKey ? false : 'not checked', reason: '.signatures.json must hold exactly one JWT' };
    }
    token = signatures.signatures[0];
    const [headerPart, payloadPart] = token.split('.');
    header = JSON.parse(Buffer.from(headerPart, 'base64url').toString('utf8')) as typeof header;
    payload = JSON.parse(Buffer.from(payloadPart ?? '', 'base64url').toString('utf8')) as typeof payload;
  } catch (error) {
    return { ...facts, verified: options.verificationKey ? false : 'not checked', reason: `.signatures.json is not valid: ${(error as Error).message}` };
  }
  facts.algorithm = header.alg;
  const keyId = header.kid ?? payload.keyid;
  if (keyId !== undefined) facts.keyId = keyId;
  facts.files = Array.isArray(payload.files) ? payload.files.length : 0;
  if (!options.verificationKey) return facts;

  const problem = verifyJwt(token, header.alg ?? '', options.verificationKey);
  if (problem) return { ...facts, verified: false, reason: problem };
  if ((payload.scope ?? '') !== options.scope) {
    return { ...facts, verified: false, reason: `the signature's scope "${payload.scope ?? ''}" is not the expected "${options.scope}"` };
  }
  const mismatch = await checkFileDigests(file, payload.files ?? []);
  if (mismatch === 'too large') {
    return { ...facts, verified: 'not checked', reason: `a data file is larger than ${MAX_STRUCTURED_BYTES} bytes, the limit for checking its digest` };
  }
  if (mismatch) return { ...facts, verified: false, reason: mismatch };
  return { ...facts, verified: true };
}

/** Key types and the JWT algorithms each one may verify, so a token cannot pick a weaker algorithm than the key's. */
function allowedAlgorithms(key: KeyObject): string[] {
  if (key.type === 'secret') return ['HS256', 'HS384', 'HS512'];
  if (key.asymmetricKeyType === 'rsa') return ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512'];
  if (key.asymmetricKeyType === 'rsa-pss') return ['PS256', 'PS384', 'PS512'];
  if (key.asymmetricKeyType === 'ec') {
    const curve = key.asymmetricKeyDetails?.namedCurve;
    if (curve === 'prime256v1') return ['ES256'];
    if (curve === 'secp384r1') return ['ES384'];
    if (curve === 'secp521r1') return ['ES512'];
  }
  return [];
}

/** Reads the plan's key: PEM (a public key, a certificate or a private key) for RS, PS and ES, anything else an HMAC secret. */
function verificationKeyObject(text: string): KeyObject {
  if (!text.includes('-----BEGIN')) return createSecretKey(Buffer.from(text, 'utf8'));
  if (text.includes('-----BEGIN CERTIFICATE')) return new X509Certificate(text).publicKey;
  return createPublicKey(text);
}

/** Returns why the JWT does not verify with the key, or undefined when it does. */
function verifyJwt(token: string, algorithm: string, keyText: string): string | undefined {
  let key: KeyObject;
  try {
    key = verificationKeyObject(keyText);
  } catch (error) {
    return `the verificationKey is not a valid PEM key: ${(error as Error).message}`;
  }
  const allowed = allowedAlgorithms(key);
  if (!allowed.includes(algorithm)) {
    const kind = key.type === 'secret' ? 'an HMAC secret' : `a ${key.asymmetricKeyType} public key`;
    return `the signature uses ${algorithm || 'no algorithm'}, which the verificationKey (${kind}) cannot check; it accepts ${allowed.join(', ') || 'none'}`;
  }
  const parts = token.split('.');
  if (parts.length !== 3) return 'the JWT does not have three parts';
  const data = Buffer.from(`${parts[0]}.${parts[1]}`, 'ascii');
  const signature = Buffer.from(parts[2], 'base64url');
  const digest = `sha${algorithm.slice(2)}`;
  let valid: boolean;
  if (algorithm.startsWith('HS')) {
    const expected = createHmac(digest, key).update(data).digest();
    valid = expected.length === signature.length && timingSafeEqual(expected, signature);
  } else if (algorithm.startsWith('PS')) {
    valid = verify(digest, data, { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_DIGEST }, signature);
  } else if (algorithm.startsWith('ES')) {
    valid = verify(digest, data, { key, dsaEncoding: 'ieee-p1363' }, signature);
  } else {
    valid = verify(digest, data, key, signature);
  }
  return valid ? undefined : `the ${algorithm} signature does not verify with the verificationKey`;
}

/**
 * Hashes every file of the bundle with the algorithm its signature lists
 * and compares. Returns the first problem, "too large" when a data file
 * exceeds MAX_STRUCTURED_BYTES, or undefined when every digest matches.
 */
async function checkFileDigests(file: string, signed: SignedFile[]): Promise<string | undefined> {
  const expected = new Map(signed.map((entry) => [entry.name, entry]));
  let problem: string | undefined;
  await eachFile(file, async (name, entry) => {
    if (name.endsWith(SIGNATURES_SUFFIX) || problem) {
      entry.resume();
      return;
    }
    const listed = expected.get(name);
    if (!listed) {
      problem = `${name} is in the bundle but not in its signature`;
      entry.resume();
      return;
    }
    expected.delete(name);
    const algorithm = HASH_ALGORITHMS[listed.algorithm];
    if (!algorithm) {
      problem = `${name}: the signature names the unknown digest algorithm "${listed.algorithm}"`;
      entry.resume();
      return;
    }
    const hash = createHash(algorithm);
    const base = path.posix.basename(name);
    if (STRUCTURED_FILES.has(base)) {
      const text = await readLimited(entry, MAX_STRUCTURED_BYTES);
      if (!text) {
        problem = 'too large';
        return;
      }
      try {
        const json = base === 'data.yaml' ? JSON.stringify(parseYaml(text.toString('utf8')) ?? null) : text.toString('utf8');
        hash.update(canonicalJson(json), 'utf8');
      } catch (error) {
        problem = `${name} is not valid ${base === 'data.yaml' ? 'YAML' : 'JSON'}: ${(error as Error).message}`;
        return;
      }
    } else {
      for await (const chunk of entry) hash.update(chunk as Buffer);
    }
    const actual = hash.digest('hex');
    if (actual !== listed.hash.toLowerCase()) problem = `${name}: digest mismatch (signature has ${listed.hash}, file has ${actual})`;
  });
  if (problem) return problem;
  if (expected.size > 0) return `the signature lists ${[...expected.keys()].join(', ')}, which the bundle does not contain`;
  return undefined;
}

// ---------------------------------------------------------------------------
// Canonical JSON as OPA hashes it (walk in OPA's bundle/hash.go, v1.22):
// object keys sorted by their UTF-8 bytes, no whitespace, numbers exactly as
// written, strings as Go's encoding/json writes them without HTML escaping.

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** Encodes a string as Go's json.Encoder with SetEscapeHTML(false): like JSON.stringify, plus \u2028 and \u2029 escaped and lone surrogates replaced. */
function goJsonString(value: string): string {
  return JSON.stringify(value.replace(LONE_SURROGATE, '\uFFFD')).replace(/\u2028/g, '\\u2028').replace(/\u2029/g, '\\u2029');
}

const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;

/** Returns the canonical form of a JSON text; throws on invalid JSON. */
export function canonicalJson(text: string): string {
  let position = 0;
  const skipWhitespace = (): void => {
    while (position < text.length && ' \t\n\r'.includes(text[position])) position++;
  };
  const fail = (what: string): never => {
    throw new Error(`${what} at offset ${position}`);
  };
  const readString = (): string => {
    const start = position;
    position++;
    while (position < text.length && text[position] !== '"') position += text[position] === '\\' ? 2 : 1;
    if (position >= text.length) fail('unterminated string');
    position++;
    return JSON.parse(text.slice(start, position)) as string;
  };
  const value = (): string => {
    skipWhitespace();
    const char = text[position];
    if (char === '{') {
      position++;
      const members = new Map<string, string>();
      skipWhitespace();
      if (text[position] === '}') position++;
      else {
        for (;;) {
          skipWhitespace();
          if (text[position] !== '"') fail('expected an object key');
          const key = readString();
          skipWhitespace();
          if (text[position] !== ':') fail('expected ":"');
          position++;
          members.set(key, value());
          skipWhitespace();
          if (text[position] === ',') position++;
          else if (text[position] === '}') {
            position++;
            break;
          } else fail('expected "," or "}"');
        }
      }
      const keys = [...members.keys()].map((key) => ({ key, bytes: Buffer.from(key.replace(LONE_SURROGATE, '\uFFFD'), 'utf8') }));
      keys.sort((a, b) => Buffer.compare(a.bytes, b.bytes));
      return `{${keys.map(({ key }) => `${goJsonString(key)}:${members.get(key)}`).join(',')}}`;
    }
    if (char === '[') {
      position++;
      const items: string[] = [];
      skipWhitespace();
      if (text[position] === ']') position++;
      else {
        for (;;) {
          items.push(value());
          skipWhitespace();
          if (text[position] === ',') position++;
          else if (text[position] === ']') {
            position++;
            break;
          } else fail('expected "," or "]"');
        }
      }
      return `[${items.join(',')}]`;
    }
    if (char === '"') return goJsonString(readString());
    for (const literal of ['true', 'false', 'null']) {
      if (text.startsWith(literal, position)) {
        position += literal.length;
        return literal;
      }
    }
    NUMBER.lastIndex = position;
    const match = NUMBER.exec(text);
    if (!match || match[0].length === 0) return fail('unexpected character');
    position += match[0].length;
    return match[0];
  };
  const result = value();
  skipWhitespace();
  if (position < text.length) fail('unexpected text after the document');
  return result;
}
