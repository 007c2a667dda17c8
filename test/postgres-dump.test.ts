// dumpDatabase and dumpGlobals against a real PostgreSQL server, storing into
// a LocalBlobStore under .test-runs and restoring with pg_restore.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { pipeline, Transform, type Readable } from 'node:stream';
import { after, before, test } from 'node:test';
import type { Client } from 'pg';
import {
  dumpDatabase,
  dumpGlobals,
  PgDumpFailedError,
  PgDumpVersionError,
  type DumpProgress,
  type TableRowCount,
} from '../activities/postgres/dump';
import type { BlobStore, PutOptions, StoredObject } from '../activities/storage/blob-store';
import { LocalBlobStore } from '../activities/storage/local';
import { startPostgres, run, type PostgresServer } from './harness/postgres';
import { runsDirectory } from './harness/process';
import { repositoryRoot, tool } from './harness/tools';

const caseDirectory = path.join(repositoryRoot, 'test', 'cases', 'postgres');
const caseSql = readFileSync(path.join(caseDirectory, 'entitlements.sql'), 'utf8');

// Expected facts of entitlements.sql, from test/cases/postgres/README.md:
// "Audit Log"."Events" has 20001 rows, 1 of them in "Events_old", so 20000
// in "Events_2026". Listed in the order dumpDatabase returns (schema, then
// name, byte order).
const expectedTables: TableRowCount[] = [
  { schema: 'Audit Log', name: 'Events_2026', rows: 20000 },
  { schema: 'Audit Log', name: 'Events_old', rows: 1 },
  { schema: 'iam', name: 'no_pk_notes', rows: 3 },
  { schema: 'iam', name: 'roles', rows: 3 },
  { schema: 'iam', name: 'user_roles', rows: 5000 },
  { schema: 'iam', name: 'users', rows: 5000 },
];
const expectedEventRows = 20001;
const expectedLargeObject = Buffer.from('signed policy blob', 'utf8');

let server: PostgresServer;
let folder: string;
let storeRoot: string;
let store: LocalBlobStore;
let pgBinDirectory: string;

before(async () => {
  server = await startPostgres('postgres-dump');
  folder = mkdtempSync(path.join(runsDirectory, 'postgres-dump-'));
  storeRoot = path.join(folder, 'store');
  store = new LocalBlobStore(storeRoot);
  pgBinDirectory = path.dirname(tool('pg_dump'));
});

