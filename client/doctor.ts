// `opa-backup doctor --plan FILE [--json]`: checks every destination of a
// plan (the primary and each replica) and prints what to fix. For S3 it
// checks that the bucket is reachable with this process's credentials (the
// AWS SDK's default chain, so run it with the worker's environment) and that
// a write and a delete work. It also reads the versioning, Object Lock,
// lifecycle and public access block settings. For a local folder it checks that the folder exists or can be
// created, that it is writable, its free space, and whether it shares a
// filesystem with another destination of the plan.
//
// Exit codes: 0 when no check failed (warnings allowed), 1 when a check
// failed, 2 for invalid usage or an invalid plan.
import { randomBytes } from 'node:crypto';
import { accessSync, constants, statfsSync, statSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { Command } from 'commander';
import {
  DeleteObjectCommand,
  GetBucketLifecycleConfigurationCommand,
  GetBucketVersioningCommand,
  GetObjectLockConfigurationCommand,
  GetPublicAccessBlockCommand,
  HeadBucketCommand,
  PutObjectCommand,
  type LifecycleRule,
} from '@aws-sdk/client-s3';
import { loadPlanFile, PlanError } from '../activities/plan-loader';
import { LocalBlobStore } from '../activities/storage/local';
import { S3BlobStore } from '../activities/storage/s3';
import { PRIMARY_DESTINATION, type Destination, type Plan } from '../common/plan';
import { hasRetentionRules, parseDuration } from '../common/retention';
import { CommandError, runCommand } from './schedules';

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

const DAY_MS = 86_400_000;

/** Default of --min-free: free space under which a local destination gets a warning. */
export const DEFAULT_MIN_FREE = '5GiB';

/** Default of --timeout: time each S3 request gets. */
export const DEFAULT_REQUEST_TIMEOUT = '10s';

export type CheckState = 'ok' | 'warn' | 'fail' | 'unknown';

export interface DoctorCheck {
  /** Short name of what is checked, such as "bucket" or "versioning". */
  check: string;
  state: CheckState;
  message: string;
  /** The setting to change or the command to run. */
  fix?: string;
}

export interface DestinationDiagnosis {
  /** PRIMARY_DESTINATION ("primary") or the replica's name. */
  name: string;
  kind: 's3' | 'local';
  destination: string;
  checks: DoctorCheck[];
}

export interface DoctorReport {
  plan: string;
  /** True when any check of any destination failed. */
  failed: boolean;
  destinations: DestinationDiagnosis[];
}

export interface DoctorOptions {
  /** Free bytes under which a local destination gets a warning. */
  minFreeBytes: number;
  /** Time each S3 request gets, in milliseconds. */
  requestTimeoutMs: number;
}

const SIZE_UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };

/** Returns a size such as "500MiB" or "5GiB" in bytes. */
export function parseSize(text: string): number {
  const match = /^(\d+)(B|KiB|MiB|GiB|TiB)$/.exec(text);
  if (!match) throw new Error(`invalid size "${text}": use a whole number and a unit B, KiB, MiB, GiB or TiB, such as "5GiB"`);
  return Number(match[1]) * SIZE_UNITS[match[2]];
}

