// Reads, validates and normalises backup plans. The CLI calls it before it
// starts a workflow, and the loadPlan activity calls it again on the worker,
// so a plan sent by `temporal workflow start` gets the same checks.
import { readFileSync, accessSync, constants } from 'node:fs';
import path from 'node:path';
import { isMap, isPair, isScalar, isSeq, parseDocument } from 'yaml';
import { z } from 'zod';
import { planSchema, type Plan } from '../common/plan';
import { parseIdentity, parseRecipient } from './crypto/age';

/** One problem in a plan: the field path ("sources.opa[0].token") and what is wrong with it. */
export interface PlanIssue {
  path: string;
  message: string;
}

/** A plan that failed validation; the message lists every issue as "FILE: PATH: REASON". */
export class PlanError extends Error {
  readonly issues: PlanIssue[];
  readonly file: string;

  constructor(file: string, issues: PlanIssue[]) {
    super(issues.map((issue) => `${file}: ${issue.path ? issue.path + ': ' : ''}${issue.message}`).join('\n'));
    this.name = 'PlanError';
    this.file = file;
    this.issues = issues;
  }
}

/** Formats a zod path as JavaScript-style access: sources.opa[0].token. */
export function formatFieldPath(segments: ReadonlyArray<PropertyKey>): string {
  let text = '';
  for (const segment of segments) {
    if (typeof segment === 'number') text += `[${segment}]`;
    else text += text ? `.${String(segment)}` : String(segment);
  }
  return text;
}

let knownFieldNames: string[] | undefined;

/** Returns every property name the plan schema accepts, for spelling suggestions. */
function allFieldNames(): string[] {
  if (knownFieldNames) return knownFieldNames;
  const names = new Set<string>();
  const visit = (node: unknown): void => {
    if (!node || typeof node !== 'object') return;
    const record = node as Record<string, unknown>;
    if (record.properties && typeof record.properties === 'object') {
      for (const key of Object.keys(record.properties)) names.add(key);
    }
    for (const value of Object.values(record)) visit(value);
  };
  visit(z.toJSONSchema(planSchema, { unrepresentable: 'any' }));
  knownFieldNames = [...names];
  return knownFieldNames;
}

function editDistance(a: string, b: string): number {
  const previous = Array.from({ length: b.length + 1 }, (_, index) => index);
  for (let i = 1; i <= a.length; i++) {
    let diagonal = previous[0];
    previous[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = previous[j];
      previous[j] = Math.min(previous[j] + 1, previous[j - 1] + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1));
      diagonal = above;
    }
  }
  return previous[b.length];
}