after(async () => {
  await server?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

/** Creates a database and loads entitlements.sql into it. */
async function createCaseDatabase(name: string): Promise<void> {
  await server.psql('postgres', `CREATE DATABASE "${name}"`);
  await server.psql(name, caseSql);
}

function storedFile(key: string): string {
  return path.join(storeRoot, ...key.split('/'));
}

/** Entries of the store folder that contains `key`, partial files of failed puts included. */
function entriesBeside(key: string): string[] {
  const directory = path.dirname(storedFile(key));
  return existsSync(directory) ? readdirSync(directory) : [];
}

async function restore(key: string, database: string): Promise<void> {
  await server.psql('postgres', `CREATE DATABASE "${database}"`);
  await run(tool('pg_restore'), ['--no-password', '--exit-on-error', '--dbname', database, storedFile(key)], {
    env: server.clientEnvironment,
  });
}

async function withDatabase<T>(database: string, work: (client: Client) => Promise<T>): Promise<T> {
  const client = await server.connect(database);
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

function qualified(table: { schema: string; name: string }): string {
  return `"${table.schema.replace(/"/g, '""')}"."${table.name.replace(/"/g, '""')}"`;
}

async function countRows(client: Client, table: { schema: string; name: string }): Promise<number> {
  const result = await client.query<{ rows: string }>(`SELECT count(*) AS rows FROM ONLY ${qualified(table)}`);
  return Number(result.rows[0].rows);
}

/** SHA-256 of a table's rows in their text form, sorted bytewise: equal digests mean equal text, byte for byte. */
async function rowsDigest(client: Client, table: { schema: string; name: string }): Promise<string> {
  const result = await client.query<{ digest: string | null }>(
    `SELECT encode(sha256(string_agg(convert_to(t::text, 'UTF8'), '\\x0a'::bytea ORDER BY t::text COLLATE "C")), 'hex') AS digest
     FROM ONLY ${qualified(table)} t`,
  );
  return result.rows[0].digest ?? '';
}

/** Grants a login role what pg_dump needs to dump the case database, with the large object optional. */
async function createDumpRole(database: string, role: string, password: string, grantLargeObject: boolean): Promise<void> {
  const largeObject = (await server.psql(database, 'SELECT oid FROM pg_largeobject_metadata')).trim();
  await server.psql(
    database,
    `CREATE ROLE ${role} LOGIN PASSWORD '${password}';
     GRANT CONNECT ON DATABASE "${database}" TO ${role};
     GRANT USAGE ON SCHEMA iam, "Audit Log" TO ${role};
     GRANT SELECT ON ALL TABLES IN SCHEMA iam, "Audit Log" TO ${role};
     GRANT SELECT ON ALL SEQUENCES IN SCHEMA iam TO ${role};
     ${grantLargeObject ? `GRANT SELECT ON LARGE OBJECT ${largeObject} TO ${role};` : ''}`,
  );
}

function roleUrl(role: string): string {
  return `postgres://${role}@127.0.0.1:${server.port}/postgres`;
}

/**
 * A blob store that holds back the first chunk of a put until open() is
 * called. pg_dump imports the snapshot when it connects, before it writes
 * anything, so while the gate is closed pg_dump runs on that snapshot and
 * cannot finish.
 */
class GatedStore implements BlobStore {
  readonly description: string;
  readonly firstChunk: Promise<void>;
  private reachedFirstChunk!: () => void;
  private release!: () => void;
  private readonly released: Promise<void>;

  constructor(private readonly inner: BlobStore) {
    this.description = `gated ${inner.description}`;
    this.firstChunk = new Promise((resolve) => (this.reachedFirstChunk = resolve));
    this.released = new Promise((resolve) => (this.release = resolve));
  }

  open(): void {
    this.release();
  }

  put(key: string, body: Readable, options?: PutOptions): Promise<{ size: number }> {
    let first = true;
    const gate = new Transform({
      transform: (chunk: Buffer, _encoding, callback) => {
        if (!first) return callback(null, chunk);
        first = false;
        this.reachedFirstChunk();
        void this.released.then(() => callback(null, chunk));
      },
    });
    pipeline(body, gate, () => {});
    return this.inner.put(key, gate, options);
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

/** Process ids and command lines of running pg_dump processes. */
function pgDumpProcesses(): Array<{ pid: number; commandLine: string }> {
  const found: Array<{ pid: number; commandLine: string }> = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let commandLine: string;
    try {
      commandLine = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0').join(' ');
    } catch {
      continue;
    }
    if (/(^|\/)pg_dump /.test(commandLine) && commandLine.includes('--snapshot=')) {
      found.push({ pid: Number(entry), commandLine });
    }
  }
  return found;
}

async function waitFor(what: string, condition: () => Promise<boolean> | boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test('dump restores every fact of the case', async () => {
  await createCaseDatabase('entitlements');
  const key = 'round-trip/entitlements.dump';
  const phases = new Set<string>();

  const result = await dumpDatabase({
    url: server.url,
    password: server.password,
    database: 'entitlements',
    source: 'entitlements-db',
    store,
    key,
    pgBinDirectory,
    onProgress: (progress: DumpProgress) => phases.add(progress.phase),
  });

  assert.deepEqual(result.tables, expectedTables);
  assert.match(result.serverVersion, /^15\./);
  assert.match(result.pgDumpVersion, /^15\./);
  assert.match(result.snapshot, /^[0-9A-F]+-[0-9A-F]+-\d+$/);
  assert.deepEqual(result.warnings, []);
  assert.deepEqual([...phases], ['connect', 'count', 'dump']);

  const archive = readFileSync(storedFile(key));
  assert.equal(result.size, archive.length);
  assert.equal(result.sha256, createHash('sha256').update(archive).digest('hex'));
  assert.equal(archive.subarray(0, 5).toString('latin1'), 'PGDMP', 'a custom-format archive starts with PGDMP');

  await restore(key, 'entitlements_restored');

  await withDatabase('entitlements_restored', async (restored) => {
    for (const table of expectedTables) {
      assert.equal(await countRows(restored, table), table.rows, `rows of ${qualified(table)} after restore`);
    }
    const events = await restored.query<{ rows: string }>(`SELECT count(*) AS rows FROM "Audit Log"."Events"`);
    assert.equal(Number(events.rows[0].rows), expectedEventRows);
  });

  await withDatabase('entitlements', async (original) => {
    await withDatabase('entitlements_restored', async (restored) => {
      for (const table of expectedTables) {
        assert.equal(await rowsDigest(restored, table), await rowsDigest(original, table), `text of ${qualified(table)}`);
      }

      const sequenceQuery = 'SELECT last_value::text, is_called FROM iam.users_id_seq';
      assert.deepEqual((await restored.query(sequenceQuery)).rows, (await original.query(sequenceQuery)).rows);
      const next = await restored.query<{ next: string }>(`SELECT nextval('iam.users_id_seq')::text AS next`);
      assert.equal(next.rows[0].next, '5001');

      const largeObjects = 'SELECT oid::text, lo_get(oid) AS data FROM pg_largeobject_metadata ORDER BY oid';
      const restoredObjects = (await restored.query<{ oid: string; data: Buffer }>(largeObjects)).rows;
      const originalObjects = (await original.query<{ oid: string; data: Buffer }>(largeObjects)).rows;
      assert.equal(restoredObjects.length, 1);
      assert.equal(restoredObjects[0].oid, originalObjects[0].oid);
      assert.deepEqual(restoredObjects[0].data, expectedLargeObject);

      const user = await restored.query<{ name: string }>(
        `SELECT encode(convert_to(display_name, 'UTF8'), 'hex') AS name FROM iam.users WHERE login = 'user1'`,
      );
      assert.equal(user.rows[0].name, Buffer.from('Ünïcødé 1 🚀', 'utf8').toString('hex'));
      const role = await restored.query<{ description: string }>(
        `SELECT encode(convert_to(description, 'UTF8'), 'hex') AS description FROM iam.roles WHERE name = 'auditor'`,
      );
      assert.equal(role.rows[0].description, Buffer.from('Prüfer – read audit', 'utf8').toString('hex'));
    });
  });
});

test('dump without table privilege stores nothing', async () => {
  await createCaseDatabase('entitlements_grants');
  await createDumpRole('entitlements_grants', 'dumper_grants', 'grants-secret', true);
  await server.psql('entitlements_grants', 'REVOKE SELECT ON iam.no_pk_notes FROM dumper_grants');
  const key = 'no-privilege/entitlements.dump';

  const error = await dumpDatabase({
    url: roleUrl('dumper_grants'),
    password: 'grants-secret',
    database: 'entitlements_grants',
    source: 'grants-db',
    store,
    key,
    pgBinDirectory,
  }).then(
    () => assert.fail('the dump succeeded without SELECT on iam.no_pk_notes'),
    (caught: unknown) => caught as Error,
  );

  assert.ok(error instanceof PgDumpFailedError, `expected PgDumpFailedError, got ${error.name}: ${error.message}`);
  assert.match(error.message, /^dump of PostgreSQL source "grants-db" database "entitlements_grants" failed: pg_dump: error: /);
  assert.match(error.message, /permission denied for table no_pk_notes/);
  assert.equal(error.exitCode, 1);
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key), []);
});

test('dump failing mid-stream stores nothing', async () => {
  // Without SELECT on the large object, pg_dump writes every table's rows and
  // then fails on the large object, which it dumps after the table data.
  await createCaseDatabase('entitlements_midway');
  await createDumpRole('entitlements_midway', 'dumper_midway', 'midway-secret', false);
  const key = 'midway/entitlements.dump';
  let bytesBeforeFailure = 0;

  const error = await dumpDatabase({
    url: roleUrl('dumper_midway'),
    password: 'midway-secret',
    database: 'entitlements_midway',
    source: 'midway-db',
    store,
    key,
    pgBinDirectory,
    onProgress: (progress) => (bytesBeforeFailure = Math.max(bytesBeforeFailure, progress.bytes)),
  }).then(
    () => assert.fail('the dump succeeded without SELECT on the large object'),
    (caught: unknown) => caught as Error,
  );

  assert.ok(error instanceof PgDumpFailedError, `expected PgDumpFailedError, got ${error.name}: ${error.message}`);
  assert.match(error.message, /^dump of PostgreSQL source "midway-db" database "entitlements_midway" failed: pg_dump: error: /);
  assert.match(error.message, /permission denied for large object/);
  assert.ok(bytesBeforeFailure > 100_000, `pg_dump wrote ${bytesBeforeFailure} bytes before it failed`);
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key), []);
});

test('concurrent insert is not counted', async () => {
  await createCaseDatabase('entitlements_concurrent');
  const key = 'concurrent/entitlements.dump';
  const gated = new GatedStore(store);
  let settled = false;

  // Rows committed at three points after the snapshot was exported: before
  // the first count, after the counting started but before pg_dump starts,
  // and while pg_dump runs. onProgress is synchronous, so the first two
  // inserts run with execFileSync and commit before dumpDatabase goes on.
  const insertNow = (sql: string): void => {
    execFileSync(tool('psql'), ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', 'entitlements_concurrent', '-c', sql], {
      env: server.clientEnvironment,
    });
  };
  const insertedAt = new Set<string>();
  const onProgress = (progress: DumpProgress): void => {
    if (insertedAt.has(progress.phase) || progress.phase === 'connect' || progress.bytes > 0) return;
    insertedAt.add(progress.phase);
    insertNow(`INSERT INTO iam.users (login) SELECT '${progress.phase}-' || g FROM generate_series(1, 10) g`);
    insertNow(`INSERT INTO iam.no_pk_notes (note) VALUES ('${progress.phase}')`);
  };

  const dump = dumpDatabase({
    url: server.url,
    password: server.password,
    database: 'entitlements_concurrent',
    source: 'concurrent-db',
    store: gated,
    key,
    pgBinDirectory,
    onProgress,
  }).finally(() => (settled = true));
  await gated.firstChunk;

  await withDatabase('entitlements_concurrent', async (writer) => {
    await writer.query(`INSERT INTO iam.users (login) SELECT 'late' || g FROM generate_series(1, 100) g`);
    await writer.query(`INSERT INTO "Audit Log"."Events" VALUES ('2010-01-01', 'late', 'default partition')`);
    await writer.query(`INSERT INTO iam.no_pk_notes (note) VALUES ('late')`);
    assert.equal(await countRows(writer, { schema: 'iam', name: 'users' }), 5120);
    assert.equal(await countRows(writer, { schema: 'iam', name: 'no_pk_notes' }), 6);
  });
  assert.deepEqual([...insertedAt], ['count', 'dump']);
  assert.equal(settled, false, 'the dump finished before the inserts committed');
  gated.open();
  const result = await dump;

  assert.deepEqual(result.tables, expectedTables);
  await restore(key, 'entitlements_concurrent_restored');
  await withDatabase('entitlements_concurrent_restored', async (restored) => {
    for (const table of result.tables) {
      assert.equal(await countRows(restored, table), table.rows, `rows of ${qualified(table)} after restore`);
    }
  });
});