function formatGiB(bytes: number): string {
  return `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
}

/** Returns the plan's destinations with their names: the primary first, then each replica. */
function namedDestinations(plan: Plan): Array<{ name: string; destination: Destination }> {
  return [
    { name: PRIMARY_DESTINATION, destination: plan.destination },
    ...(plan.replicas ?? []).map((replica) => ({ name: replica.name, destination: replica as Destination })),
  ];
}

/** Checks every destination of the plan; destinations are checked one after another. */
export async function diagnosePlan(plan: Plan, options: DoctorOptions): Promise<DoctorReport> {
  const destinations = namedDestinations(plan);
  const results: DestinationDiagnosis[] = [];
  for (const { name, destination } of destinations) {
    if (destination.s3) {
      const store = new S3BlobStore(destination.s3);
      try {
        results.push({ name, kind: 's3', destination: store.description, checks: await checkS3(plan, store, destination.s3, options) });
      } finally {
        store.client.destroy();
      }
    } else {
      const root = destination.local!.path;
      results.push({ name, kind: 'local', destination: `local folder ${root}`, checks: await checkLocal(plan, root, options) });
    }
  }
  addSeparationChecks(destinations, results);
  return { plan: plan.name, failed: results.some((result) => result.checks.some((check) => check.state === 'fail')), destinations: results };
}

// ---------------------------------------------------------------- S3

type S3Settings = NonNullable<Destination['s3']>;

interface AwsError {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  cause?: unknown;
}

/** Returns the `aws` CLI flags that point at the destination's endpoint, or nothing for AWS itself. */
function endpointFlag(s3: S3Settings): string {
  return s3.endpoint ? ` --endpoint-url ${s3.endpoint}` : '';
}

function statusOf(error: unknown): number | undefined {
  return (error as AwsError)?.$metadata?.httpStatusCode;
}

/** Returns true for errors that mean no HTTP response came back: refused, unresolved, reset or timed out. */
function isNetworkError(error: unknown): boolean {
  const current = error as AwsError;
  const text = `${current?.name} ${current?.code} ${current?.message}`;
  return (
    statusOf(error) === undefined &&
    /ECONNREFUSED|ENOTFOUND|EAI_AGAIN|ECONNRESET|EHOSTUNREACH|ENETUNREACH|ETIMEDOUT|TimeoutError|AbortError|socket hang up/i.test(text)
  );
}

/** Returns true when the server does not implement the request (HTTP 501 or NotImplemented). */
function isUnsupported(error: unknown): boolean {
  const name = (error as AwsError)?.name ?? '';
  return statusOf(error) === 501 || name === 'NotImplemented' || name === 'NotImplementedError';
}

function describeError(error: unknown): string {
  const current = error as AwsError;
  const status = statusOf(error);
  return `${current?.name ?? 'Error'}${status ? ` (HTTP ${status})` : ''}: ${current?.message ?? String(error)}`;
}

/** Returns the check for a settings read that failed: "unknown" when the server does not support it. */
function unreadableSetting(check: string, request: string, error: unknown): DoctorCheck {
  if (isUnsupported(error)) {
    return { check, state: 'unknown', message: `unknown: the server does not support ${request} (${describeError(error)})` };
  }
  if (statusOf(error) === 403) {
    return {
      check,
      state: 'unknown',
      message: `unknown: ${request} was denied (${describeError(error)})`,
      fix: `allow s3:${request} on the bucket for the worker's credentials, or check this setting in the provider's console`,
    };
  }
  return { check, state: 'unknown', message: `unknown: ${request} failed: ${describeError(error)}` };
}

/**
 * Returns the longest time, in days, that the plan's rules keep a backup
 * when there is a backup in every period. Returns undefined when the plan
 * has no rules or only keepLast, which counts backups and bounds no age.
 * The newest verified backup can be older, so retention can keep some
 * backups longer than this.
 */
function retentionHorizonDays(plan: Plan): number | undefined {
  const rules = plan.retention;
  if (!rules || !hasRetentionRules(rules)) return undefined;
  const spans = [
    rules.keepWithin ? parseDuration(rules.keepWithin) / DAY_MS : 0,
    (rules.keepHourly ?? 0) / 24,
    rules.keepDaily ?? 0,
    (rules.keepWeekly ?? 0) * 7,
    (rules.keepMonthly ?? 0) * 31,
    (rules.keepYearly ?? 0) * 366,
  ];
  const longest = Math.max(...spans);
  return longest > 0 ? longest : undefined;
}

/** Sends one S3 request with the doctor's request timeout. */
type SendRequest = <T = unknown>(command: unknown) => Promise<T>;

async function checkS3(plan: Plan, store: S3BlobStore, s3: S3Settings, options: DoctorOptions): Promise<DoctorCheck[]> {
  const client = store.client;
  const send: SendRequest = <T>(command: unknown): Promise<T> =>
    client.send(command as never, { abortSignal: AbortSignal.timeout(options.requestTimeoutMs) }) as Promise<T>;
  const bucket = s3.bucket;
  const where = s3.endpoint ?? `AWS region ${s3.region ?? process.env.AWS_REGION ?? 'us-east-1'}`;

  // Without the bucket no other check can run.
  try {
    await send(new HeadBucketCommand({ Bucket: bucket }));
  } catch (error) {
    return [bucketFailure(bucket, where, s3, error)];
  }
  const checks: DoctorCheck[] = [{ check: 'bucket', state: 'ok', message: `bucket ${bucket} at ${where} is reachable` }];
  checks.push(await checkWrite(plan, send, s3));
  checks.push(await checkVersioning(send, s3));
  checks.push(await checkObjectLock(plan, send, s3));
  checks.push(...(await checkLifecycle(plan, send, s3)));
  checks.push(await checkPublicAccess(send, s3));
  return checks;
}

function bucketFailure(bucket: string, where: string, s3: S3Settings, error: unknown): DoctorCheck {
  const status = statusOf(error);
  if (isNetworkError(error)) {
    return {
      check: 'bucket',
      state: 'fail',
      message: `endpoint ${where} is unreachable: ${describeError(error)}`,
      fix: s3.endpoint ? `check that ${s3.endpoint} is the S3 endpoint and that this host can reach it` : 'check the network path to S3 and the region',
    };
  }
  if (status === 404) {
    return {
      check: 'bucket',
      state: 'fail',
      message: `bucket ${bucket} does not exist at ${where}`,
      fix: `create it (aws s3api create-bucket --bucket ${bucket}${endpointFlag(s3)}) or correct the destination's s3.bucket`,
    };
  }
  if (status === 403) {
    return {
      check: 'bucket',
      state: 'fail',
      message: `access to bucket ${bucket} at ${where} was denied to the worker's credentials: ${describeError(error)}`,
      fix: 'grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the bucket to the worker, or correct AWS_* credentials',
    };
  }
  if (status === 301 || status === 400) {
    return {
      check: 'bucket',
      state: 'fail',
      message: `bucket ${bucket} rejected the request at ${where}: ${describeError(error)}`,
      fix: "set the destination's s3.region to the bucket's region",
    };
  }
  return { check: 'bucket', state: 'fail', message: `HeadBucket on ${bucket} at ${where} failed: ${describeError(error)}` };
}

