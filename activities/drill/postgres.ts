// The PostgreSQL part of a restore drill: create an ephemeral cluster with
// initdb, load a source's globals.sql with psql, restore each database dump
// with pg_restore, and compare every table's row count with the count the
// manifest recorded in the dump's snapshot.
//
// PostgreSQL refuses to run as root, so when the worker is root, initdb and
// the server run as the `postgres` OS user, which owns the cluster
// directory. The server listens on a Unix socket in that directory only, with
// trust authentication, and never on TCP.
import { execFileSync } from 'node:child_process';
import { chownSync, statfsSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import path from 'node:path';
import { Client } from 'pg';
import type { PostgresFacts } from '../../common/manifest';
import { TABLES_QUERY } from '../postgres/dump';
import { CheckFailure, runCheck } from './checks';
import { runTracked, startTracked, type DrillProcess, type Scratch } from './scratch';
import { findTool, sleep } from './tools';
import type { CheckResult } from './types';

const SUPERUSER = 'postgres';
const PORT = 5432;
const READY_TIMEOUT_MS = 60_000;
/** /dev/shm is used for the cluster when it has this much room; initdb there takes a fraction of the time on disk. */
const MIN_TMPFS_BYTES = 1024 ** 3;

export interface PostgresArtifact {
  key: string;
  kind: 'postgres-dump' | 'postgres-globals';
  /** Verified local copy. */
  file: string;
  facts: PostgresFacts;
}

interface Cluster {
  baseDirectory: string;
  server: DrillProcess;
  connect(database: string): Promise<Client>;
  clientArgs: string[];
  clientEnvironment: NodeJS.ProcessEnv;
}

function postgresUser(): { uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  try {
    return {
      uid: Number(execFileSync('id', ['-u', SUPERUSER], { encoding: 'utf8' }).trim()),
      gid: Number(execFileSync('id', ['-g', SUPERUSER], { encoding: 'utf8' }).trim()),
    };
  } catch {
    throw new Error('the worker runs as root, and PostgreSQL refuses root, but there is no "postgres" OS user to run the drill cluster as; create one or run the worker as another user');
  }
}

function clusterParent(scratch: Scratch): string {
  try {
    const info = statfsSync('/dev/shm');
    if (info.bavail * info.bsize >= MIN_TMPFS_BYTES) return '/dev/shm';
  } catch {
    // No /dev/shm here.
  }
  return scratch.directory;
}

async function startCluster(scratch: Scratch, signal?: AbortSignal): Promise<Cluster> {
  const owner = postgresUser();
  const baseDirectory = await mkdtemp(path.join(clusterParent(scratch), `opa-backup-drill-pg-${scratch.drillId.slice(-12)}-`));
  await scratch.registerPath(baseDirectory);
  if (owner) chownSync(baseDirectory, owner.uid, owner.gid);
  await chmod(baseDirectory, 0o700);
  const dataDirectory = path.join(baseDirectory, 'data');
  // The server's environment: no PG* variables of the worker and a working directory the server's user can enter.
  const serverEnvironment: NodeJS.ProcessEnv = { PATH: process.env.PATH, LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' };
  const asServer = { uid: owner?.uid, gid: owner?.gid, cwd: baseDirectory, env: serverEnvironment };
  const logDirectory = scratch.directory;

  await runTracked(
    scratch,
    findTool('initdb', { resolveLinks: true }),
    ['--pgdata', dataDirectory, '--username', SUPERUSER, '--auth', 'trust', '--encoding', 'UTF8', '--locale', 'C', '--no-sync', '--no-instructions'],
    path.join(logDirectory, 'initdb.log'),
    { ...asServer, signal },
  );
  const server = await startTracked(
    scratch,
    findTool('postgres', { resolveLinks: true }),
    [
      '-D', dataDirectory,
      '-p', String(PORT),
      '-c', "listen_addresses=",
      '-c', `unix_socket_directories=${baseDirectory}`,
      // The cluster is thrown away after the drill, so durability only costs time.
      '-c', 'fsync=off',
      '-c', 'synchronous_commit=off',
      '-c', 'full_page_writes=off',
    ],
    path.join(logDirectory, 'postgres.log'),
    asServer,
  );
  const connect = async (database: string): Promise<Client> => {
    const client = new Client({ host: baseDirectory, port: PORT, user: SUPERUSER, database });
    await client.connect();
    return client;
  };
  const deadline = Date.now() + READY_TIMEOUT_MS;
  try {
    for (;;) {
      if (server.child.exitCode !== null || server.child.signalCode !== null) {
        throw new Error(`the drill's postgres exited before it accepted connections: ${server.logTail()}`);
      }
      try {
        await (await connect('postgres')).end();
        break;
      } catch (error) {
        if (Date.now() > deadline) throw new Error(`the drill's postgres did not accept connections within ${READY_TIMEOUT_MS} ms: ${(error as Error).message}`);
      }
      await sleep(100, signal);
    }
  } catch (error) {
    await server.stop('SIGINT');
    await rm(baseDirectory, { recursive: true, force: true });
    await scratch.unregisterPath(baseDirectory);
    throw error;
  }
  const clientEnvironment = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('PG')));
  return {
    baseDirectory,
    server,
    connect,
    clientArgs: ['--host', baseDirectory, '--port', String(PORT), '--username', SUPERUSER, '--no-password'],
    clientEnvironment,
  };
}

