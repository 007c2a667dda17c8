// Activities that back up a PostgreSQL source: list its databases, dump each
// one, and dump its roles and tablespaces. Each database is its own activity,
// so a retry after a server restart redoes one database, not the source.
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { Client } from 'pg';
import { FailureType } from '../../common/failures';
import { backupFolder, postgresDumpKey, postgresGlobalsKey } from '../../common/layout';
import type { PostgresFacts } from '../../common/manifest';
import type { Plan, PostgresSource } from '../../common/plan';
import type { ArtifactReference, PostgresStepInput } from '../../common/workflow-types';
import { artifactReference, heartbeatTimer } from '../backup';
import { activityLogger } from '../logging';
import { resolveSecret } from '../secrets';
import { openArtifactStore } from '../artifacts';
import { dumpDatabase, dumpGlobals, PgDumpVersionError } from './dump';

function findSource(plan: Plan, name: string): { source: PostgresSource; index: number } {
  const index = (plan.sources.postgres ?? []).findIndex((source) => source.name === name);
  if (index < 0) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no PostgreSQL source named "${name}"`,
    });
  }
  return { source: plan.sources.postgres![index], index };
}

function password(source: PostgresSource, index: number): string | undefined {
  return source.password ? resolveSecret(source.password, `sources.postgres[${index}].password`) : undefined;
}

/** Turns a dump error into a Temporal failure: bad credentials and old tools cannot be fixed by a retry. */
function failure(source: PostgresSource, error: unknown): ApplicationFailure {
  if (error instanceof ApplicationFailure) return error;
  const code = (error as { code?: string }).code;
  const message = (error as Error).message;
  if (code === '28P01' || code === '28000') {
    const hint = source.password ? `check the password in ${source.password.replace(':', ' ')}` : 'the plan sets no password for this source';
    return ApplicationFailure.create({
      type: FailureType.Unauthorized,
      nonRetryable: true,
      message: `PostgreSQL source "${source.name}" rejected the login: ${message}; ${hint}`,
    });
  }
  if (error instanceof PgDumpVersionError) {
    return ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message });
  }
  return ApplicationFailure.create({
    type: FailureType.SourceUnavailable,
    message: message.includes(source.name) ? message : `PostgreSQL source "${source.name}": ${message}`,
  });
}

/** Returns the databases to dump: the plan's list, or every database that accepts connections, templates excluded. */
export async function listPostgresDatabases(input: { plan: Plan; source: string }): Promise<string[]> {
  const { source, index } = findSource(input.plan, input.source);
  if (source.databases) return source.databases;
  const client = new Client({ connectionString: source.url, password: password(source, index), connectionTimeoutMillis: 30_000 });
  try {
    await client.connect();
    const result = await client.query<{ datname: string }>(
      'SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname',
    );
    return result.rows.map((row) => row.datname);
  } catch (error) {
    throw failure(source, error);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Dumps one database, or the globals when `database` is absent, into the blob store. */
export async function dumpPostgres(input: PostgresStepInput): Promise<ArtifactReference> {
  const { plan, backupId, database } = input;
  const { source, index } = findSource(plan, input.source);
  const context = Context.current();
  const log = activityLogger({ backupId, plan: plan.name, source: source.name, database: database ?? '(globals)' });
  const store = openArtifactStore(plan, database === undefined ? 'postgres-globals' : 'postgres-dump');
  const folder = backupFolder(plan.name, backupId);
  const key = database === undefined ? postgresGlobalsKey(source.name) : postgresDumpKey(source.name, database);
  const startedAt = new Date().toISOString();
  let progress = { phase: 'connect', bytes: 0 };
  const stopHeartbeat = heartbeatTimer(() => progress);
  log.info({ attempt: context.info.attempt }, 'PostgreSQL dump started');

  try {
    const common = {
      url: source.url,
      password: password(source, index),
      source: source.name,
      store,
      key: `${folder}/${key}`,
      signal: context.cancellationSignal,
      onProgress: (update: { phase: string; bytes: number }) => {
        progress = update;
      },
    };
    let result: { size: number; sha256: string };
    let facts: PostgresFacts;
    if (database === undefined) {
      const globals = await dumpGlobals(common);
      result = globals;
      facts = { serverVersion: globals.serverVersion, pgDumpVersion: globals.pgDumpallVersion };
    } else {
      const dump = await dumpDatabase({ ...common, database });
      result = dump;
      facts = { database, serverVersion: dump.serverVersion, pgDumpVersion: dump.pgDumpVersion, tables: dump.tables };
    }
    const kind = database === undefined ? 'postgres-globals' : 'postgres-dump';
    const reference = await artifactReference({ store, folder, kind, source: source.name, key, stored: result, facts, startedAt });
    log.info({ key, size: result.size, sha256: result.sha256 }, 'PostgreSQL dump stored');
    return reference;
  } catch (error) {
    log.warn({ error: (error as Error).message, attempt: context.info.attempt }, 'PostgreSQL dump failed');
    if ((error as Error).name === 'AbortError') throw error;
    throw failure(source, error);
  } finally {
    stopHeartbeat();
  }
}
