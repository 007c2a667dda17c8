// Takes a snapshot of one live OPA instance without evaluating its rules.
//
// GET /v1/data evaluates every rule: a rule that calls http.send fires, and a
// rule that fails at evaluation turns the whole response into a 500. There is
// no parameter that returns base documents alone. So the snapshot reads the
// rule paths from the policy ASTs, lists the base-document keys of every
// prefix of a rule path in one query whose `with` modifiers replace every rule
// by a constant (so no user-written rule runs), and then reads each subtree
// that contains no rule with a plain query such as x := data["app"]["users"].
// Those values stream into data.json byte for byte, which keeps numbers
// exactly as OPA stored them.
import { open, type FileHandle } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { ApplicationFailure } from '@temporalio/common';
import { compareStrings } from '../../common/compare';
import { FailureType } from '../../common/failures';
import type { PolicyRecord, RecordedProbe } from '../../common/manifest';
import type { Probe } from '../../common/plan';
import { opaJson, opaRequest, type OpaConnection } from './client';
import { JsonValueExtractor, JsonShapeError } from './json-extract';
import { dataReference, PathNode, ruleTree, type PolicyModule } from './rules';

/** Keys under data.system that OPA itself writes. Restoring them would fake bundle ownership. */
export const OPA_MANAGED_SYSTEM_KEYS = ['bundles', 'modules', 'version'];

export interface SnapshotProgress {
  phase: 'policies' | 'data' | 'probes';
  dataBytes: number;
}

export interface SnapshotOptions {
  probes: Probe[];
  /** File that receives data.json. */
  dataFile: string;
  signal?: AbortSignal;
  onProgress?: (progress: SnapshotProgress) => void;
}

export interface OpaSnapshot {
  /** Modules with the Rego version OPA parsed each with. */
  modules: Array<{ id: string; raw: string; regoVersion: 0 | 1 }>;
  regoVersion: 0 | 1;
  opaVersion?: string;
  rulePaths: string[];
  dataBytes: number;
  loadedBundles: Record<string, { revision?: string; etag?: string }>;
  probes: RecordedProbe[];
}

interface QueryResponse<T> {
  result?: Array<{ x: T }>;
}

/** Runs a query whose response is small, and returns the binding of x, or undefined. */
async function queryValue<T>(connection: OpaConnection, query: string, signal?: AbortSignal): Promise<T | undefined> {
  const { body } = await opaJson<QueryResponse<T>>(connection, 'POST', 'v1/query', {
    body: JSON.stringify({ query }),
    signal,
  });
  return body.result && body.result.length > 0 ? body.result[0].x : undefined;
}

/** Learns which Rego version the server parses REST-managed policies with: `some x in xs` needs an import in v0. */
async function detectRegoVersion(connection: OpaConnection, signal?: AbortSignal): Promise<0 | 1> {
  const response = await opaRequest(connection, 'POST', 'v1/query', {
    body: JSON.stringify({ query: 'x := [y | some y in [1]]' }),
    signal,
    acceptStatuses: (status) => status === 200 || status === 400,
  });
  response.resume();
  await new Promise((resolve) => response.on('end', resolve));
  return response.statusCode === 400 ? 0 : 1;
}

/** Writes data.json through explicit file positions, so an empty subtree can be taken back. */
class PositionedWriter {
  position = 0;
  constructor(private readonly handle: FileHandle) {}

  async write(data: Buffer | string): Promise<void> {
    const buffer = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    let offset = 0;
    while (offset < buffer.length) {
      const { bytesWritten } = await this.handle.write(buffer, offset, buffer.length - offset, this.position);
      offset += bytesWritten;
      this.position += bytesWritten;
    }
  }
}

function withClauses(node: PathNode, path: string[]): string {
  return node
    .rulePaths()
    .map((relative) => ` with ${dataReference([...path, ...relative])} as null`)
    .join('');
}

/**
 * Streams the value bound to x in a query response into the writer and
 * returns whether the query had a result. With `members`, the value must be
 * an object and only its members are written, without the outer braces.
 */
