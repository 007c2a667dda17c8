// Backup plan schema. A plan names what to back up, where to store it and how
// the steps are timed. Every object is strict: an unknown field is an error,
// because a silently ignored typo (say "retension") is a policy that never
// applies.
import { z } from 'zod';
import { parseDuration } from './retention';

const NAME_PATTERN = /^[a-z0-9][a-z0-9_-]{0,62}$/;
const DURATION_PATTERN = /^[1-9]\d*(ms|s|m|h|d)$/;
const SECRET_REFERENCE_PATTERN = /^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$/;

const name = z
  .string()
  .regex(NAME_PATTERN, 'must be 1 to 63 characters of a-z, 0-9, "-" or "_", starting with a letter or digit');

const duration = z
  .string()
  .regex(DURATION_PATTERN, 'must be a positive duration such as "500ms", "30s", "10m", "2h" or "7d"');

/** A reference to a secret, resolved on the worker when an activity needs it. */
export const secretReference = z
  .string()
  .regex(
    SECRET_REFERENCE_PATTERN,
    'must be a secret reference such as "env:OPA_TOKEN" or "file:/run/secrets/opa-token"; plans never hold secret values',
  );

const tlsOptions = z
  .object({
    /** PEM file of the CA that signed the server certificate. */
    caFile: z.string().min(1).optional(),
    /** PEM client certificate for mutual TLS. */
    certFile: z.string().min(1).optional(),
    /** PEM client key for mutual TLS, by reference because it is a secret. */
    key: secretReference.optional(),
    /** Accept any server certificate. Only for test servers. @default false */
    insecureSkipVerify: z.boolean().optional(),
  })
  .strict();

const probe = z
  .object({
    /** Document path under /v1/data, with "/" between segments: "app/authz/allow". */
    path: z.string().regex(/^[^/].*$/, 'must be a path under /v1/data without a leading "/", such as "app/authz/allow"'),
    /** The input document sent with the query. */
    input: z.unknown().optional(),
    /** The input as JSON text, for numbers YAML and JavaScript cannot hold exactly (beyond 2^53). */
    inputJson: z
      .string()
      .refine(
        (text) => {
          try {
            JSON.parse(text);
            return true;
          } catch {
            return false;
          }
        },
        { message: 'must be valid JSON text' },
      )
      .optional(),
  })
  .strict()
  .refine((value) => value.input === undefined || value.inputJson === undefined, {
    message: 'set either "input" or "inputJson", not both',
  });

const opaSource = z
  .object({
    name,
    /** Base URL of the OPA REST API, such as http://127.0.0.1:8181. */
    url: z
      .url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' })
      .refine((value) => !/^https?:\/\/[^/]*@/.test(value), {
        message: 'must not contain credentials (user:password@); use token: env:NAME for OPA tokens',
      }),
    /** Bearer token for OPA's token authentication. */
    token: secretReference.optional(),
    tls: tlsOptions.optional(),
    /** Decisions recorded at snapshot time and replayed by restore drills. */
    probes: z.array(probe).optional(),
  })
  .strict();

const postgresSource = z
  .object({
    name,
    /** postgres://USER@HOST:PORT/DATABASE[?sslmode=...]; the database is the one listed from. */
    url: z
      .string()
      .regex(/^postgres(ql)?:\/\/[^:@/]+@[^/]+/, 'must be a URL such as postgres://backup@db.internal:5432/postgres')
      .refine((value) => !/^postgres(ql)?:\/\/[^@/]*:[^@/]*@/.test(value), {
        message: 'must not contain a password; use password: env:NAME',
      }),
    /** Password of the URL's user. */
    password: secretReference.optional(),
    /** Databases to dump; all databases that accept connections, templates excluded, when absent. */
    databases: z.array(z.string().min(1)).min(1).optional(),
    /** Also dump roles and tablespaces with pg_dumpall --globals-only. @default true */
    globals: z.boolean().optional(),
  })
  .strict();