/**
 * Puts and deletes a small probe object under the plan's folder. On a
 * versioned bucket it deletes the probe's version, so that no version or
 * delete marker stays behind, unless Object Lock retains that version.
 */
async function checkWrite(
  plan: Plan,
  send: SendRequest,
  s3: S3Settings,
): Promise<DoctorCheck> {
  const key = `${s3.prefix ? `${s3.prefix}/` : ''}${plan.name}/.doctor-${randomBytes(6).toString('hex')}`;
  let versionId: string | undefined;
  try {
    const put = await send<{ VersionId?: string }>(new PutObjectCommand({ Bucket: s3.bucket, Key: key, Body: 'opa-backup doctor probe\n' }));
    versionId = put.VersionId && put.VersionId !== 'null' ? put.VersionId : undefined;
  } catch (error) {
    return {
      check: 'write',
      state: 'fail',
      message: `put of probe object ${key} failed: ${describeError(error)}`,
      fix: `grant s3:PutObject on arn:aws:s3:::${s3.bucket}/${key.slice(0, key.lastIndexOf('/') + 1)}* to the worker`,
    };
  }
  try {
    await send(new DeleteObjectCommand({ Bucket: s3.bucket, Key: key, VersionId: versionId }));
    return { check: 'write', state: 'ok', message: `put and delete of probe object ${key} worked` };
  } catch (error) {
    if (versionId === undefined) {
      return {
        check: 'write',
        state: 'fail',
        message: `delete of probe object ${key} failed, so retention cannot delete backups: ${describeError(error)}`,
        fix: `grant s3:DeleteObject on the plan's keys to the worker, then delete ${key}`,
      };
    }
  }
  // The version is locked or s3:DeleteObjectVersion is not granted: a delete marker is what retention's deletes write too.
  try {
    await send(new DeleteObjectCommand({ Bucket: s3.bucket, Key: key }));
    return {
      check: 'write',
      state: 'ok',
      message: `put and delete of probe object ${key} worked; its version ${versionId} stays until Object Lock or a lifecycle rule removes it`,
    };
  } catch (error) {
    return {
      check: 'write',
      state: 'fail',
      message: `delete of probe object ${key} failed, so retention cannot delete backups: ${describeError(error)}`,
      fix: `grant s3:DeleteObject on the plan's keys to the worker, then delete ${key}`,
    };
  }
}