async function streamQueryValue(
  connection: OpaConnection,
  query: string,
  writer: PositionedWriter,
  context: { signal?: AbortSignal; onBytes: (bytes: number) => void; what: string; members: boolean },
): Promise<boolean> {
  const response = await opaRequest(connection, 'POST', 'v1/query', {
    body: JSON.stringify({ query }),
    signal: context.signal,
  });
  let pending: Buffer[] = [];
  let first = true;
  const extractor = new JsonValueExtractor(['result', 0, 'x'], (slice) => {
    if (first && context.members) {
      if (slice[0] !== 0x7b) throw new JsonShapeError(`${context.what} is not an object`);
      slice = slice.subarray(1);
    }
    first = false;
    if (slice.length > 0) pending.push(slice);
  });
  try {
    for await (const chunk of response) {
      extractor.write(chunk as Buffer);
      for (const slice of pending) await writer.write(slice);
      context.onBytes((chunk as Buffer).length);
      pending = [];
    }
    extractor.end();
  } catch (error) {
    if (error instanceof JsonShapeError) {
      throw ApplicationFailure.create({
        type: FailureType.InvalidResponse,
        message: `snapshot of OPA "${connection.source}" failed: the response for ${context.what} is not valid: ${error.message}`,
      });
    }
    throw error;
  }
  // Take back the closing brace of the object.
  if (extractor.found && context.members) writer.position -= 1;
  return extractor.found;
}

/** A prefix of rule paths, and the keys of base documents directly under it. */
interface Level {
  node: PathNode;
  path: string[];
  baseKeys: string[];
}

/** Lists each prefix of a rule path, and data.system, which a read of data never shows. */
function prefixLevels(root: PathNode): Level[] {
  const levels: Level[] = [];
  const visit = (node: PathNode, path: string[]): void => {
    levels.push({ node, path, baseKeys: [] });
    for (const [key, child] of node.children) if (!child.rule) visit(child, [...path, key]);
  };
  visit(root, []);
  if (!root.children.has('system')) levels.push({ node: new PathNode(), path: ['system'], baseKeys: [] });
  return levels;
}

const levelId = (path: readonly string[]): string => JSON.stringify(path);

/**
 * Lists the base-document keys of every level in one query. Any query with a
 * `with` modifier on data makes OPA convert the base documents it reads into
 * its internal form, which costs about as much as serialising them. One
 * query for all levels pays that once, where one query per level would pay
 * it again at every level.
 */
async function listBaseKeys(connection: OpaConnection, root: PathNode, levels: Level[], signal?: AbortSignal): Promise<void> {
  // `_ = data.P[k]` rather than `some k, _ in`: servers run with
  // --v0-compatible parse queries as v0, where `in` is not a keyword.
  const entries = levels.map((level, index) => `${JSON.stringify(String(index))}: [k | _ = ${dataReference(level.path)}[k]]`);
  const keys = (await queryValue<Record<string, string[]>>(connection, `x := {${entries.join(', ')}}${withClauses(root, [])}`, signal)) ?? {};
  levels.forEach((level, index) => {
    const omitted = new Set(level.node.children.keys());
    if (level.path.length === 1 && level.path[0] === 'system') OPA_MANAGED_SYSTEM_KEYS.forEach((key) => omitted.add(key));
    level.baseKeys = (keys[String(index)] ?? []).filter((key) => !omitted.has(key)).sort();
  });
}

/**
 * Maximum base keys of a level read one by one. A larger level is read with
 * one rule-replacing query, because a plain read costs about 1 ms (measured
 * on OPA 1.22.4 on loopback).
 */
const MAX_PLAIN_READS_PER_LEVEL = 256;

/**
 * Writes the base documents under `path` as a JSON object and returns whether
 * it has any member. Subtrees without rules are plain reads, which OPA
 * serves from its store without converting them. An object that only rules
 * populate is left out, which is how the restored OPA shows it too.
 */