const redisSource = z
  .object({
    name,
    /** redis://[USER@]HOST[:PORT] of one server (a master or a replica), or of any node of a cluster when `cluster` is true. */
    url: z
      .string()
      .regex(/^redis:\/\/[^/]+/, 'must be a URL such as redis://cache.internal:6379 (rediss:// is not supported yet)')
      .refine((value) => !/^redis:\/\/[^@/]*:[^@/]*@/.test(value), { message: 'must not contain a password; use password: env:NAME' }),
    password: secretReference.optional(),
    /**
     * "rdb": a point-in-time RDB snapshot over the replication protocol.
     * "keys": SCAN + DUMP + PTTL, for servers that refuse SYNC; not point-in-time. @default "rdb"
     */
    mode: z.enum(['rdb', 'keys']).optional(),
    /**
     * True for a Redis Cluster: `url` is a seed node, and every master the
     * cluster lists is backed up in its own activity. @default false
     */
    cluster: z.boolean().optional(),
  })
  .strict();

const bundleSource = z
  .object({
    name,
    /**
     * Location of the bundle: an http:// or https:// URL of a bundle
     * service, or s3://BUCKET/KEY of an object in an S3-compatible bucket.
     */
    url: z
      .string()
      .regex(/^(https?:\/\/[^/]+|s3:\/\/[^/]+\/.+)/, 'must be an http:// or https:// URL, or s3://BUCKET/KEY')
      .refine((value) => !/^[a-z0-9]+:\/\/[^/]*@/.test(value), {
        message: 'must not contain credentials (user:password@); use token: env:NAME',
      }),
    /** Bearer token of the bundle service (HTTP only). */
    token: secretReference.optional(),
    /** TLS options of an https:// URL: CA, client certificate and key. */
    tls: tlsOptions.optional(),
    /** Endpoint and region of an s3:// URL; credentials come from the AWS SDK's default chain. */
    s3: z
      .object({
        endpoint: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }).optional(),
        region: z.string().min(1).optional(),
        /** @default true when endpoint is set */
        forcePathStyle: z.boolean().optional(),
      })
      .strict()
      .optional(),
    /**
     * Key that checks the bundle's .signatures.json: a PEM public key (RS*, PS*
     * and ES* signatures) or an HMAC secret (HS* signatures), by reference.
     */
    verificationKey: secretReference.optional(),
    /** The `scope` claim signatures must carry, as OPA's --scope checks it. @default "" (no scope) */
    verificationScope: z.string().optional(),
  })
  .strict()
  .superRefine((value, context) => {
    const s3 = value.url.startsWith('s3://');
    if (s3 && value.token !== undefined) {
      context.addIssue({ code: 'custom', path: ['token'], message: 'applies to http(s):// URLs only; s3:// URLs use the AWS credentials of the worker' });
    }
    if (s3 && value.tls !== undefined) {
      context.addIssue({ code: 'custom', path: ['tls'], message: 'applies to https:// URLs only; for s3:// URLs set s3.endpoint' });
    }
    if (!s3 && value.s3 !== undefined) {
      context.addIssue({ code: 'custom', path: ['s3'], message: 'applies to s3:// URLs only' });
    }
  });

const gitSource = z
  .object({
    name,
    /** Repository: an absolute local path, file://, http(s):// or ssh:// URL. */
    url: z
      .string()
      .regex(/^(\/|file:\/\/|https?:\/\/|ssh:\/\/)/, 'must be an absolute path or a file://, https:// or ssh:// URL')
      .refine((value) => !/^[a-z]+:\/\/[^/@]*:[^/@]*@/.test(value), {
        message: 'must not contain a password or token; use token: env:NAME (https) or sshKey: file:PATH (ssh)',
      }),
    /** Token for http(s):// URLs, sent as an Authorization header through git's http.extraHeader. */
    token: secretReference.optional(),
    /** User name for the token: Basic authentication with it, Bearer without it. */
    username: z.string().min(1).optional(),
    /** Private SSH key for ssh:// URLs, by reference. */
    sshKey: secretReference.optional(),
    /** known_hosts file for ssh:// URLs; host keys are checked strictly when it is set. */
    knownHostsFile: z.string().min(1).optional(),
  })
  .strict();