async function checkVersioning(send: SendRequest, s3: S3Settings): Promise<DoctorCheck> {
  let status: string | undefined;
  try {
    status = (await send<{ Status?: string }>(new GetBucketVersioningCommand({ Bucket: s3.bucket }))).Status;
  } catch (error) {
    return unreadableSetting('versioning', 'GetBucketVersioning', error);
  }
  if (status === 'Enabled') {
    return { check: 'versioning', state: 'ok', message: 'versioning is Enabled: an overwritten or deleted object can be recovered' };
  }
  return {
    check: 'versioning',
    state: 'warn',
    message: `versioning is ${status ?? 'not enabled'}: an overwritten or deleted backup object cannot be recovered`,
    fix: `aws s3api put-bucket-versioning --bucket ${s3.bucket} --versioning-configuration Status=Enabled${endpointFlag(s3)}`,
  };
}

interface ObjectLockSettings {
  ObjectLockConfiguration?: {
    ObjectLockEnabled?: string;
    Rule?: { DefaultRetention?: { Mode?: string; Days?: number; Years?: number } };
  };
}

async function checkObjectLock(
  plan: Plan,
  send: SendRequest,
  s3: S3Settings,
): Promise<DoctorCheck> {
  const horizon = retentionHorizonDays(plan);
  const keepWithinDays = plan.retention?.keepWithin ? Math.ceil(parseDuration(plan.retention.keepWithin) / DAY_MS) : undefined;
  const suggestedDays = keepWithinDays ?? (horizon !== undefined ? Math.max(1, Math.floor(horizon)) : 30);
  const configure =
    `aws s3api put-object-lock-configuration --bucket ${s3.bucket}${endpointFlag(s3)} --object-lock-configuration ` +
    `'{"ObjectLockEnabled":"Enabled","Rule":{"DefaultRetention":{"Mode":"COMPLIANCE","Days":${suggestedDays}}}}'`;

  let settings: ObjectLockSettings;
  try {
    settings = await send<ObjectLockSettings>(new GetObjectLockConfigurationCommand({ Bucket: s3.bucket }));
  } catch (error) {
    if ((error as AwsError)?.name === 'ObjectLockConfigurationNotFoundError') {
      return {
        check: 'object lock',
        state: 'warn',
        message: 'Object Lock is not enabled: credentials that can delete objects can delete every backup at once',
        fix: `enable versioning, then ${configure} (GOVERNANCE mode lets privileged users shorten it)`,
      };
    }
    return unreadableSetting('object lock', 'GetObjectLockConfiguration', error);
  }
  const configuration = settings.ObjectLockConfiguration;
  if (configuration?.ObjectLockEnabled !== 'Enabled') {
    return { check: 'object lock', state: 'warn', message: 'Object Lock is not enabled', fix: configure };
  }
  const retention = configuration.Rule?.DefaultRetention;
  if (!retention?.Mode) {
    return {
      check: 'object lock',
      state: 'warn',
      message: 'Object Lock is enabled without a default retention, so opa-backup\'s objects are not locked',
      fix: configure,
    };
  }
  const lockDays = retention.Days ?? (retention.Years ?? 0) * 365;
  if (!hasRetentionRules(plan.retention)) {
    return { check: 'object lock', state: 'ok', message: `Object Lock ${retention.Mode}; the plan has no retention rules, so retention deletes nothing` };
  }
  const described = `Object Lock ${retention.Mode} with a default retention of ${retention.Days !== undefined ? `${retention.Days} days` : `${retention.Years} years`}`;
  if (keepWithinDays !== undefined && lockDays < keepWithinDays) {
    return {
      check: 'object lock',
      state: 'warn',
      message: `${described} ends before keepWithin (${plan.retention!.keepWithin}): backups that retention keeps become deletable by anyone with delete rights`,
      fix: `raise the default retention to at least ${keepWithinDays} days`,
    };
  }
  if (horizon !== undefined && lockDays > horizon) {
    return {
      check: 'object lock',
      state: 'warn',
      message:
        `${described} outlasts the ${Math.ceil(horizon)} days the retention rules keep backups: deleting a locked object version fails, ` +
        `so retention's deletes only add delete markers and the locked versions stay, and are billed, until their retention ends`,
      fix: `lower the default retention to at most ${Math.floor(horizon)} days, or keep backups longer in the plan's retention rules`,
    };
  }
  if (horizon === undefined) {
    return {
      check: 'object lock',
      state: 'ok',
      message: `${described}. keepLast bounds no age, so check that keepLast backups span at least ${lockDays} days, or retention's deletes only add delete markers`,
    };
  }
  return { check: 'object lock', state: 'ok', message: `${described}, within what the retention rules keep` };
}