async function stopCluster(scratch: Scratch, cluster: Cluster): Promise<void> {
  // SIGINT is PostgreSQL's fast shutdown.
  await cluster.server.stop('SIGINT');
  await rm(cluster.baseDirectory, { recursive: true, force: true });
  await scratch.unregisterPath(cluster.baseDirectory);
}

/**
 * Returns psql's error lines, leaving out the one about the bootstrap superuser, which initdb created already.
 * NOTE: CREATE TABLESPACE fails when its LOCATION does not exist on the worker, so a source with tablespaces fails this check.
 */
function psqlErrors(output: string): string[] {
  return output
    .split('\n')
    .filter((line) => /\bERROR:/.test(line))
    .filter((line) => !line.includes(`role "${SUPERUSER}" already exists`));
}

function quoteIdentifier(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

async function checkRowCounts(client: Client, facts: PostgresFacts): Promise<string> {
  const problems: string[] = [];
  const recorded = facts.tables ?? [];
  const listed = new Set(recorded.map((table) => `${table.schema}.${table.name}`));
  for (const table of recorded) {
    const qualified = `${quoteIdentifier(table.schema)}.${quoteIdentifier(table.name)}`;
    let rows: number;
    try {
      rows = Number((await client.query<{ rows: string }>(`SELECT count(*) AS rows FROM ONLY ${qualified}`)).rows[0].rows);
    } catch (error) {
      problems.push(`table ${table.schema}.${table.name}: ${(error as Error).message}`);
      continue;
    }
    if (rows !== table.rows) problems.push(`table ${table.schema}.${table.name} has ${rows} rows, the manifest records ${table.rows}`);
  }
  const present = await client.query<{ schema: string; name: string }>(TABLES_QUERY);
  for (const table of present.rows) {
    if (!listed.has(`${table.schema}.${table.name}`)) problems.push(`table ${table.schema}.${table.name} was restored but the manifest does not list it`);
  }
  if (problems.length > 0) throw new CheckFailure(problems.join('; '));
  return `${recorded.length} tables restored with their recorded row counts`;
}

/**
 * Restores one PostgreSQL source's artifacts into a fresh cluster and returns
 * a postgres-globals check for globals.sql and a postgres-restore check for
 * each dump. The cluster is stopped and removed before it returns.
 */
export async function drillPostgresSource(
  scratch: Scratch,
  artifacts: PostgresArtifact[],
  options: { signal?: AbortSignal; onCheck?: (result: CheckResult) => void } = {},
): Promise<CheckResult[]> {
  const { signal } = options;
  const results: CheckResult[] = [];
  const record = (result: CheckResult): void => {
    results.push(result);
    options.onCheck?.(result);
  };
  const cluster = await startCluster(scratch, signal);
  try {
    const globals = artifacts.find((artifact) => artifact.kind === 'postgres-globals');
    let rolesLoaded = false;
    if (globals) {
      const result = await runCheck('postgres-globals', globals.key, async () => {
        const output = await runTracked(
          scratch,
          findTool('psql'),
          [...cluster.clientArgs, '-X', '-q', '--dbname', 'postgres', '--file', globals.file],
          path.join(scratch.directory, 'psql-globals.log'),
          { env: cluster.clientEnvironment, signal },
        );
        const errors = psqlErrors(output);
        if (errors.length > 0) throw new CheckFailure(`psql reported ${errors.length} errors loading globals.sql: ${errors.join('; ')}`);
        return 'globals.sql loaded with psql without errors';
      });
      record(result);
      rolesLoaded = result.outcome === 'passed';
    }

    for (const dump of artifacts.filter((artifact) => artifact.kind === 'postgres-dump')) {
      record(
        await runCheck('postgres-restore', dump.key, async () => {
          const database = dump.facts.database;
          if (!database) throw new CheckFailure('the manifest records no database name for this dump');
          const admin = await cluster.connect('postgres');
          try {
            await admin.query(`CREATE DATABASE ${quoteIdentifier(database)}`);
          } finally {
            await admin.end();
          }
          // Without the source's roles, owners and grants cannot be restored; the rows still can.
          const ownership = rolesLoaded ? [] : ['--no-owner', '--no-privileges'];
          try {
            await runTracked(
              scratch,
              findTool('pg_restore'),
              [...cluster.clientArgs, '--exit-on-error', ...ownership, '--dbname', database, dump.file],
              path.join(scratch.directory, `pg_restore-${results.length}.log`),
              { env: cluster.clientEnvironment, signal },
            );
          } catch (error) {
            if ((error as Error).name === 'AbortError') throw error;
            throw new CheckFailure(`pg_restore failed: ${(error as Error).message}`);
          }
          const client = await cluster.connect(database);
          try {
            return await checkRowCounts(client, dump.facts);
          } finally {
            await client.end();
          }
        }),
      );
    }
    return results;
  } finally {
    await stopCluster(scratch, cluster);
  }
}