const localDestination = z
  .object({
    /** Folder that contains the backups; relative paths start at the plan file's folder. */
    path: z.string().min(1),
  })
  .strict();

const s3Destination = z
  .object({
    bucket: z.string().min(3).max(63),
    /** Key prefix for every object of this plan, without a trailing "/". */
    prefix: z.string().regex(/^[^/](.*[^/])?$/, 'must not start or end with "/"').optional(),
    /** Endpoint of an S3-compatible service; the AWS endpoint for the region when absent. */
    endpoint: z.url({ protocol: /^https?$/, error: 'must be an http:// or https:// URL' }).optional(),
    region: z.string().min(1).optional(),
    /** Path-style addressing (http://host/bucket/key), which most S3-compatible servers need. @default true when endpoint is set */
    forcePathStyle: z.boolean().optional(),
  })
  .strict();

const destination = z
  .object({
    local: localDestination.optional(),
    s3: s3Destination.optional(),
  })
  .strict()
  .superRefine((value, context) => {
    const kinds = [value.local, value.s3].filter((kind) => kind !== undefined).length;
    if (kinds !== 1) {
      context.addIssue({ code: 'custom', message: 'must set exactly one of "local" or "s3"' });
    }
  });

/**
 * Returns a key that is equal for two destinations that store in the same
 * place. For a local path, "." and ".." segments and repeated or trailing
 * slashes are resolved; for S3, the key is the endpoint, bucket and prefix.
 * NOTE: symbolic links are not followed, because validation reads no file
 * system, so a link to another destination's folder passes.
 */
function destinationLocation(destination: { local?: { path: string }; s3?: { bucket: string; prefix?: string; endpoint?: string; region?: string } }): string {
  if (destination.local) {
    const segments: string[] = [];
    destination.local.path.split('/').forEach((segment, index) => {
      if (segment === '..' && segments.length > 0 && segments[segments.length - 1] !== '..' && segments[segments.length - 1] !== '') segments.pop();
      else if (segment !== '.' && (segment !== '' || index === 0)) segments.push(segment);
    });
    return `local:${segments.join('/') || '/'}`;
  }
  const s3 = destination.s3;
  if (!s3) return 'none';
  const endpoint = s3.endpoint ? s3.endpoint.replace(/\/+$/, '').toLowerCase() : `aws:${s3.region ?? ''}`;
  return `s3:${endpoint}|${s3.bucket}|${s3.prefix ?? ''}`;
}

/** Name of the plan's main destination in results and listings; replicas carry their own names. */
export const PRIMARY_DESTINATION = 'primary';

const replica = z
  .object({
    /** Name of the replica in results and listings, such as "eu-west". */
    name: name.refine((value) => value !== PRIMARY_DESTINATION, { message: `"${PRIMARY_DESTINATION}" names the plan's destination; choose another name` }),
    local: localDestination.optional(),
    s3: s3Destination.optional(),
  })
  .strict()
  .superRefine((value, context) => {
    const kinds = [value.local, value.s3].filter((kind) => kind !== undefined).length;
    if (kinds !== 1) {
      context.addIssue({ code: 'custom', message: 'must set exactly one of "local" or "s3"' });
    }
  });

const CRON_FIELDS: ReadonlyArray<{ label: string; min: number; max: number }> = [
  { label: 'minute', min: 0, max: 59 },
  { label: 'hour', min: 0, max: 23 },
  { label: 'day of month', min: 1, max: 31 },
  { label: 'month', min: 1, max: 12 },
  { label: 'day of week', min: 0, max: 7 },
];

const CRON_MACROS = new Set(['@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly']);

/** One comma-separated part of a cron field: "*", "5" or "5-9", each with an optional "/step". */
const CRON_PART = /^(\*|(\d+)(?:-(\d+))?)(?:\/(\d+))?$/;

