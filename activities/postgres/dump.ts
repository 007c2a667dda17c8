// Dumps a PostgreSQL database with pg_dump, streaming the custom-format
// archive straight into the blob store, and counts the rows of every table in
// the same snapshot that pg_dump reads.
//
// One connection exports a snapshot (pg_export_snapshot() in a REPEATABLE READ
// READ ONLY transaction) and counts rows in it while `pg_dump --snapshot`
// runs. It stays open until pg_dump ends, because an exported snapshot can be
// imported only while the exporting transaction is open. The counts therefore describe the
// archive exactly, even while other sessions write.
//
// pg_dump connects with PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE in
// its environment, so neither the password nor a connection string appears on
// its command line.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { Client, type ClientConfig } from 'pg';
import { DigestStream } from '../digest';
import type { BlobStore } from '../storage/blob-store';

export interface DumpProgress {
  /** Bytes of the archive stored so far. */
  bytes: number;
  /**
   * `connect`, `count` (the snapshot is exported and counting rows in it
   * starts) or `dump` (pg_dump runs while the counting goes on).
   */
  phase: string;
}

interface ConnectionOptions {
  /**
   * postgres://USER[:PASSWORD]@HOST[:PORT][/DATABASE][?sslmode=MODE&sslrootcert=FILE].
   * sslmode is disable (the default here, unlike libpq's prefer), require,
   * verify-ca or verify-full; verify-ca and verify-full need sslrootcert.
   */
  url: string;
  /** Overrides the password in `url`. */
  password?: string;
  /** Source name, for messages. */
  source: string;
  store: BlobStore;
  key: string;
  /** Aborting kills pg_dump at once and rolls the snapshot transaction back. */
  signal?: AbortSignal;
  onProgress?(progress: DumpProgress): void;
  /** Folder of pg_dump and pg_dumpall; PATH is searched when unset. */
  pgBinDirectory?: string;
}

export interface DumpDatabaseOptions extends ConnectionOptions {
  database: string;
}

export interface DumpGlobalsOptions extends ConnectionOptions {
  /** Database pg_dumpall and the version check connect to; default: the database of `url`, else `postgres`. */
  database?: string;
  /** Passes --no-role-passwords, which reads pg_roles instead of pg_authid; needed when the role is not a superuser. */
  noRolePasswords?: boolean;
}

export interface TableRowCount {
  schema: string;
  name: string;
  rows: number;
}

export interface DumpDatabaseResult {
  size: number;
  sha256: string;
  /** The server's `server_version`, such as "15.10 (Debian 15.10-0+deb12u1)". */
  serverVersion: string;
  /** Version text from `pg_dump --version`, after "pg_dump (PostgreSQL) ". */
  pgDumpVersion: string;
  /** Plain tables and leaf partitions, in schema and name order, counted in the dump's snapshot. */
  tables: TableRowCount[];
  /** Identifier of the exported snapshot pg_dump read. */
  snapshot: string;
  /** Lines pg_dump wrote to stderr although it succeeded. */
  warnings: string[];
}

export interface DumpGlobalsResult {
  size: number;
  sha256: string;
  serverVersion: string;
  pgDumpallVersion: string;
  warnings: string[];
}

/** pg_dump or pg_dumpall exited with a non-zero status or was killed. */
export class PgDumpFailedError extends Error {
  constructor(
    message: string,
    readonly stderr: string,
    readonly exitCode: number | null,
    readonly exitSignal: NodeJS.Signals | null,
  ) {
    super(message);
    this.name = 'PgDumpFailedError';
  }
}

/** The client tool is older than the server, so it cannot dump it; retrying does not help. */
export class PgDumpVersionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PgDumpVersionError';
  }
}

/** Maximum bytes of a tool's stderr kept for messages. The last bytes are kept, because pg_dump writes its fatal error last. */
const MAX_STDERR_BYTES = 16 * 1024;
const SUPPORTED_SSL_MODES = ['disable', 'require', 'verify-ca', 'verify-full'];
const SUPPORTED_URL_PARAMETERS = ['sslmode', 'sslrootcert'];

interface ConnectionTarget {
  host: string;
  port: number;
  user: string;
  password?: string;
  database?: string;
  sslMode: string;
  sslRootCert?: string;
}