/** Returns the key prefix a lifecycle rule filters on; rules with tag filters do not apply to opa-backup's untagged objects. */
function rulePrefix(rule: LifecycleRule): string | undefined {
  const filter = rule.Filter;
  if (filter?.Tag || (filter?.And?.Tags?.length ?? 0) > 0) return undefined;
  return filter?.Prefix ?? filter?.And?.Prefix ?? (rule as { Prefix?: string }).Prefix ?? '';
}

async function checkLifecycle(
  plan: Plan,
  send: SendRequest,
  s3: S3Settings,
): Promise<DoctorCheck[]> {
  const planPrefix = `${s3.prefix ? `${s3.prefix}/` : ''}${plan.name}/`;
  const abortRule =
    `add a rule to the bucket's lifecycle configuration: {"ID":"abort-incomplete-uploads","Status":"Enabled",` +
    `"Filter":{"Prefix":"${planPrefix}"},"AbortIncompleteMultipartUpload":{"DaysAfterInitiation":7}} ` +
    `(aws s3api put-bucket-lifecycle-configuration --bucket ${s3.bucket}${endpointFlag(s3)} --lifecycle-configuration file://lifecycle.json)`;
  let rules: LifecycleRule[];
  try {
    rules = (await send<{ Rules?: LifecycleRule[] }>(new GetBucketLifecycleConfigurationCommand({ Bucket: s3.bucket }))).Rules ?? [];
  } catch (error) {
    if ((error as AwsError)?.name === 'NoSuchLifecycleConfiguration') {
      rules = [];
    } else {
      const unknown = unreadableSetting('lifecycle', 'GetBucketLifecycleConfiguration', error);
      return [unknown];
    }
  }

  const covering = rules.filter((rule) => {
    if (rule.Status !== 'Enabled') return false;
    const prefix = rulePrefix(rule);
    return prefix !== undefined && (planPrefix.startsWith(prefix) || prefix.startsWith(planPrefix));
  });
  const checks: DoctorCheck[] = [];

  const expiring = covering.filter((rule) => rule.Expiration?.Days !== undefined || rule.Expiration?.Date !== undefined);
  const archiving = covering.filter((rule) => (rule.Transitions ?? []).some((transition) => /GLACIER|DEEP_ARCHIVE/.test(transition.StorageClass ?? '')));
  for (const rule of expiring) {
    const when = rule.Expiration!.Days !== undefined ? `after ${rule.Expiration!.Days} days` : `on ${rule.Expiration!.Date!.toISOString()}`;
    checks.push({
      check: 'lifecycle expiration',
      state: 'warn',
      message:
        `lifecycle rule ${rule.ID ?? '(no ID)'} expires objects under "${rulePrefix(rule)}" ${when}: it deletes backups behind retention's back, ` +
        'including the newest verified backup and backups that kept backups store artifacts in',
      fix: `remove the Expiration of rule ${rule.ID ?? '(no ID)'} or narrow its filter so it does not cover ${planPrefix}, and set retention rules in the plan`,
    });
  }
  for (const rule of archiving) {
    checks.push({
      check: 'lifecycle expiration',
      state: 'warn',
      message: `lifecycle rule ${rule.ID ?? '(no ID)'} moves objects under "${rulePrefix(rule)}" to an archive storage class: verify, drills and restores cannot read them without a restore request`,
      fix: `remove the transition of rule ${rule.ID ?? '(no ID)'} for ${planPrefix}`,
    });
  }
  if (expiring.length === 0 && archiving.length === 0) {
    checks.push({ check: 'lifecycle expiration', state: 'ok', message: `no lifecycle rule expires or archives objects under ${planPrefix}` });
  }

  const aborting = covering.find((rule) => rule.AbortIncompleteMultipartUpload?.DaysAfterInitiation !== undefined);
  if (aborting) {
    checks.push({
      check: 'lifecycle uploads',
      state: 'ok',
      message: `lifecycle rule ${aborting.ID ?? '(no ID)'} aborts incomplete multipart uploads after ${aborting.AbortIncompleteMultipartUpload!.DaysAfterInitiation} days`,
    });
  } else {
    checks.push({
      check: 'lifecycle uploads',
      state: 'warn',
      message: `no lifecycle rule aborts incomplete multipart uploads under ${planPrefix}: the parts of an upload that a crashed worker left are billed until retention aborts them`,
      fix: abortRule,
    });
  }
  return checks;
}