/** Returns why a five-field cron expression is invalid, or undefined when it is valid. */
export function cronProblem(expression: string): string | undefined {
  const trimmed = expression.trim();
  if (CRON_MACROS.has(trimmed)) return undefined;
  const fields = trimmed.split(/\s+/);
  if (fields.length !== 5) {
    return `"${expression}" has ${fields.length} fields; a cron expression has 5 (minute hour day-of-month month day-of-week)`;
  }
  for (let index = 0; index < 5; index++) {
    const { label, min, max } = CRON_FIELDS[index];
    for (const part of fields[index].split(',')) {
      const match = CRON_PART.exec(part);
      if (!match) return `"${part}" is not a valid ${label} field in "${expression}"`;
      for (const number of [match[2], match[3]]) {
        if (number !== undefined && (Number(number) < min || Number(number) > max)) {
          return `${number} is not a valid ${label} in "${expression}"; it must be ${min} to ${max}`;
        }
      }
      if (match[4] !== undefined && Number(match[4]) === 0) return `step 0 in "${part}" of "${expression}" is invalid`;
    }
  }
  // With day-of-week "*", a day-of-month that no chosen month has never fires.
  if (fields[4] === '*') {
    const days = expandCronField(fields[2], 1, 31);
    const months = expandCronField(fields[3], 1, 12);
    const longest = Math.max(...months.map((month) => DAYS_IN_MONTH[month - 1]));
    if (Math.min(...days) > longest) {
      return `"${expression}" never runs: no chosen month has day ${Math.min(...days)}; check the day-of-month and month fields`;
    }
  }
  return undefined;
}

/** Days of each month, February with 29 for leap years. */
const DAYS_IN_MONTH = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** Returns the values a checked cron field selects. */
function expandCronField(field: string, min: number, max: number): number[] {
  const values = new Set<number>();
  for (const part of field.split(',')) {
    const match = CRON_PART.exec(part)!;
    const step = match[4] !== undefined ? Number(match[4]) : 1;
    let start = min;
    let end = max;
    if (match[1] !== '*') {
      start = Number(match[2]);
      // "5" is one value, "5-9" a range, and "5/10" runs from 5 to the maximum.
      if (match[3] !== undefined) end = Number(match[3]);
      else if (match[4] === undefined) end = start;
    }
    for (let value = start; value <= end; value += step) values.add(value);
  }
  return [...values];
}

/** Returns true when the runtime's time zone database has the IANA name. */
export function isKnownTimeZone(zone: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: zone });
    return true;
  } catch {
    return false;
  }
}

const cron = z.string().superRefine((value, context) => {
  const problem = cronProblem(value);
  if (problem) context.addIssue({ code: 'custom', message: problem });
});

const timeZone = z.string().superRefine((zone, context) => {
  if (!isKnownTimeZone(zone)) {
    context.addIssue({ code: 'custom', message: `"${zone}" is not a known IANA time zone; use a name such as "UTC" or "Europe/Berlin"` });
  }
});

/** Temporal's schedule overlap policies, spelled as in the plan. */
export const OVERLAP_POLICIES = ['skip', 'bufferOne', 'bufferAll', 'cancelOther', 'terminateOther', 'allowAll'] as const;

const timingFields = {
  /** Cron expression, evaluated in the schedule's timezone. */
  cron: cron.optional(),
  /** Fixed interval between runs, such as "6h"; exclusive with cron. */
  every: duration.optional(),
  /** Phase of `every` from the Unix epoch, such as "30m" with every "6h" for 00:30, 06:30, ... UTC. */
  offset: duration.optional(),
  /** Each run starts up to this much later, at random, so that plans sharing a cron do not start at once. */
  jitter: duration.optional(),
  /** Runs missed while Temporal was unavailable are started when it returns if they are at most this old. @default "1h" */
  catchupWindow: duration.optional(),
  /** Policy for a run that is due while the previous one still runs. @default "skip" */
  overlap: z
    .enum(OVERLAP_POLICIES, { error: `must be one of ${OVERLAP_POLICIES.map((policy) => `"${policy}"`).join(', ')}` })
    .optional(),
  /** Create the schedule paused. @default false */
  paused: z.boolean().optional(),
};