function suggestField(unknown: string): string {
  let best: string | undefined;
  let bestDistance = 3;
  for (const candidate of allFieldNames()) {
    const distance = editDistance(unknown.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best ? `; did you mean "${best}"?` : '; remove it or check its spelling';
}

function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'a list';
  if (typeof value === 'object') return 'a mapping';
  return `${typeof value} ${JSON.stringify(value)}`;
}

function issuesFromZod(error: z.ZodError): PlanIssue[] {
  const issues: PlanIssue[] = [];
  for (const issue of error.issues) {
    if (issue.code === 'unrecognized_keys') {
      for (const key of issue.keys) {
        issues.push({ path: formatFieldPath([...issue.path, key]), message: `unknown field "${key}"${suggestField(key)}` });
      }
      continue;
    }
    let message = issue.message;
    if (issue.code === 'invalid_type') {
      if (issue.path.length === 0) message = 'the plan must be a mapping with name, destination and sources';
      else if (issue.input === undefined && issue.path.length === 1 && issue.path[0] === 'encryption') {
        message =
          'is required: set "recipients" (age1… public keys) or "passphrase" (a secret reference), or "unencrypted: true" to store backups in plaintext';
      } else if (issue.input === undefined) message = 'is required';
      else message = `must be ${issue.expected === 'int' ? 'an integer' : `of type ${issue.expected}`}, not ${describeValue(issue.input)}`;
    }
    issues.push({ path: formatFieldPath(issue.path), message });
  }
  return issues;
}

/** Validates a plan object and returns it typed; throws PlanError naming `origin`. */
export function validatePlan(value: unknown, origin: string): Plan {
  const result = planSchema.safeParse(value, { reportInput: true });
  if (!result.success) throw new PlanError(origin, issuesFromZod(result.error));
  return result.data;
}

/** Calls `action` on every node of a YAML tree with its field path. */
function visit(node: unknown, fieldPath: PropertyKey[], action: (node: unknown, fieldPath: PropertyKey[]) => void): void {
  action(node, fieldPath);
  if (isMap(node)) {
    for (const item of node.items) {
      if (!isPair(item)) continue;
      const key = isScalar(item.key) ? String(item.key.value) : String(item.key);
      visit(item.value, [...fieldPath, key], action);
    }
  } else if (isSeq(node)) {
    node.items.forEach((item, index) => visit(item, [...fieldPath, index], action));
  }
}

/** Makes the plan's relative file paths absolute, starting at `baseDirectory`. */
function resolvePaths(plan: Plan, baseDirectory: string): Plan {
  const absolute = (file: string): string => (path.isAbsolute(file) ? file : path.resolve(baseDirectory, file));
  const copy: Plan = structuredClone(plan);
  if (copy.destination.local) copy.destination.local.path = absolute(copy.destination.local.path);
  for (const replica of copy.replicas ?? []) {
    if (replica.local) replica.local.path = absolute(replica.local.path);
  }
  for (const source of copy.sources.opa ?? []) {
    if (source.tls?.caFile) source.tls.caFile = absolute(source.tls.caFile);
    if (source.tls?.certFile) source.tls.certFile = absolute(source.tls.certFile);
    if (source.tls?.key?.startsWith('file:')) source.tls.key = `file:${absolute(source.tls.key.slice(5))}`;
    if (source.token?.startsWith('file:')) source.token = `file:${absolute(source.token.slice(5))}`;
  }
  for (const source of [...(copy.sources.postgres ?? []), ...(copy.sources.redis ?? [])]) {
    if (source.password?.startsWith('file:')) source.password = `file:${absolute(source.password.slice(5))}`;
  }
  const reference = (value: string | undefined): string | undefined =>
    value?.startsWith('file:') ? `file:${absolute(value.slice(5))}` : value;
  for (const source of copy.sources.bundle ?? []) {
    if (source.tls?.caFile) source.tls.caFile = absolute(source.tls.caFile);
    if (source.tls?.certFile) source.tls.certFile = absolute(source.tls.certFile);
    if (source.tls?.key) source.tls.key = reference(source.tls.key);
    source.token = reference(source.token);
    source.verificationKey = reference(source.verificationKey);
  }
  for (const source of copy.sources.git ?? []) {
    source.token = reference(source.token);
    source.sshKey = reference(source.sshKey);
    if (source.knownHostsFile) source.knownHostsFile = absolute(source.knownHostsFile);
  }
  copy.encryption.passphrase = reference(copy.encryption.passphrase);
  copy.encryption.identity = reference(copy.encryption.identity);
  if (copy.signing) {
    copy.signing.key = reference(copy.signing.key);
    if (copy.signing.publicKeyFile) copy.signing.publicKeyFile = absolute(copy.signing.publicKeyFile);
  }
  return copy;
}

/**
 * Reads and validates a YAML (or JSON) plan file; relative paths in it are
 * made absolute. With `checkReferences`, it also requires every secret
 * reference to resolve in this process, as commands that start work do.
 */
export function loadPlanFile(file: string, options: { checkReferences?: boolean } = {}): Plan {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    const reason = code === 'ENOENT' ? 'file not found' : code === 'EISDIR' ? 'it is a folder; give the path of the plan file' : (error as Error).message;
    throw new PlanError(file, [{ path: '', message: `cannot read the plan: ${reason}` }]);
  }
  // Integers are read as BigInt so that values beyond 2^53 are reported rather than rounded.
  const document = parseDocument(text, { prettyErrors: true, uniqueKeys: true, intAsBigInt: true });
  if (document.errors.length > 0) {
    throw new PlanError(
      file,
      document.errors.map((error) => {
        // The first line names the problem and position; the next one quotes the line in the file.
        const [summary, ...excerpt] = error.message.split('\n');
        const quoted = excerpt.find((line) => line.trim() !== '')?.trim();
        return { path: '', message: `invalid YAML: ${summary.replace(/:$/, '')}${quoted ? `: ${quoted}` : ''}` };
      }),
    );
  }
  const unsafe: PlanIssue[] = [];
  visit(document.contents, [], (node, fieldPath) => {
    if (isScalar(node) && typeof node.value === 'bigint') {
      if (node.value > BigInt(Number.MAX_SAFE_INTEGER) || node.value < BigInt(Number.MIN_SAFE_INTEGER)) {
        unsafe.push({
          path: formatFieldPath(fieldPath),
          message: `${node.value} is beyond 2^53 and would be rounded; for probe inputs, write the input as inputJson text`,
        });
      }
      node.value = Number(node.value);
    }
  });
  if (unsafe.length > 0) throw new PlanError(file, unsafe);
  const resolved = resolvePaths(validatePlan(document.toJS(), file), path.dirname(path.resolve(file)));
  // Checks that compare paths, such as two destinations in one folder, see them resolved only now.
  const plan = validatePlan(resolved, file);
  if (options.checkReferences) {
    const issues = checkPlanReferences(plan);
    if (issues.length > 0) throw new PlanError(file, issues);
  }
  return plan;
}