interface PublicAccessSettings {
  PublicAccessBlockConfiguration?: {
    BlockPublicAcls?: boolean;
    IgnorePublicAcls?: boolean;
    BlockPublicPolicy?: boolean;
    RestrictPublicBuckets?: boolean;
  };
}

/** Checks that the bucket's public access block turns all four settings on, so no ACL or policy can publish a backup. */
async function checkPublicAccess(send: SendRequest, s3: S3Settings): Promise<DoctorCheck> {
  const fix =
    `aws s3api put-public-access-block --bucket ${s3.bucket}${endpointFlag(s3)} --public-access-block-configuration ` +
    'BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true';
  let settings: PublicAccessSettings;
  try {
    settings = await send<PublicAccessSettings>(new GetPublicAccessBlockCommand({ Bucket: s3.bucket }));
  } catch (error) {
    if ((error as AwsError)?.name === 'NoSuchPublicAccessBlockConfiguration') {
      return { check: 'public access', state: 'warn', message: 'the bucket has no public access block: an ACL or a bucket policy can make backups public', fix };
    }
    return unreadableSetting('public access', 'GetPublicAccessBlock', error);
  }
  const configuration = settings.PublicAccessBlockConfiguration ?? {};
  const off = (['BlockPublicAcls', 'IgnorePublicAcls', 'BlockPublicPolicy', 'RestrictPublicBuckets'] as const).filter((field) => configuration[field] !== true);
  if (off.length > 0) {
    return { check: 'public access', state: 'warn', message: `the public access block leaves ${off.join(', ')} off`, fix };
  }
  return { check: 'public access', state: 'ok', message: 'the public access block turns every setting on' };
}