function checkTiming(value: { cron?: string; every?: string; offset?: string }, context: z.RefinementCtx): void {
  if ((value.cron === undefined) === (value.every === undefined)) {
    context.addIssue({ code: 'custom', message: 'must set exactly one of "cron" (such as "0 2 * * *") or "every" (such as "6h")' });
  }
  if (value.offset !== undefined && value.every === undefined) {
    context.addIssue({ code: 'custom', path: ['offset'], message: 'is only meaningful with "every"; remove it or use "every"' });
  }
  if (value.offset !== undefined && value.every !== undefined && DURATION_PATTERN.test(value.offset) && DURATION_PATTERN.test(value.every)) {
    if (parseDuration(value.offset) >= parseDuration(value.every)) {
      context.addIssue({
        code: 'custom',
        path: ['offset'],
        message: `"${value.offset}" must be shorter than every "${value.every}"; an offset is the phase within one interval`,
      });
    }
  }
}

const timing = z.object(timingFields).strict().superRefine(checkTiming);

const drillTiming = z
  .object({
    ...timingFields,
    /** Backup the drill restores: "latest", "random" or a backup id. @default "latest" */
    backup: z
      .string()
      .regex(/^(latest|random|\d{8}T\d{6}Z-[0-9a-z]{1,32})$/, 'must be "latest", "random" or a backup id such as "20261204T194512Z-01a2429e"')
      .optional(),
    /** With backup "random": pick among the backups of the last N days. */
    randomWithinDays: z.int().min(1).optional(),
  })
  .strict()
  .superRefine(checkTiming)
  .superRefine((value, context) => {
    if (value.randomWithinDays !== undefined && value.backup !== 'random') {
      context.addIssue({ code: 'custom', path: ['randomWithinDays'], message: 'is only meaningful with backup: random' });
    }
  });

/**
 * Accepts a cron expression as a string, or a mapping with cron or every and
 * the other schedule options. The value's type picks the schema, so an error
 * inside a mapping is reported at its own field, where z.union reported only
 * that no option matched.
 */
function cronOrTiming<T extends z.ZodType>(spec: T) {
  return z.custom<string | z.output<T>>(() => true).superRefine((value, context) => {
    if (typeof value === 'string') {
      const problem = cronProblem(value);
      if (problem) context.addIssue({ code: 'custom', message: problem });
      return;
    }
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      context.addIssue({
        code: 'custom',
        message: 'must be a cron expression such as "0 2 * * *" or a mapping such as { every: 6h, jitter: 10m }',
      });
      return;
    }
    const result = spec.safeParse(value, { reportInput: true });
    if (!result.success) for (const issue of result.error.issues) context.addIssue(issue as never);
  });
}

const schedule = z
  .object({
    /** When backups run. */
    backup: cronOrTiming(timing).optional(),
    /** When restore drills run. */
    drill: cronOrTiming(drillTiming).optional(),
    /** When retention runs; only used when the plan has retention rules. @default "@daily" */
    retention: cronOrTiming(timing).optional(),
    /** IANA time zone of cron expressions and of retention's calendar periods. @default "UTC" */
    timezone: timeZone.optional(),
  })
  .strict();

/** Kinds of runs a plan schedules, each with its own Temporal schedule. */
export type ScheduleKind = 'backup' | 'drill' | 'retention';

/**
 * Returns the fixed workflow id of a plan's backups, drills or retention
 * runs. Temporal runs at most one open workflow per id, so a manual and a
 * scheduled run of the same kind never overlap.
 */
export function planWorkflowId(planName: string, kind: ScheduleKind): string {
  return `opa-backup/${planName}/${kind}`;
}

/** Age limits that `opa-backup status` and healthWorkflow check; a check without a limit reports ages only. */
const health = z
  .object({
    /** Maximum age of the newest complete backup, and of each source's newest stored artifact. */
    maxBackupAge: duration.optional(),
    /** Maximum age of the newest drill report with outcome "passed". */
    maxDrillAge: duration.optional(),
    /** Maximum time since each OPA last fetched each of its bundles, as OPA's status API reports it. */
    maxBundleAge: duration.optional(),
  })
  .strict();

// Rules as restic's `forget` names them; docs/design.md lists where they differ.
const keepCount = z.int().min(1, 'must be a whole number of at least 1; remove the rule to keep no backups by it');

