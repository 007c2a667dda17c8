// Backup plan schema. A plan names what to back up, where to store it and how
// the steps are timed. Every object is strict: an unknown field is an error,
// because a silently ignored typo (say "retension") is a policy that never
// applies.
import { z } from 'zod';

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
    /** redis://[USER@]HOST[:PORT] of one server (a master or a replica). */
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

const CRON_FIELDS: ReadonlyArray<{ label: string; min: number; max: number }> = [
  { label: 'minute', min: 0, max: 59 },
  { label: 'hour', min: 0, max: 23 },
  { label: 'day of month', min: 1, max: 31 },
  { label: 'month', min: 1, max: 12 },
  { label: 'day of week', min: 0, max: 7 },
];

const CRON_MACROS = new Set(['@yearly', '@annually', '@monthly', '@weekly', '@daily', '@midnight', '@hourly']);

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
      const match = /^(\*|(\d+)(?:-(\d+))?)(?:\/(\d+))?$/.exec(part);
      if (!match) return `"${part}" is not a valid ${label} field in "${expression}"`;
      for (const number of [match[2], match[3]]) {
        if (number !== undefined && (Number(number) < min || Number(number) > max)) {
          return `${number} is not a valid ${label} in "${expression}"; it must be ${min} to ${max}`;
        }
      }
      if (match[4] !== undefined && Number(match[4]) === 0) return `step 0 in "${part}" of "${expression}" is invalid`;
    }
  }
  return undefined;
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

const schedule = z
  .object({
    /** Cron expression for backups, evaluated in timezone. */
    backup: cron.optional(),
    /** Cron expression for restore drills, evaluated in timezone. */
    drill: cron.optional(),
    /** IANA time zone name. @default "UTC" */
    timezone: z
      .string()
      .superRefine((zone, context) => {
        if (!isKnownTimeZone(zone)) {
          context.addIssue({ code: 'custom', message: `"${zone}" is not a known IANA time zone; use a name such as "UTC" or "Europe/Berlin"` });
        }
      })
      .optional(),
  })
  .strict();

const retention = z
  .object({
    keepLast: z.int().min(1).optional(),
    keepHourly: z.int().min(1).optional(),
    keepDaily: z.int().min(1).optional(),
    keepWeekly: z.int().min(1).optional(),
    keepMonthly: z.int().min(1).optional(),
    keepYearly: z.int().min(1).optional(),
    keepWithin: duration.optional(),
  })
  .strict();

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
  })
  .strict();

const sources = z
  .object({
    opa: z.array(opaSource).optional(),
    postgres: z.array(postgresSource).optional(),
    redis: z.array(redisSource).optional(),
  })
  .strict();

export const planSchema = z
  .object({
    /** Plan name; it is also the folder of the plan's backups in the destination. */
    name,
    destination,
    sources,
    schedule: schedule.optional(),
    retention: retention.optional(),
    settings: settings.optional(),
  })
  .strict()
  .superRefine((plan, context) => {
    const seen = new Map<string, string>();
    const kinds = { opa: plan.sources.opa ?? [], postgres: plan.sources.postgres ?? [], redis: plan.sources.redis ?? [] };
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
    if (kinds.opa.length + kinds.postgres.length + kinds.redis.length === 0) {
      context.addIssue({ code: 'custom', path: ['sources'], message: 'must list at least one source' });
    }
  });

export type Plan = z.infer<typeof planSchema>;
export type OpaSource = z.infer<typeof opaSource>;
export type PostgresSource = z.infer<typeof postgresSource>;
export type RedisSource = z.infer<typeof redisSource>;
export type Probe = z.infer<typeof probe>;
export type StepSettings = z.infer<typeof stepSettings>;
export type Destination = z.infer<typeof destination>;