// ---------------------------------------------------------------- Local

/** Returns the folder itself when it exists, else its nearest existing ancestor. */
function nearestExisting(folder: string): string {
  let current = path.resolve(folder);
  for (;;) {
    try {
      statSync(current);
      return current;
    } catch {
      const parent = path.dirname(current);
      if (parent === current) return current;
      current = parent;
    }
  }
}

async function checkLocal(plan: Plan, root: string, options: DoctorOptions): Promise<DoctorCheck[]> {
  const checks: DoctorCheck[] = [];
  const existing = nearestExisting(root);
  const exists = existing === path.resolve(root);
  if (exists && !statSync(existing).isDirectory()) {
    return [{ check: 'folder', state: 'fail', message: `${root} exists but is not a folder`, fix: `remove ${root} or point local.path at a folder` }];
  }
  if (!exists) {
    try {
      accessSync(existing, constants.W_OK | constants.X_OK);
      checks.push({ check: 'folder', state: 'ok', message: `${root} does not exist yet; the first backup creates it in ${existing}` });
    } catch {
      return [
        {
          check: 'folder',
          state: 'fail',
          message: `${root} does not exist and ${existing} is not writable, so it cannot be created`,
          fix: `mkdir -p ${root} and give the worker's user write access to it`,
        },
      ];
    }
  } else {
    checks.push({ check: 'folder', state: 'ok', message: `${root} exists` });
    checks.push(await checkLocalWrite(plan, root));
  }

  const space = statfsSync(existing);
  const free = space.bavail * space.bsize;
  const total = space.blocks * space.bsize;
  const freeText = `${formatGiB(free)} free of ${formatGiB(total)}`;
  if (free < options.minFreeBytes) {
    checks.push({
      check: 'free space',
      state: 'warn',
      message: `${freeText} on the filesystem of ${existing}, under the ${formatGiB(options.minFreeBytes)} threshold`,
      fix: 'free space, move the destination to a larger filesystem, or keep fewer backups with retention rules',
    });
  } else {
    checks.push({ check: 'free space', state: 'ok', message: `${freeText} on the filesystem of ${existing}` });
  }
  return checks;
}

async function checkLocalWrite(plan: Plan, root: string): Promise<DoctorCheck> {
  const store = new LocalBlobStore(root);
  const key = `${plan.name}/.doctor-${randomBytes(6).toString('hex')}`;
  try {
    await store.put(key, Readable.from([Buffer.from('opa-backup doctor probe\n')]));
    await store.delete(key);
    return { check: 'write', state: 'ok', message: `write and delete of probe file ${path.join(root, key)} worked` };
  } catch (error) {
    return {
      check: 'write',
      state: 'fail',
      message: `write or delete of probe file ${path.join(root, key)} failed: ${(error as Error).message}`,
      fix: `give the worker's user write access to ${path.join(root, plan.name)} (and to ${root} if that folder does not exist yet)`,
    };
  }
}

// ---------------------------------------------------------------- Separation

/**
 * Adds a "separation" check to each destination when the plan has more than
 * one: local folders on one filesystem, or S3 destinations in one bucket,
 * fail together, so a replica there protects against little.
 */