const retention = z
  .object({
    /** Keep the N newest backups. */
    keepLast: keepCount.optional(),
    /** Keep the newest backup of each of the N newest hours that have one, in schedule.timezone. */
    keepHourly: keepCount.optional(),
    keepDaily: keepCount.optional(),
    /** ISO weeks, Monday to Sunday. */
    keepWeekly: keepCount.optional(),
    keepMonthly: keepCount.optional(),
    keepYearly: keepCount.optional(),
    /** Keep every backup taken within this duration before the newest backup. */
    keepWithin: duration.optional(),
    /** Age after which a folder without manifest.json, or an unfinished upload, counts as abandoned and is removed. @default "24h" */
    leftoverGrace: duration.optional(),
  })
  .strict();

/** An age X25519 recipient: "age1" and 58 bech32 characters. */
const ageRecipient = z
  .string()
  .regex(/^age1[02-9ac-hj-np-z]{58}$/, 'must be an age X25519 recipient (a public key "age1…" as age-keygen prints it)');

const encryption = z
  .object({
    /** Public keys every artifact is encrypted to. A worker holding only these cannot read backups. */
    recipients: z.array(ageRecipient).min(1).optional(),
    /** A passphrase by reference, for the age scrypt recipient; exclusive with recipients. */
    passphrase: secretReference.optional(),
    /** Private key (an age identity file) by reference, for verify and restore drills. */
    identity: secretReference.optional(),
    /** Store artifacts in plaintext. Must be set explicitly: a plan never falls back to plaintext. */
    unencrypted: z.literal(true).optional(),
  })
  .strict()
  .superRefine((value, context) => {
    const modes = [value.recipients !== undefined, value.passphrase !== undefined, value.unencrypted === true].filter(Boolean).length;
    if (modes !== 1) {
      context.addIssue({
        code: 'custom',
        message:
          'must set exactly one of "recipients" (age1… public keys), "passphrase" (a secret reference) or "unencrypted: true"',
      });
    }
    if (value.unencrypted && value.identity !== undefined) {
      context.addIssue({ code: 'custom', path: ['identity'], message: 'is only meaningful for encrypted backups; remove it or remove "unencrypted"' });
    }
  });

const compression = z
  .object({
    /** gzip level for artifacts whose format is not compressed already (RDB, keys streams, SQL): 1 fastest, 9 smallest, 0 off. @default 1 */
    level: z.int().min(0).max(9).optional(),
  })
  .strict();

const signing = z
  .object({
    /** Ed25519 private key (PKCS#8 PEM) by reference; the worker signs each manifest with it. */
    key: secretReference.optional(),
    /** Ed25519 public key (SPKI PEM) file; verify checks manifests with it and requires a signature. */
    publicKeyFile: z.string().min(1).optional(),
  })
  .strict()
  .refine((value) => value.key !== undefined || value.publicKeyFile !== undefined, {
    message: 'must set "key" (to sign manifests) or "publicKeyFile" (to check them), or both',
  });

const retryPolicy = z
  .object({
    /** Delay before the first retry. @default "1s" */
    initialInterval: duration.optional(),
    /** Upper bound of the exponential backoff. @default "30s" */
    maximumInterval: duration.optional(),
    /** Attempts including the first; 0 means unlimited. @default 10 */
    maximumAttempts: z.int().min(0).optional(),
  })
  .strict();

const stepSettings = z
  .object({
    /** Limit for one attempt of the step. @default "10m" */
    attemptTimeout: duration.optional(),
    /** An attempt that sends no heartbeat for this long is retried, on another worker if its own died. @default "30s" */
    heartbeatTimeout: duration.optional(),
    retry: retryPolicy.optional(),
  })
  .strict();