/** Parses a postgres:// URL; the error never quotes the URL, because it may carry a password. */
function parseUrl(url: string, source: string): ConnectionTarget {
  const invalid = (reason: string): Error => new Error(`invalid URL of PostgreSQL source "${source}": ${reason}`);
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalid('not a URL; expected postgres://USER@HOST:PORT/DATABASE');
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    throw invalid(`scheme "${parsed.protocol}" is not postgres: or postgresql:`);
  }
  const host = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  if (!host) throw invalid('missing host');
  if (!parsed.username) throw invalid('missing user; expected postgres://USER@HOST:PORT/DATABASE');
  for (const name of parsed.searchParams.keys()) {
    if (!SUPPORTED_URL_PARAMETERS.includes(name)) {
      throw invalid(`unsupported parameter "${name}"; supported: ${SUPPORTED_URL_PARAMETERS.join(', ')}`);
    }
  }
  const sslMode = parsed.searchParams.get('sslmode') ?? 'disable';
  if (!SUPPORTED_SSL_MODES.includes(sslMode)) {
    throw invalid(`sslmode "${sslMode}" is not one of ${SUPPORTED_SSL_MODES.join(', ')}`);
  }
  const sslRootCert = parsed.searchParams.get('sslrootcert') ?? undefined;
  if (sslMode.startsWith('verify-') && !sslRootCert) {
    throw invalid(`sslmode ${sslMode} needs sslrootcert=FILE with the CA certificate`);
  }
  const database = decodeURIComponent(parsed.pathname.replace(/^\//, ''));
  return {
    host,
    port: parsed.port ? Number(parsed.port) : 5432,
    user: decodeURIComponent(parsed.username),
    password: parsed.password ? decodeURIComponent(parsed.password) : undefined,
    database: database || undefined,
    sslMode,
    sslRootCert,
  };
}

/** Configuration of a `pg` connection that matches what libpq does with toolEnvironment(). */
function clientConfig(target: ConnectionTarget, database: string): ClientConfig {
  const config: ClientConfig = {
    host: target.host,
    port: target.port,
    user: target.user,
    password: target.password,
    database,
    application_name: 'opa-backup',
  };
  if (target.sslMode === 'require') {
    config.ssl = { rejectUnauthorized: false };
  } else if (target.sslMode.startsWith('verify-')) {
    const ca = readFileSync(target.sslRootCert!, 'utf8');
    config.ssl =
      target.sslMode === 'verify-full'
        ? { ca, rejectUnauthorized: true, servername: target.host }
        : { ca, rejectUnauthorized: true, checkServerIdentity: () => undefined };
  }
  return config;
}

/**
 * Builds the environment of pg_dump and pg_dumpall: the worker's environment
 * without its PG* variables (PGSERVICE, PGOPTIONS and the like would change
 * the connection), plus the connection settings of `target`.
 */
function toolEnvironment(target: ConnectionTarget, database: string | undefined): NodeJS.ProcessEnv {
  const environment: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (!name.startsWith('PG')) environment[name] = value;
  }
  environment.PGHOST = target.host;
  environment.PGPORT = String(target.port);
  environment.PGUSER = target.user;
  if (target.password !== undefined) environment.PGPASSWORD = target.password;
  // A database name passed as an argument is parsed as a connection string
  // when it contains "=" or starts with postgres://; PGDATABASE never is.
  if (database !== undefined) environment.PGDATABASE = database;
  environment.PGSSLMODE = target.sslMode;
  if (target.sslRootCert) environment.PGSSLROOTCERT = target.sslRootCert;
  environment.PGAPPNAME = 'opa-backup';
  return environment;
}

function toolPath(name: string, directory: string | undefined): string {
  return directory ? path.join(directory, name) : name;
}

interface ToolVersion {
  text: string;
  major: number;
}

/**
 * Versions read with `TOOL --version`, by binary path, kept for the life of
 * the process. A failed read is removed, so the next dump tries again.
 * NOTE: a binary replaced at the same path while the process runs keeps the
 * version of the binary it replaced.
 */
const toolVersions = new Map<string, Promise<ToolVersion>>();

/**
 * Returns the version text and major version (15 for "15.10", 9 for "9.6.24")
 * of a tool, running `TOOL --version` only on the first call for `binary`.
 */