/**
 * Lists the relative file paths of a plan that arrived without a file
 * (inline in workflow input): they would resolve against the worker's
 * working directory, which is rarely what the sender meant.
 */
export function relativePathIssues(plan: Plan): PlanIssue[] {
  const issues: PlanIssue[] = [];
  const check = (fieldPath: string, file: string | undefined): void => {
    if (file !== undefined && !path.isAbsolute(file)) {
      issues.push({ path: fieldPath, message: `"${file}" must be an absolute path in a plan sent as workflow input` });
    }
  };
  check('destination.local.path', plan.destination.local?.path);
  (plan.replicas ?? []).forEach((replica, index) => check(`replicas[${index}].local.path`, replica.local?.path));
  (plan.sources.opa ?? []).forEach((source, index) => {
    check(`sources.opa[${index}].tls.caFile`, source.tls?.caFile);
    check(`sources.opa[${index}].tls.certFile`, source.tls?.certFile);
    if (source.token?.startsWith('file:')) check(`sources.opa[${index}].token`, source.token.slice(5));
    if (source.tls?.key?.startsWith('file:')) check(`sources.opa[${index}].tls.key`, source.tls.key.slice(5));
  });
  (plan.sources.bundle ?? []).forEach((source, index) => {
    check(`sources.bundle[${index}].tls.caFile`, source.tls?.caFile);
    check(`sources.bundle[${index}].tls.certFile`, source.tls?.certFile);
    for (const field of ['token', 'verificationKey'] as const) {
      const value = source[field];
      if (value?.startsWith('file:')) check(`sources.bundle[${index}].${field}`, value.slice(5));
    }
    if (source.tls?.key?.startsWith('file:')) check(`sources.bundle[${index}].tls.key`, source.tls.key.slice(5));
  });
  (plan.sources.git ?? []).forEach((source, index) => {
    for (const field of ['token', 'sshKey'] as const) {
      const value = source[field];
      if (value?.startsWith('file:')) check(`sources.git[${index}].${field}`, value.slice(5));
    }
    check(`sources.git[${index}].knownHostsFile`, source.knownHostsFile);
  });
  for (const [fieldPath, value] of [
    ['encryption.passphrase', plan.encryption.passphrase],
    ['encryption.identity', plan.encryption.identity],
    ['signing.key', plan.signing?.key],
  ] as const) {
    if (value?.startsWith('file:')) check(fieldPath, value.slice(5));
  }
  check('signing.publicKeyFile', plan.signing?.publicKeyFile);
  return issues;
}