async function writeBaseDocuments(
  connection: OpaConnection,
  node: PathNode,
  path: string[],
  levels: Map<string, Level>,
  writer: PositionedWriter,
  context: { signal?: AbortSignal; onBytes: (bytes: number) => void },
): Promise<boolean> {
  await writer.write('{');
  let hasMembers = false;
  const level = levels.get(levelId(path));
  const baseKeys = level?.baseKeys ?? [];

  if (baseKeys.length > MAX_PLAIN_READS_PER_LEVEL) {
    const excluded = new Set(node.children.keys());
    if (path.length === 1 && path[0] === 'system') OPA_MANAGED_SYSTEM_KEYS.forEach((key) => excluded.add(key));
    const query = `x := object.remove(${dataReference(path)}, ${JSON.stringify([...excluded])})${withClauses(node, path)}`;
    const start = writer.position;
    await streamQueryValue(connection, query, writer, { ...context, what: `data.${path.join('.')}`, members: true });
    hasMembers = writer.position > start;
  } else {
    for (const key of baseKeys) {
      const mark = writer.position;
      await writer.write(`${hasMembers ? ',' : ''}${JSON.stringify(key)}:`);
      const reference = dataReference([...path, key]);
      const found = await streamQueryValue(connection, `x := ${reference}`, writer, { ...context, what: reference, members: false });
      // A key deleted since the listing has no value: take its name back.
      if (found) hasMembers = true;
      else writer.position = mark;
    }
  }

  const prefixes = [...node.children].filter(([, child]) => !child.rule);
  if (path.length === 0 && !node.children.has('system')) prefixes.push(['system', new PathNode()]);
  prefixes.sort(([a], [b]) => compareStrings(a, b));
  for (const [key, child] of prefixes) {
    const mark = writer.position;
    await writer.write(`${hasMembers ? ',' : ''}${JSON.stringify(key)}:`);
    if (await writeBaseDocuments(connection, child, [...path, key], levels, writer, context)) {
      hasMembers = true;
    } else {
      writer.position = mark;
    }
  }
  await writer.write('}');
  return hasMembers;
}

/** Evaluates one probe on a live OPA and records the decision or the error. */
export async function recordProbe(connection: OpaConnection, probe: Probe, signal?: AbortSignal): Promise<RecordedProbe> {
  const path = probe.path.split('/').map(encodeURIComponent).join('/');
  let body = '{}';
  if (probe.inputJson !== undefined) body = `{"input":${probe.inputJson}}`;
  else if (probe.input !== undefined) body = JSON.stringify({ input: probe.input });
  const response = await opaRequest(connection, 'POST', `v1/data/${path}`, {
    body,
    signal,
    acceptStatuses: (status) => status !== 401 && status !== 403,
  });
  const status = response.statusCode ?? 0;
  const chunks: Buffer[] = [];
  for await (const chunk of response) chunks.push(chunk as Buffer);
  const text = Buffer.concat(chunks);
  const recorded: RecordedProbe = { path: probe.path, status };
  if (probe.input !== undefined) recorded.input = probe.input;
  if (probe.inputJson !== undefined) recorded.inputJson = probe.inputJson;

  if (status === 200) {
    const result: Buffer[] = [];
    const extractor = new JsonValueExtractor(['result'], (slice) => result.push(Buffer.from(slice)));
    extractor.write(text);
    extractor.end();
    if (extractor.found) recorded.resultJson = Buffer.concat(result).toString('utf8');
    else recorded.undefinedResult = true;
    return recorded;
  }
  try {
    const error = JSON.parse(text.toString('utf8')) as { code?: string; message?: string; errors?: Array<{ code?: string }> };
    recorded.errorCodes = [error.code ?? 'unknown', ...(error.errors ?? []).map((nested) => nested.code ?? 'unknown')];
    recorded.errorMessage = error.message;
  } catch {
    recorded.errorCodes = ['unknown'];
    recorded.errorMessage = text.toString('utf8').slice(0, 300);
  }
  return recorded;
}

