// The activity that backs up a Git repository: `git clone --mirror` into a
// temporary folder, then `git bundle create FILE --all`, streamed into the
// blob store. `git clone REPO.bundle` restores every branch and tag.
//
// Credentials never appear in argv or the URL: an HTTPS token reaches git as
// an http.extraHeader through GIT_CONFIG_* variables, and an SSH key through
// GIT_SSH_COMMAND.
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Context } from '@temporalio/activity';
import { ApplicationFailure } from '@temporalio/common';
import { FailureType } from '../../common/failures';
import { backupFolder, gitBundleKey } from '../../common/layout';
import type { GitFacts } from '../../common/manifest';
import type { GitSource, Plan } from '../../common/plan';
import type { ArtifactReference } from '../../common/workflow-types';
import { artifactReference, heartbeatTimer } from '../backup';
import { DigestStream } from '../digest';
import { activityLogger } from '../logging';
import { resolveSecret } from '../secrets';
import { openArtifactStore } from '../artifacts';

/** Limit of git's stderr kept for error messages. */
const MAX_STDERR_BYTES = 64 * 1024;

/** A git command that exited with a non-zero status. */
class GitError extends Error {
  constructor(
    readonly args: string[],
    readonly stderr: string,
    readonly exitCode: number | null,
  ) {
    super(`git ${args[0]} exited with ${exitCode ?? 'a signal'}: ${stderr.trim().split('\n').slice(-3).join(' ') || 'no message'}`);
    this.name = 'GitError';
  }
}

/** Runs git and returns its stdout; stderr is kept for the error. */
function git(args: string[], options: { cwd?: string; env: NodeJS.ProcessEnv; signal: AbortSignal }): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('git', args, { cwd: options.cwd, env: options.env, signal: options.signal, stdio: ['ignore', 'pipe', 'pipe'] });
    const stdout: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => {
      if (stderr.length < MAX_STDERR_BYTES) stderr += chunk.toString('utf8');
    });
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve(Buffer.concat(stdout).toString('utf8'));
      else reject(new GitError(args, stderr, code));
    });
  });
}

/** Quotes a value for the shell that runs GIT_SSH_COMMAND. */
function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

/**
 * Builds git's environment: no prompts, and the source's credentials. An SSH
 * key given by env: reference is written to a 0600 file in `workDirectory`.
 */
async function gitEnvironment(source: GitSource, index: number, workDirectory: string): Promise<NodeJS.ProcessEnv> {
  const env: NodeJS.ProcessEnv = { ...process.env, GIT_TERMINAL_PROMPT: '0', GIT_ASKPASS: '', SSH_ASKPASS: '' };
  // Settings from the worker's environment would shift the numbering of the entries below.
  for (const name of Object.keys(env)) if (name.startsWith('GIT_CONFIG_')) delete env[name];
  if (source.token) {
    const token = resolveSecret(source.token, `sources.git[${index}].token`);
    const authorization = source.username
      ? `Basic ${Buffer.from(`${source.username}:${token}`).toString('base64')}`
      : `Bearer ${token}`;
    env.GIT_CONFIG_COUNT = '1';
    env.GIT_CONFIG_KEY_0 = 'http.extraHeader';
    env.GIT_CONFIG_VALUE_0 = `Authorization: ${authorization}`;
  }
  // NOTE: the SSH options are built as documented by ssh(1) but no test runs them against an SSH server.
  const ssh = ['ssh', '-o', 'BatchMode=yes'];
  if (source.sshKey) {
    let keyFile: string;
    if (source.sshKey.startsWith('file:')) {
      keyFile = source.sshKey.slice(5);
      // Raises MissingSecret, naming the field, when the file cannot be read.
      resolveSecret(source.sshKey, `sources.git[${index}].sshKey`);
    } else {
      keyFile = path.join(workDirectory, 'ssh-key');
      await writeFile(keyFile, `${resolveSecret(source.sshKey, `sources.git[${index}].sshKey`)}\n`, { mode: 0o600 });
      await chmod(keyFile, 0o600);
    }
    ssh.push('-i', shellQuote(keyFile), '-o', 'IdentitiesOnly=yes');
  }
  if (source.knownHostsFile) ssh.push('-o', `UserKnownHostsFile=${shellQuote(source.knownHostsFile)}`, '-o', 'StrictHostKeyChecking=yes');
  if (source.sshKey || source.knownHostsFile) env.GIT_SSH_COMMAND = ssh.join(' ');
  return env;
}