const settings = z
  .object({
    /** Timeouts and retries of each OPA snapshot. */
    opaSnapshot: stepSettings.optional(),
    /** Timeouts and retries of each PostgreSQL database dump. @default attemptTimeout "2h" */
    postgresDump: stepSettings.optional(),
    /** Timeouts and retries of each Redis dump. @default attemptTimeout "2h" */
    redisDump: stepSettings.optional(),
    /** Timeouts and retries of each bundle download. @default attemptTimeout "10m" */
    bundleFetch: stepSettings.optional(),
    /** Timeouts and retries of each Git mirror and bundle. @default attemptTimeout "1h" */
    gitBundle: stepSettings.optional(),
  })
  .strict();

const sources = z
  .object({
    opa: z.array(opaSource).optional(),
    postgres: z.array(postgresSource).optional(),
    redis: z.array(redisSource).optional(),
    /** Bundles as a bundle service or bucket serves them to OPA, stored unchanged. */
    bundle: z.array(bundleSource).optional(),
    /** Git repositories, stored as `git bundle` files with every ref. */
    git: z.array(gitSource).optional(),
  })
  .strict();

export const planSchema = z
  .object({
    /** Plan name; it is also the folder of the plan's backups in the destination. */
    name,
    destination,
    /** More destinations that receive every artifact and manifest, such as a bucket in another region. */
    replicas: z.array(replica).min(1).optional(),
    sources,
    /** Encryption of every artifact. Required, so that plaintext backups are always a stated choice. */
    encryption,
    compression: compression.optional(),
    signing: signing.optional(),
    schedule: schedule.optional(),
    retention: retention.optional(),
    health: health.optional(),
    settings: settings.optional(),
  })
  .strict()
  .superRefine((plan, context) => {
    const replicaNames = new Set<string>();
    const locations = new Map<string, string>([[destinationLocation(plan.destination), 'the destination']]);
    (plan.replicas ?? []).forEach((replica, index) => {
      if (replicaNames.has(replica.name)) {
        context.addIssue({ code: 'custom', path: ['replicas', index, 'name'], message: `duplicate replica name "${replica.name}"; each destination needs its own name` });
      }
      replicaNames.add(replica.name);
      const location = destinationLocation(replica);
      const same = locations.get(location);
      if (same) {
        context.addIssue({
          code: 'custom',
          path: ['replicas', index],
          message: `is the same location as ${same}, so it adds no copy; point it at another folder or bucket`,
        });
      } else locations.set(location, `replica "${replica.name}"`);
    });
    const seen = new Map<string, string>();
    const kinds = {
      opa: plan.sources.opa ?? [],
      postgres: plan.sources.postgres ?? [],
      redis: plan.sources.redis ?? [],
      bundle: plan.sources.bundle ?? [],
      git: plan.sources.git ?? [],
    };
    for (const [kind, list] of Object.entries(kinds)) {
      list.forEach((source, index) => {
        const path = `sources.${kind}[${index}].name`;
        const earlier = seen.get(source.name);
        if (earlier) {
          context.addIssue({
            code: 'custom',
            path: ['sources', kind, index, 'name'],
            message: `duplicate source name "${source.name}" (also at ${earlier}); names must be unique because they name the stored objects`,
          });
        } else {
          seen.set(source.name, path);
        }
      });
    }
    if (Object.values(kinds).every((list) => list.length === 0)) {
      context.addIssue({ code: 'custom', path: ['sources'], message: 'must list at least one source' });
    }
  });

export type Plan = z.infer<typeof planSchema>;
export type OpaSource = z.infer<typeof opaSource>;
export type PostgresSource = z.infer<typeof postgresSource>;
export type RedisSource = z.infer<typeof redisSource>;
export type BundleSource = z.infer<typeof bundleSource>;
export type GitSource = z.infer<typeof gitSource>;
export type Probe = z.infer<typeof probe>;
export type StepSettings = z.infer<typeof stepSettings>;
export type Destination = z.infer<typeof destination>;
export type Replica = z.infer<typeof replica>;
export type Schedule = z.infer<typeof schedule>;
export type ScheduleTiming = z.infer<typeof timing>;
export type DrillScheduleTiming = z.infer<typeof drillTiming>;
export type RetentionRules = z.infer<typeof retention>;
export type HealthLimits = z.infer<typeof health>;
export type Encryption = z.infer<typeof encryption>;