test('cancel kills pg_dump and rolls back', async () => {
  await createCaseDatabase('entitlements_cancel');
  const key = 'cancel/entitlements.dump';
  const gated = new GatedStore(store);
  const controller = new AbortController();

  const dump = dumpDatabase({
    url: server.url,
    password: server.password,
    database: 'entitlements_cancel',
    source: 'cancel-db',
    store: gated,
    key,
    signal: controller.signal,
    pgBinDirectory,
  });
  await gated.firstChunk;

  const running = pgDumpProcesses();
  assert.equal(running.length, 1, `pg_dump processes: ${JSON.stringify(running)}`);
  assert.ok(!running[0].commandLine.includes(server.password), 'the password is on the pg_dump command line');

  controller.abort();
  const error = await dump.then(
    () => assert.fail('the cancelled dump succeeded'),
    (caught: unknown) => caught as Error,
  );
  assert.equal(error.name, 'AbortError');
  assert.equal(existsSync(`/proc/${running[0].pid}`), false, 'pg_dump still runs after the dump was cancelled');
  assert.equal(await store.stat(key), undefined);
  assert.deepEqual(entriesBeside(key), []);

  // The exporting session and pg_dump's session both end.
  await withDatabase('postgres', async (client) => {
    await waitFor('the dump sessions to end', async () => {
      const sessions = await client.query(`SELECT pid FROM pg_stat_activity WHERE datname = 'entitlements_cancel'`);
      return sessions.rows.length === 0;
    });
  });
});