/** Turns a git failure into a Temporal failure: rejected credentials and missing repositories cannot be fixed by a retry. */
function failure(source: GitSource, error: unknown): ApplicationFailure {
  if (error instanceof ApplicationFailure) return error;
  const message = `git source "${source.name}" (${source.url}): ${(error as Error).message}`;
  const stderr = error instanceof GitError ? error.stderr : '';
  if (/Authentication failed|could not read Username|HTTP(?: Basic)?:? (?:Access denied|401|403)|returned error: 40[13]|Permission denied \(publickey|Host key verification failed/i.test(stderr)) {
    const hint = source.token
      ? `check the token in ${source.token.replace(':', ' ')}`
      : source.sshKey
        ? `check the SSH key in ${source.sshKey.replace(':', ' ')}`
        : 'the plan sets no token or sshKey for this source';
    return ApplicationFailure.create({ type: FailureType.Unauthorized, nonRetryable: true, message: `${message}; ${hint}` });
  }
  if (/does not appear to be a git repository|repository '.*' (?:does not exist|not found)|returned error: 404|Refusing to create empty bundle/i.test(stderr)) {
    return ApplicationFailure.create({ type: FailureType.InvalidPlan, nonRetryable: true, message });
  }
  return ApplicationFailure.create({ type: FailureType.SourceUnavailable, message });
}

/** Reads HEAD, the default branch and every ref of a mirror. */
async function readRefs(mirror: string, options: { env: NodeJS.ProcessEnv; signal: AbortSignal }): Promise<Omit<GitFacts, 'url' | 'gitVersion'>> {
  const listing = await git(['for-each-ref', '--format=%(objectname) %(refname)'], { ...options, cwd: mirror });
  const refs = listing
    .split('\n')
    .filter((line) => line.length > 0)
    .map((line) => {
      const space = line.indexOf(' ');
      return { name: line.slice(space + 1), object: line.slice(0, space) };
    });
  const facts: Omit<GitFacts, 'url' | 'gitVersion'> = { refs };
  const defaultBranch = (await git(['symbolic-ref', '-q', 'HEAD'], { ...options, cwd: mirror }).catch(() => '')).trim();
  if (defaultBranch) facts.defaultBranch = defaultBranch;
  const head = (await git(['rev-parse', '-q', '--verify', 'HEAD^{commit}'], { ...options, cwd: mirror }).catch(() => '')).trim();
  if (head) facts.head = head;
  return facts;
}

/** Mirrors one Git source and stores it as a `git bundle` with every ref. The temporary mirror is always removed. */
export async function bundleGitSource(input: { plan: Plan; source: string; backupId: string }): Promise<ArtifactReference> {
  const { plan, backupId } = input;
  const index = (plan.sources.git ?? []).findIndex((source) => source.name === input.source);
  if (index < 0) {
    throw ApplicationFailure.create({
      type: FailureType.InvalidPlan,
      nonRetryable: true,
      message: `plan ${plan.name} has no Git source named "${input.source}"`,
    });
  }
  const source = plan.sources.git![index];
  const context = Context.current();
  const signal = context.cancellationSignal;
  const log = activityLogger({ backupId, plan: plan.name, source: source.name });
  const store = openArtifactStore(plan, 'git-bundle');
  const folder = backupFolder(plan.name, backupId);
  const key = gitBundleKey(source.name);
  const startedAt = new Date().toISOString();
  let phase = 'clone';
  let bytes = 0;
  const stopHeartbeat = heartbeatTimer(() => ({ phase, bytes }));
  const workDirectory = await mkdtemp(path.join(tmpdir(), `opa-backup-git-${source.name}-`));
  log.info({ url: source.url, attempt: context.info.attempt }, 'Git backup started');

  try {
    const env = await gitEnvironment(source, index, workDirectory);
    const gitVersion = (await git(['--version'], { env, signal })).trim().replace(/^git version /, '');
    const mirror = path.join(workDirectory, 'mirror.git');
    // "--" keeps a URL that starts with "-" from being read as an option.
    await git(['clone', '--mirror', '--quiet', '--', source.url, mirror], { env, signal, cwd: workDirectory });

    phase = 'bundle';
    const refs = await readRefs(mirror, { env, signal });
    const bundleFile = path.join(workDirectory, 'repository.bundle');
    await git(['bundle', 'create', '--quiet', bundleFile, '--all'], { env, signal, cwd: mirror });

    phase = 'upload';
    const hasher = new DigestStream();
    const body = createReadStream(bundleFile);
    body.on('error', (error) => hasher.destroy(error));
    body.pipe(hasher);
    const { size } = await store.put(`${folder}/${key}`, hasher, {
      contentType: 'application/octet-stream',
      signal,
      onProgress: (stored) => {
        bytes = stored;
      },
    });
    const facts: GitFacts = { url: source.url, gitVersion, ...refs };
    const reference = await artifactReference({
      store,
      folder,
      kind: 'git-bundle',
      source: source.name,
      key,
      stored: { size, sha256: hasher.digest() },
      facts,
      startedAt,
    });
    log.info({ key: reference.key, size, refs: refs.refs.length, head: refs.head }, 'Git bundle stored');
    return reference;
  } catch (error) {
    log.warn({ error: (error as Error).message, phase, attempt: context.info.attempt }, 'Git backup failed');
    if ((error as Error).name === 'AbortError') throw error;
    if (phase === 'upload' && !(error instanceof ApplicationFailure)) {
      throw ApplicationFailure.create({
        type: FailureType.StorageFailed,
        message: `git source "${source.name}": writing to ${store.description} failed: ${(error as Error).message}`,
      });
    }
    throw failure(source, error);
  } finally {
    stopHeartbeat();
    await rm(workDirectory, { recursive: true, force: true });
  }
}