async function readToolVersion(binary: string, name: string, description: string): Promise<ToolVersion> {
  let version = toolVersions.get(binary);
  if (version === undefined) {
    const started = runToolVersion(binary, name);
    version = started;
    toolVersions.set(binary, started);
    started.catch(() => {
      if (toolVersions.get(binary) === started) toolVersions.delete(binary);
    });
  }
  try {
    return await version;
  } catch (error) {
    // The error of a shared read does not name the dump, so each caller adds its own description.
    throw new Error(`${description} failed: ${(error as Error).message}`, { cause: (error as Error).cause });
  }
}

/** Runs `TOOL --version` and parses its output. */
async function runToolVersion(binary: string, name: string): Promise<ToolVersion> {
  const output = await new Promise<string>((resolve, reject) => {
    const child = spawn(binary, ['--version'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => chunks.push(chunk));
    child.stderr.resume();
    child.once('error', (error) =>
      reject(
        new Error(`cannot run ${binary} --version: ${error.message}; install the PostgreSQL client tools or set pgBinDirectory`, {
          cause: error,
        }),
      ),
    );
    child.once('close', (code, signal) => {
      if (code === 0) {
        resolve(Buffer.concat(chunks).toString('utf8').trim());
        return;
      }
      const status = signal ? `was killed by ${signal}` : `exited with status ${code}`;
      reject(new Error(`${binary} --version ${status}`));
    });
  });
  const match = /^\S+ \(PostgreSQL\) ((\d+)\S*.*)$/m.exec(output);
  if (!match) throw new Error(`cannot read the version of ${name} from "${output}"`);
  return { text: match[1], major: Number(match[2]) };
}

/**
 * Throws PgDumpVersionError when the server's major version is newer than the
 * tool's: pg_dump and pg_dumpall refuse to dump a newer server.
 */
function checkToolVersion(
  name: string,
  tool: ToolVersion,
  server: { text: string; number: number },
  source: string,
): void {
  // server_version_num is 150010 for 15.10; before version 10 it was 90624 for 9.6.24.
  if (server.number < 100_000) return;
  const serverMajor = Math.floor(server.number / 10_000);
  if (serverMajor <= tool.major) return;
  throw new PgDumpVersionError(
    `${name} ${tool.text} cannot dump PostgreSQL source "${source}", which runs server version ${server.text}: ` +
      `${name} only dumps servers of its own major version or older. ` +
      `Install the PostgreSQL ${serverMajor} client tools (or newer) on the worker.`,
  );
}

function abortError(signal: AbortSignal, what: string): Error {
  const error = new Error(`${what} cancelled`, { cause: signal.reason });
  error.name = 'AbortError';
  return error;
}

interface StreamToolOptions {
  binary: string;
  name: string;
  args: string[];
  environment: NodeJS.ProcessEnv;
  store: BlobStore;
  key: string;
  signal?: AbortSignal;
  onProgress?(progress: DumpProgress): void;
  /** Start of every error message, such as `dump of PostgreSQL source "x" database "y"`. */
  description: string;
  /**
   * Work that runs while the tool runs. The put completes only after it
   * resolved; when it rejects, the tool is killed and the put fails with its
   * error.
   */
  alongside?: Promise<unknown>;
  /**
   * Called after the tool exited with status 0 and `alongside` resolved; an
   * error it returns fails the put instead of completing it.
   */
  checkBeforeCommit?(): Error | undefined;
}

/**
 * Runs a tool whose stdout streams through a SHA-256 digest into
 * store.put(key). The put completes only after the tool exited with status 0
 * and `alongside` resolved: a non-zero status or a signal destroys the stream
 * with PgDumpFailedError, and a rejection of `alongside` with its error, so
 * the store leaves nothing at `key`.
 */
async function streamToolOutput(options: StreamToolOptions): Promise<{ size: number; sha256: string; warnings: string[] }> {
  const { signal, description } = options;
  if (signal?.aborted) throw abortError(signal, description);

  const child = spawn(options.binary, options.args, { env: options.environment, stdio: ['ignore', 'pipe', 'pipe'] });
  const hasher = new DigestStream();
  // The store's put reports every error of this stream. This listener keeps a
  // late write into the destroyed stream from becoming an uncaught error.
  hasher.on('error', () => {});

  let stderr = Buffer.alloc(0);
  child.stderr.on('data', (chunk: Buffer) => {
    stderr = Buffer.concat([stderr, chunk]);
    if (stderr.length > MAX_STDERR_BYTES) stderr = stderr.subarray(stderr.length - MAX_STDERR_BYTES);
  });

  // end: false, because the end of stdout is not success: only the exit status is.
  child.stdout.pipe(hasher, { end: false });

  let failure: Error | undefined;
  const fail = (error: Error): void => {
    failure ??= error;
    hasher.destroy(failure);
  };
  child.once('error', (error) => fail(new Error(`${description} failed: cannot run ${options.binary}: ${error.message}`)));

  const alongside = options.alongside ?? Promise.resolve();
  alongside.catch((error: unknown) => {
    child.kill('SIGKILL');
    fail(error as Error);
  });

  child.once('close', (code, exitSignal) => {
    if (hasher.destroyed) return;
    if (code === 0) {
      // The rejection of `alongside` is handled above.
      alongside.then(() => {
        if (hasher.destroyed) return;
        const error = options.checkBeforeCommit?.();
        if (error) fail(error);
        else hasher.end();
      }, () => {});
      return;
    }
    const text = stderr.toString('utf8').trim();
    const status = exitSignal ? `${options.name} was killed by ${exitSignal}` : `${options.name} exited with status ${code}`;
    const message = text ? `${description} failed: ${text} (${status})` : `${description} failed: ${status} and wrote nothing to stderr`;
    fail(new PgDumpFailedError(message, text, code, exitSignal));
  });

  const cancel = (): void => {
    child.kill('SIGKILL');
    fail(abortError(signal!, description));
  };
  signal?.addEventListener('abort', cancel, { once: true });

  try {
    const { size } = await options.store.put(options.key, hasher, {
      contentType: 'application/octet-stream',
      signal,
      onProgress: (bytes) => options.onProgress?.({ bytes, phase: 'dump' }),
    });
    const warnings = stderr
      .toString('utf8')
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line !== '');
    return { size, sha256: hasher.digest(), warnings };
  } catch (error) {
    if (failure) throw failure;
    if (signal?.aborted) throw abortError(signal, description);
    throw new Error(`${description} failed: storing ${options.key} in ${options.store.description} failed: ${(error as Error).message}`, {
      cause: error,
    });
  } finally {
    signal?.removeEventListener('abort', cancel);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

interface TableToCount {
  schema: string;
  name: string;
}

// Plain tables and leaf partitions have relkind 'r'. A partitioned table
// (relkind 'p') contains no rows itself. Tables that belong to an extension are
// left out because pg_dump does not dump their rows.
// NOTE: pg_dump does dump the rows of extension configuration tables
// (pg_extension_config_dump), filtered by their condition; those are not counted.
// Restore drills list tables with the same query, so both count the same set.
export const TABLES_QUERY = `
  SELECT n.nspname AS schema, c.relname AS name
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind = 'r'
    AND c.relpersistence <> 't'
    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\\_toast%'
    AND n.nspname NOT LIKE 'pg\\_temp\\_%'
    AND NOT EXISTS (
      SELECT 1 FROM pg_catalog.pg_depend d
      WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
    )
  ORDER BY n.nspname COLLATE "C", c.relname COLLATE "C"`;

interface RowCounts {
  counted: TableRowCount[];
  failed: Array<{ table: TableToCount; message: string }>;
}

/**
 * Counts the rows of every table in the open transaction. A table whose count
 * fails (no SELECT privilege, a row-level security policy) is returned in
 * `failed` instead of failing the dump, so pg_dump reports the problem in its
 * own words when it cannot read the table either. Aborting `signal` stops the
 * counting before the next table, and rejects with the signal's reason.
 */
async function countRows(client: Client, signal: AbortSignal): Promise<RowCounts> {
  const tables = (await client.query<TableToCount>(TABLES_QUERY)).rows;
  const counted: TableRowCount[] = [];
  const failed: Array<{ table: TableToCount; message: string }> = [];
  for (const table of tables) {
    signal.throwIfAborted();
    const qualified = `${client.escapeIdentifier(table.schema)}.${client.escapeIdentifier(table.name)}`;
    // A failed statement aborts the whole transaction; the savepoint keeps
    // the transaction, and so the exported snapshot, usable.
    await client.query('SAVEPOINT count_rows');
    try {
      // ONLY: a table with inheritance children would otherwise count their rows too.
      const result = await client.query<{ rows: string }>(`SELECT count(*) AS rows FROM ONLY ${qualified}`);
      await client.query('RELEASE SAVEPOINT count_rows');
      counted.push({ schema: table.schema, name: table.name, rows: Number(result.rows[0].rows) });
    } catch (error) {
      if (signal.aborted) throw error;
      await client.query('ROLLBACK TO SAVEPOINT count_rows');
      failed.push({ table, message: (error as Error).message });
    }
  }
  return { counted, failed };
}

/** Opens a connection and reads the server's version; the caller ends the client. */
async function connect(
  config: ClientConfig,
  description: string,
): Promise<{ client: Client; serverVersion: { text: string; number: number }; backendPid: number }> {
  const client = new Client(config);
  // An idle connection that the server closes emits 'error'; the next query reports it.
  client.on('error', () => {});
  try {
    await client.connect();
    const result = await client.query<{ version: string; number: string; pid: number }>(
      `SELECT current_setting('server_version') AS version, current_setting('server_version_num') AS number, pg_backend_pid() AS pid`,
    );
    const row = result.rows[0];
    return { client, serverVersion: { text: row.version, number: Number(row.number) }, backendPid: row.pid };
  } catch (error) {
    await client.end().catch(() => {});
    throw new Error(`${description} failed: cannot connect to ${config.user}@${config.host}:${config.port}/${config.database}: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/** Cancels the statement a backend runs, from a second connection; errors are ignored because the caller is cancelling anyway. */
async function cancelBackend(config: ClientConfig, pid: number): Promise<void> {
  const client = new Client(config);
  client.on('error', () => {});
  try {
    await client.connect();
    await client.query('SELECT pg_cancel_backend($1)', [pid]);
  } catch {
    // The session ends with its connection in the caller's cleanup.
  } finally {
    await client.end().catch(() => {});
  }
}

/**
 * Dumps one database into the blob store as a pg_dump custom-format archive
 * (restore with pg_restore) and counts the rows of its tables in the same
 * snapshot. Nothing is stored at `key` unless pg_dump succeeds.
 */
export async function dumpDatabase(options: DumpDatabaseOptions): Promise<DumpDatabaseResult> {
  const { source, database, signal } = options;
  const description = `dump of PostgreSQL source "${source}" database "${database}"`;
  const target = parseUrl(options.url, source);
  if (options.password !== undefined) target.password = options.password;
  const config = clientConfig(target, database);
  const pgDump = toolPath('pg_dump', options.pgBinDirectory);
  if (signal?.aborted) throw abortError(signal, description);

  const pgDumpVersion = await readToolVersion(pgDump, 'pg_dump', description);
  options.onProgress?.({ bytes: 0, phase: 'connect' });
  const { client, serverVersion, backendPid } = await connect(config, description);
  let inTransaction = false;
  try {
    if (signal?.aborted) throw abortError(signal, description);
    checkToolVersion('pg_dump', pgDumpVersion, serverVersion, source);

    // The same settings as pg_dump's setup_connection() (pg_dump.c,
    // PostgreSQL 15 and 17), so that a role or server default cannot fail a
    // count that pg_dump would pass, or end this session while it sits idle
    // in its transaction during the dump.
    await client.query('SET statement_timeout = 0');
    if (serverVersion.number >= 90_300) await client.query('SET lock_timeout = 0');
    if (serverVersion.number >= 90_600) await client.query('SET idle_in_transaction_session_timeout = 0');
    if (serverVersion.number >= 170_000) await client.query('SET transaction_timeout = 0');
    await client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
    inTransaction = true;
    // pg_dump turns row_security off and so fails on a table whose policies
    // would hide rows. The counts do the same, so they match the archive.
    await client.query('SET LOCAL row_security = off');
    const snapshot = (await client.query<{ snapshot: string }>('SELECT pg_export_snapshot() AS snapshot')).rows[0].snapshot;

    // The rows are counted while pg_dump runs, on this connection, which would
    // otherwise sit idle holding the snapshot open. Both finish before the
    // result is returned or the transaction ends.
    const stopCount = new AbortController();
    const cancelCount = (): void => {
      if (stopCount.signal.aborted) return;
      stopCount.abort();
      void cancelBackend(config, backendPid);
    };
    signal?.addEventListener('abort', cancelCount, { once: true });
    options.onProgress?.({ bytes: 0, phase: 'count' });
    let counts: RowCounts | undefined;
    const counting = countRows(client, stopCount.signal).then(
      (result) => {
        counts = result;
      },
      (error: unknown) => {
        if (signal?.aborted) throw abortError(signal, description);
        throw new Error(`${description} failed: cannot count rows: ${(error as Error).message}`, { cause: error });
      },
    );
    // streamToolOutput and the catch below report the rejection; this keeps it
    // from counting as unhandled in the meantime.
    counting.catch(() => {});

    let stored: Awaited<ReturnType<typeof streamToolOutput>>;
    try {
      options.onProgress?.({ bytes: 0, phase: 'dump' });
      stored = await streamToolOutput({
        binary: pgDump,
        name: 'pg_dump',
        args: ['--format=custom', `--snapshot=${snapshot}`, '--no-password'],
        environment: toolEnvironment(target, database),
        store: options.store,
        key: options.key,
        signal,
        onProgress: options.onProgress,
        description,
        alongside: counting,
        // NOTE: no test reaches this check. pg_dump reads every table counted
        // here, so it normally fails on the same table first.
        checkBeforeCommit: () => {
          // counts is set, because this runs only after `counting` resolved.
          const { failed } = counts!;
          if (failed.length === 0) return undefined;
          const { table, message } = failed[0];
          return new Error(
            `${description} failed: pg_dump succeeded but the rows of ${client.escapeIdentifier(table.schema)}.${client.escapeIdentifier(table.name)} could not be counted: ${message}`,
          );
        },
      });
    } catch (error) {
      // pg_dump failed or was cancelled, or the counting failed: stop the
      // counting and wait for it, so that the ROLLBACK below does not queue
      // behind a count.
      cancelCount();
      await counting.catch(() => {});
      throw error;
    } finally {
      signal?.removeEventListener('abort', cancelCount);
    }
    await counting;

    return {
      size: stored.size,
      sha256: stored.sha256,
      serverVersion: serverVersion.text,
      pgDumpVersion: pgDumpVersion.text,
      tables: counts!.counted,
      snapshot,
      warnings: stored.warnings,
    };
  } finally {
    // The transaction only read, so ROLLBACK ends it without effects, on
    // success as well as on failure or cancellation.
    if (inTransaction) await client.query('ROLLBACK').catch(() => {});
    await client.end().catch(() => {});
  }
}

/**
 * Dumps the cluster's roles and tablespaces (`pg_dumpall --globals-only`, a
 * SQL script for psql) into the blob store. Nothing is stored at `key` unless
 * pg_dumpall succeeds.
 */
export async function dumpGlobals(options: DumpGlobalsOptions): Promise<DumpGlobalsResult> {
  const { source, signal } = options;
  const description = `dump of PostgreSQL source "${source}" globals`;
  const target = parseUrl(options.url, source);
  if (options.password !== undefined) target.password = options.password;
  const database = options.database ?? target.database ?? 'postgres';
  // libpq reads a database name given to pg_dumpall that contains "=" or
  // starts with postgres:// as a connection string.
  if (database.includes('=') || /^postgres(ql)?:\/\//.test(database)) {
    throw new Error(`${description} failed: database name "${database}" would be read as a connection string; choose a database without "=" or a URI prefix`);
  }
  const pgDumpall = toolPath('pg_dumpall', options.pgBinDirectory);
  if (signal?.aborted) throw abortError(signal, description);

  const pgDumpallVersion = await readToolVersion(pgDumpall, 'pg_dumpall', description);
  options.onProgress?.({ bytes: 0, phase: 'connect' });
  const { client, serverVersion } = await connect(clientConfig(target, database), description);
  try {
    checkToolVersion('pg_dumpall', pgDumpallVersion, serverVersion, source);
  } finally {
    await client.end().catch(() => {});
  }

  // --globals-only reads only catalogs shared by every database, so it needs no snapshot.
  const args = ['--globals-only', '--no-password', `--database=${database}`];
  if (options.noRolePasswords) args.push('--no-role-passwords');

  options.onProgress?.({ bytes: 0, phase: 'dump' });
  const stored = await streamToolOutput({
    binary: pgDumpall,
    name: 'pg_dumpall',
    args,
    environment: toolEnvironment(target, undefined),
    store: options.store,
    key: options.key,
    signal,
    onProgress: options.onProgress,
    description,
  });
  return {
    size: stored.size,
    sha256: stored.sha256,
    serverVersion: serverVersion.text,
    pgDumpallVersion: pgDumpallVersion.text,
    warnings: stored.warnings,
  };
}