test('count failure during dump stores nothing', async () => {
  // A lock held from before the dump blocks both the count of iam.users and
  // pg_dump's lock on it. Terminating the exporting session then fails the
  // count while pg_dump still runs.
  await createCaseDatabase('entitlements_count_failure');
  const key = 'count-failure/entitlements.dump';
  const locker = await server.connect('entitlements_count_failure');
  try {
    await locker.query('BEGIN');
    await locker.query('LOCK TABLE iam.users IN ACCESS EXCLUSIVE MODE');

    const dump = dumpDatabase({
      url: server.url,
      password: server.password,
      database: 'entitlements_count_failure',
      source: 'count-failure-db',
      store,
      key,
      pgBinDirectory,
    });
    const outcome = dump.then(
      () => assert.fail('the dump succeeded although its count failed'),
      (caught: unknown) => caught as Error,
    );

    let countingPid = 0;
    await withDatabase('postgres', async (monitor) => {
      await waitFor('the count of iam.users and pg_dump to wait for the lock', async () => {
        const waiting = await monitor.query<{ pid: number; query: string }>(
          `SELECT pid, query FROM pg_stat_activity
           WHERE datname = 'entitlements_count_failure' AND wait_event_type = 'Lock'`,
        );
        const count = waiting.rows.find((row) => row.query.includes('count(*)'));
        if (count) countingPid = count.pid;
        return count !== undefined && waiting.rows.length === 2 && pgDumpProcesses().length === 1;
      });
      await monitor.query('SELECT pg_terminate_backend($1)', [countingPid]);
    });

    const error = await outcome;
    assert.match(error.message, /^dump of PostgreSQL source "count-failure-db" database "entitlements_count_failure" failed: cannot count rows: /);
    assert.deepEqual(pgDumpProcesses(), [], 'pg_dump still runs after the count failed');
    assert.equal(await store.stat(key), undefined);
    assert.deepEqual(entriesBeside(key), []);
  } finally {
    await locker.end();
  }
});