function addSeparationChecks(destinations: Array<{ name: string; destination: Destination }>, results: DestinationDiagnosis[]): void {
  if (destinations.length < 2) return;
  const identities = destinations.map(({ destination }) => {
    if (destination.s3) return `s3 ${destination.s3.endpoint ?? 'aws'} ${destination.s3.bucket}`;
    try {
      return `filesystem ${statSync(nearestExisting(destination.local!.path)).dev}`;
    } catch {
      return undefined;
    }
  });
  destinations.forEach(({ name, destination }, index) => {
    const identity = identities[index];
    if (identity === undefined) return;
    const shared = destinations.filter((_, other) => other !== index && identities[other] === identity).map((other) => other.name);
    if (shared.length === 0) {
      const what = destination.s3 ? 'bucket' : 'filesystem';
      results[index].checks.push({ check: 'separation', state: 'ok', message: `no other destination of the plan is on this ${what}` });
      return;
    }
    const message = destination.s3
      ? `same bucket as destination ${shared.join(', ')}: losing or misconfiguring the bucket loses both copies`
      : `same filesystem as destination ${shared.join(', ')} (device ${identity.split(' ')[1]}): a disk failure or a full disk loses both copies`;
    results[index].checks.push({
      check: 'separation',
      state: 'warn',
      message,
      fix: destination.s3 ? `put replica ${name === PRIMARY_DESTINATION ? shared[0] : name} in another bucket, ideally in another region or account` : 'put one of them on another disk or host',
    });
  });
}

// ---------------------------------------------------------------- Output

/** Prints the report as one table per destination. */
export function printDoctorReport(report: DoctorReport, print: (line: string) => void = console.log): void {
  print(`doctor of plan ${report.plan}`);
  for (const destination of report.destinations) {
    print('');
    print(`${destination.name}: ${destination.destination}`);
    const width = Math.max(5, ...destination.checks.map((check) => check.check.length));
    print(`  ${'CHECK'.padEnd(width)}  STATE    RESULT`);
    for (const check of destination.checks) {
      print(`  ${check.check.padEnd(width)}  ${check.state.padEnd(7)}  ${check.message}`);
      if (check.fix) print(`  ${''.padEnd(width)}           fix: ${check.fix}`);
    }
  }
  const counts = { ok: 0, warn: 0, fail: 0, unknown: 0 };
  for (const destination of report.destinations) for (const check of destination.checks) counts[check.state]++;
  print('');
  print(`${counts.ok} ok, ${counts.warn} warn, ${counts.fail} fail, ${counts.unknown} unknown`);
  const failed = report.destinations.flatMap((destination) =>
    destination.checks.filter((check) => check.state === 'fail').map((check) => `${destination.name} (${check.check})`),
  );
  if (failed.length > 0) print(`failed: ${failed.join(', ')}`);
}

async function doctorCommand(options: { plan: string; json?: boolean; minFree: string; timeout: string }): Promise<number> {
  let plan: Plan;
  let settings: DoctorOptions;
  try {
    plan = loadPlanFile(options.plan);
    settings = { minFreeBytes: parseSize(options.minFree), requestTimeoutMs: parseDuration(options.timeout) };
  } catch (error) {
    if (error instanceof PlanError) throw new CommandError(`invalid plan:\n${error.message}`, EXIT_USAGE);
    throw new CommandError((error as Error).message, EXIT_USAGE);
  }
  const report = await diagnosePlan(plan, settings);
  if (options.json) console.log(JSON.stringify(report, null, 2));
  else printDoctorReport(report);
  return report.failed ? EXIT_FAILED : EXIT_OK;
}

/** Adds `doctor --plan FILE [--json] [--min-free SIZE] [--timeout DURATION]` to the program. */
export function addDoctorCommand(program: Command): void {
  program
    .command('doctor')
    .description("check each destination of the plan (reachability, writes, versioning, Object Lock, lifecycle, free space) and say what to fix; exits 1 when a check fails")
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--json', 'print the report as JSON')
    .option('--min-free <size>', 'free space under which a local destination gets a warning, such as 500MiB or 20GiB', DEFAULT_MIN_FREE)
    .option('--timeout <duration>', 'time each S3 request gets, such as 10s', DEFAULT_REQUEST_TIMEOUT)
    .action(async (options) => {
      process.exitCode = await runCommand(() => doctorCommand(options));
    });
}