/** Lists every secret reference in a plan, with the field that contains it. */
export function secretReferences(plan: Plan): Array<{ path: string; reference: string }> {
  const references: Array<{ path: string; reference: string }> = [];
  (plan.sources.opa ?? []).forEach((source, index) => {
    if (source.token) references.push({ path: `sources.opa[${index}].token`, reference: source.token });
    if (source.tls?.key) references.push({ path: `sources.opa[${index}].tls.key`, reference: source.tls.key });
  });
  (plan.sources.postgres ?? []).forEach((source, index) => {
    if (source.password) references.push({ path: `sources.postgres[${index}].password`, reference: source.password });
  });
  (plan.sources.redis ?? []).forEach((source, index) => {
    if (source.password) references.push({ path: `sources.redis[${index}].password`, reference: source.password });
  });
  (plan.sources.bundle ?? []).forEach((source, index) => {
    if (source.token) references.push({ path: `sources.bundle[${index}].token`, reference: source.token });
    if (source.tls?.key) references.push({ path: `sources.bundle[${index}].tls.key`, reference: source.tls.key });
    if (source.verificationKey) references.push({ path: `sources.bundle[${index}].verificationKey`, reference: source.verificationKey });
  });
  (plan.sources.git ?? []).forEach((source, index) => {
    if (source.token) references.push({ path: `sources.git[${index}].token`, reference: source.token });
    if (source.sshKey) references.push({ path: `sources.git[${index}].sshKey`, reference: source.sshKey });
  });
  // The identity is left out: only verify and restore drills read it, and a
  // backup worker should not hold it.
  if (plan.encryption.passphrase) references.push({ path: 'encryption.passphrase', reference: plan.encryption.passphrase });
  if (plan.signing?.key) references.push({ path: 'signing.key', reference: plan.signing.key });
  return references;
}

/**
 * Checks that the plan's references resolve in this process's environment:
 * each secret's variable is set or file readable, and each TLS file
 * readable. Secret values are never read into the result. Returns one issue
 * per reference that does not resolve.
 */
export function checkPlanReferences(plan: Plan): PlanIssue[] {
  const issues: PlanIssue[] = [];
  (plan.sources.opa ?? []).forEach((source, index) => {
    for (const field of ['caFile', 'certFile'] as const) {
      const file = source.tls?.[field];
      if (!file) continue;
      try {
        accessSync(file, constants.R_OK);
      } catch {
        issues.push({ path: `sources.opa[${index}].tls.${field}`, message: `file ${file} is missing or not readable` });
      }
    }
  });
  const recipients = new Set<string>();
  (plan.encryption.recipients ?? []).forEach((recipient, index) => {
    try {
      recipients.add(parseRecipient(recipient).toString());
    } catch (error) {
      issues.push({ path: `encryption.recipients[${index}]`, message: `${(error as Error).message}; copy the public key again from age-keygen's output` });
    }
  });
  // An identity that opens none of the backups is a plan whose verify and
  // drills would all fail. It is checked where the identity is readable;
  // a backup worker usually lacks it, and needs it not.
  const identityText = plan.encryption.identity && recipients.size > 0 ? readReference(plan.encryption.identity) : undefined;
  if (identityText !== undefined) {
    try {
      const publicKeys = parseIdentity(identityText).map((identity) => identity.recipient.toString());
      if (!publicKeys.some((publicKey) => recipients.has(publicKey))) {
        issues.push({
          path: 'encryption.identity',
          message: `its public key ${publicKeys[0]} is not among encryption.recipients, so it could not decrypt these backups; add it to recipients or name the matching identity`,
        });
      }
    } catch (error) {
      issues.push({ path: 'encryption.identity', message: `${plan.encryption.identity} is not an age identity: ${(error as Error).message}` });
    }
  }
  for (const { path: fieldPath, reference } of secretReferences(plan)) {
    if (reference.startsWith('env:')) {
      const variable = reference.slice(4);
      if (process.env[variable] === undefined) {
        issues.push({
          path: fieldPath,
          message: `environment variable ${variable} (from "${reference}") is not set; export it where the worker runs, or change the reference`,
        });
      }
    } else {
      const file = reference.slice(5);
      try {
        accessSync(file, constants.R_OK);
      } catch {
        issues.push({ path: fieldPath, message: `file ${file} (from "${reference}") is missing or not readable` });
      }
    }
  }
  return issues;
}

/** Returns the value of a secret reference when it resolves in this process, or undefined. */
function readReference(reference: string): string | undefined {
  if (reference.startsWith('env:')) return process.env[reference.slice(4)];
  try {
    return readFileSync(reference.slice(5), 'utf8');
  } catch {
    return undefined;
  }
}