test('old pg_dump is rejected before dumping', async () => {
  // A stand-in pg_dump that reports version 14 and records any other call.
  const binDirectory = path.join(folder, 'old-bin');
  const calls = path.join(folder, 'old-pg-dump-calls');
  mkdirSync(binDirectory, { recursive: true });
  const script = path.join(binDirectory, 'pg_dump');
  writeFileSync(
    script,
    `#!/bin/sh
if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 14.13"; exit 0; fi
echo "$@" >> '${calls}'
exit 1
`,
  );
  chmodSync(script, 0o755);
  const key = 'old-pg-dump/postgres.dump';

  const error = await dumpDatabase({
    url: server.url,
    password: server.password,
    database: 'postgres',
    source: 'version-db',
    store,
    key,
    pgBinDirectory: binDirectory,
  }).then(
    () => assert.fail('an old pg_dump was used'),
    (caught: unknown) => caught as Error,
  );

  assert.ok(error instanceof PgDumpVersionError, `expected PgDumpVersionError, got ${error.name}: ${error.message}`);
  assert.match(error.message, /pg_dump 14\.13 cannot dump PostgreSQL source "version-db", which runs server version 15\./);
  assert.match(error.message, /Install the PostgreSQL 15 client tools \(or newer\) on the worker/);
  assert.equal(existsSync(calls), false, 'pg_dump ran although it is older than the server');
  assert.equal(await store.stat(key), undefined);
});

test('globals dump stores roles', async () => {
  await server.psql('postgres', `CREATE ROLE policy_reader LOGIN PASSWORD 'reader-secret'`);
  const key = 'globals/globals.sql';

  const result = await dumpGlobals({
    url: server.url,
    password: server.password,
    source: 'globals-db',
    store,
    key,
    pgBinDirectory,
  });

  const script = readFileSync(storedFile(key));
  assert.equal(result.size, script.length);
  assert.equal(result.sha256, createHash('sha256').update(script).digest('hex'));
  assert.match(result.pgDumpallVersion, /^15\./);
  assert.match(script.toString('utf8'), /^CREATE ROLE policy_reader;$/m);
  assert.match(script.toString('utf8'), /^ALTER ROLE policy_reader WITH .*LOGIN.* PASSWORD 'SCRAM-SHA-256\$/m);
});

test('globals dump as non-superuser', async () => {
  // A role that is not a superuser cannot read pg_authid, where the password hashes are.
  await server.psql('postgres', `CREATE ROLE globals_reader LOGIN PASSWORD 'globals-secret'`);
  const key = 'globals/non-superuser.sql';
  const options = {
    url: roleUrl('globals_reader'),
    password: 'globals-secret',
    source: 'globals-db',
    store,
    key,
    pgBinDirectory,
  };

  const error = await dumpGlobals(options).then(
    () => assert.fail('pg_dumpall read pg_authid as a role that is not a superuser'),
    (caught: unknown) => caught as Error,
  );
  assert.ok(error instanceof PgDumpFailedError, `expected PgDumpFailedError, got ${error.name}: ${error.message}`);
  assert.match(error.message, /^dump of PostgreSQL source "globals-db" globals failed: pg_dumpall: error: /);
  assert.match(error.message, /permission denied for table pg_authid/);
  assert.equal(await store.stat(key), undefined);

  await dumpGlobals({ ...options, noRolePasswords: true });
  const script = readFileSync(storedFile(key), 'utf8');
  assert.match(script, /^CREATE ROLE globals_reader;$/m);
  assert.doesNotMatch(script, /SCRAM-SHA-256/);
});