/** Takes the snapshot: policies, base documents into options.dataFile, system facts and probe decisions. */
export async function snapshotOpa(connection: OpaConnection, options: SnapshotOptions): Promise<OpaSnapshot> {
  const { signal } = options;
  let dataBytes = 0;
  const report = (phase: SnapshotProgress['phase']): void => options.onProgress?.({ phase, dataBytes });

  report('policies');
  const { body: policies } = await opaJson<{ result?: PolicyModule[] }>(connection, 'GET', 'v1/policies', { signal });
  if (!Array.isArray(policies.result)) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidResponse,
      message: `snapshot of OPA "${connection.source}" failed: GET /v1/policies has no result list; is ${connection.baseUrl.origin} an OPA server?`,
    });
  }
  // OPA lists policies in no fixed order; sorting keeps bundles of an
  // unchanged OPA identical.
  const modules = [...policies.result].sort((a, b) => compareStrings(a.id, b.id));
  const tree = ruleTree(modules);
  const regoVersion = await detectRegoVersion(connection, signal);
  const opaVersion = await queryValue<string>(connection, 'x := opa.runtime().version', signal);
  // OPA records the Rego version of modules that bundles loaded with a
  // version of their own under data.system.modules.
  const moduleInfo =
    (await queryValue<Record<string, { rego_version?: number }>>(
      connection,
      `x := ${dataReference(['system', 'modules'])}`,
      signal,
    )) ?? {};
  const bundles =
    (await queryValue<Record<string, { manifest?: { revision?: string }; etag?: string }>>(
      connection,
      `x := ${dataReference(['system', 'bundles'])}`,
      signal,
    )) ?? {};

  report('data');
  const handle = await open(options.dataFile, 'w');
  try {
    const writer = new PositionedWriter(handle);
    const levels = prefixLevels(tree);
    await listBaseKeys(connection, tree, levels, signal);
    const levelsByPath = new Map(levels.map((level) => [levelId(level.path), level]));
    await writeBaseDocuments(connection, tree, [], levelsByPath, writer, {
      signal,
      onBytes: (bytes) => {
        dataBytes += bytes;
        report('data');
      },
    });
    await handle.truncate(writer.position);
    dataBytes = writer.position;
  } finally {
    await handle.close();
  }

  // The `with` modifiers cover the rules listed at the start. A policy
  // pushed since then could have been evaluated and its values read as
  // base documents, so a changed policy set fails this attempt and the
  // retry starts over.
  const { body: after } = await opaJson<{ result?: PolicyModule[] }>(connection, 'GET', 'v1/policies', { signal });
  const fingerprint = (list: PolicyModule[]): string =>
    JSON.stringify(list.map((module) => [module.id, module.raw]).sort());
  if (fingerprint(after.result ?? []) !== fingerprint(modules)) {
    throw ApplicationFailure.create({
      type: FailureType.SourceUnavailable,
      message: `snapshot of OPA "${connection.source}" failed: its policies changed while the snapshot was taken; the snapshot is taken again`,
    });
  }

  report('probes');
  const probes: RecordedProbe[] = [];
  for (const probe of options.probes) probes.push(await recordProbe(connection, probe, signal));

  const loadedBundles: OpaSnapshot['loadedBundles'] = {};
  for (const [name, bundle] of Object.entries(bundles)) {
    loadedBundles[name] = { revision: bundle.manifest?.revision, etag: bundle.etag || undefined };
  }
  return {
    modules: modules.map((module) => {
      const recorded = moduleInfo[module.id]?.rego_version;
      return { id: module.id, raw: module.raw, regoVersion: recorded === 0 || recorded === 1 ? recorded : regoVersion };
    }),
    regoVersion,
    opaVersion,
    rulePaths: tree.rulePaths().map((path) => path.join('.')),
    dataBytes,
    loadedBundles,
    probes,
  };
}

/** SHA-256 of a string or buffer, lowercase hex. */
export function sha256Hex(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * Maps policy ids to bundle file paths. Ids are free text ("team/policies
 * v1.rego"); paths must stay inside the bundle, so empty, "." and ".."
 * segments and characters outside a safe set are percent-encoded, and
 * ".rego" is appended where missing so OPA loads the file as a module.
 */
export function policyFiles(modules: Array<{ id: string; raw: string }>): PolicyRecord[] {
  // A file may not share its path with a folder of another file ("z.rego"
  // and "z.rego/inner"): tar could not unpack both.
  const folders = new Set<string>();
  for (const module of modules) {
    const segments = module.id.split('/');
    for (let end = 1; end < segments.length; end++) folders.add(`policies/${segments.slice(0, end).join('/')}`);
  }
  const used = new Set<string>();
  return modules.map((module) => {
    const segments = module.id.split('/').map((segment) => {
      if (segment === '' || segment === '.' || segment === '..') return segment.replace(/\./g, '%2E') || '%00';
      return segment.replace(/[^A-Za-z0-9._ ~+@=,-]/gu, (character) =>
        [...Buffer.from(character, 'utf8')].map((byte) => `%${byte.toString(16).toUpperCase().padStart(2, '0')}`).join(''),
      );
    });
    let file = `policies/${segments.join('/')}`;
    if (!file.endsWith('.rego')) file += '.rego';
    let unique = file;
    for (let suffix = 2; used.has(unique) || folders.has(unique); suffix++) unique = file.replace(/\.rego$/, `~${suffix}.rego`);
    used.add(unique);
    return { id: module.id, file: unique, sha256: sha256Hex(module.raw) };
  });
}
