// The Git part of a restore drill: `git bundle verify` in an empty
// repository, the bundle's ref list against the manifest's, and a plain
// `git clone` of the bundle whose branches, tags and HEAD commit must equal
// what the backup recorded. Every git process is tracked in the drill's
// scratch registry, and the clone lives in the scratch directory.
import { createHash } from 'node:crypto';
import { mkdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import type { GitFacts } from '../../common/manifest';
import { CheckFailure, runCheck } from './checks';
import { runTracked, type Scratch } from './scratch';
import { findTool } from './tools';
import type { CheckResult } from './types';

export const GIT_CHECKS = ['git-verify', 'git-clone'];

/** Differences listed in full in a check's message; the rest are counted. */
const MAX_LISTED_PROBLEMS = 20;

/**
 * Builds git's environment: no prompts, and no system or user configuration,
 * so a hook path or URL rewrite of the worker's user cannot change the clone.
 */
function gitEnvironment(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, GIT_TERMINAL_PROMPT: '0', GIT_CONFIG_NOSYSTEM: '1', GIT_CONFIG_GLOBAL: '/dev/null' };
  for (const name of Object.keys(env)) {
    if (name.startsWith('GIT_CONFIG_') && name !== 'GIT_CONFIG_NOSYSTEM' && name !== 'GIT_CONFIG_GLOBAL') delete env[name];
  }
  for (const name of ['GIT_DIR', 'GIT_WORK_TREE', 'GIT_INDEX_FILE', 'GIT_OBJECT_DIRECTORY', 'GIT_ALTERNATE_OBJECT_DIRECTORIES', 'GIT_NAMESPACE']) {
    delete env[name];
  }
  return env;
}

/** Parses "OBJECT NAME" lines, as `git bundle list-heads` and `git for-each-ref` print them, into a map. */
function parseRefLines(text: string): Map<string, string> {
  const refs = new Map<string, string>();
  for (const line of text.split('\n')) {
    const match = /^([0-9a-f]{40}|[0-9a-f]{64}) (\S+)$/.exec(line.trim());
    if (match) refs.set(match[2], match[1]);
  }
  return refs;
}

/** Returns the refs a plain `git clone` creates for a source ref: branches under refs/remotes/origin/, tags as they are. */
function clonedName(ref: string): string | undefined {
  if (ref.startsWith('refs/heads/')) return `refs/remotes/origin/${ref.slice('refs/heads/'.length)}`;
  if (ref.startsWith('refs/tags/')) return ref;
  return undefined;
}

function summarize(problems: string[]): string {
  const listed = problems.slice(0, MAX_LISTED_PROBLEMS).join('; ');
  return problems.length > MAX_LISTED_PROBLEMS ? `${listed}; and ${problems.length - MAX_LISTED_PROBLEMS} more` : listed;
}

export interface GitDrillOptions {
  scratch: Scratch;
  /** Verified local copy of the git bundle. */
  bundleFile: string;
  /** Key of the artifact, the object of every check. */
  key: string;
  facts: GitFacts;
  signal?: AbortSignal;
}

/**
 * Runs the git-verify and git-clone checks of one Git artifact and returns
 * their results. The clone and the other files are removed before it
 * returns, also when it fails or the signal aborts.
 */
export async function drillGitBundle(options: GitDrillOptions): Promise<CheckResult[]> {
  const { scratch, key, facts, signal } = options;
  const workDirectory = path.join(scratch.directory, `git-${createHash('sha256').update(key).digest('hex').slice(0, 12)}`);
  await rm(workDirectory, { recursive: true, force: true });
  await mkdir(workDirectory, { recursive: true, mode: 0o700 });
  const gitBinary = findTool('git');
  const env = gitEnvironment();
  let logs = 0;

  /** Runs git and returns its whole output; a non-zero exit raises CheckFailure with git's message when `failure` is given. */
  const git = async (args: string[], failure?: string): Promise<string> => {
    const logFile = path.join(workDirectory, `git-${++logs}.log`);
    try {
      await runTracked(scratch, gitBinary, args, logFile, { cwd: workDirectory, env, signal });
    } catch (error) {
      if (failure === undefined || signal?.aborted) throw error;
      throw new CheckFailure(`${failure}: ${(error as Error).message}`);
    }
    // NOTE: git's stderr shares the log with stdout; the callers keep only lines shaped like refs.
    return readFile(logFile, 'utf8');
  };

  try {
    const recorded = new Map(facts.refs.map((ref) => [ref.name, ref.object]));
    const results: CheckResult[] = [];

    results.push(
      await runCheck('git-verify', key, async () => {
        // git 2.39 verifies a bundle only inside a repository; an empty one has none of its prerequisites.
        await git(['init', '--quiet', '--bare', 'verify.git']);
        await git(['-C', 'verify.git', 'bundle', 'verify', '--quiet', options.bundleFile], 'git bundle verify failed');
        const listed = parseRefLines(await git(['bundle', 'list-heads', options.bundleFile], 'git bundle list-heads failed'));
        const problems: string[] = [];
        for (const [name, object] of recorded) {
          const found = listed.get(name);
          if (found === undefined) problems.push(`ref ${name} (${object}) is missing from the bundle`);
          else if (found !== object) problems.push(`ref ${name} is ${found} in the bundle, the manifest records ${object}`);
        }
        for (const [name, object] of listed) {
          if (name !== 'HEAD' && !recorded.has(name)) problems.push(`the bundle has ref ${name} (${object}), which the manifest does not list`);
        }
        const head = listed.get('HEAD');
        if (facts.head !== undefined && head !== facts.head) problems.push(`the bundle's HEAD is ${head ?? 'missing'}, the manifest records ${facts.head}`);
        if (problems.length > 0) throw new CheckFailure(summarize(problems));
        return `git bundle verify passed; the bundle lists the ${recorded.size} recorded refs at their recorded objects`;
      }),
    );

    results.push(
      await runCheck('git-clone', key, async () => {
        await git(['clone', '--quiet', options.bundleFile, 'clone'], 'git clone of the bundle failed');
        const cloned = parseRefLines(await git(['-C', 'clone', 'for-each-ref', '--format=%(objectname) %(refname)']));
        const problems: string[] = [];
        let compared = 0;
        const expected = new Set<string>();
        for (const [name, object] of recorded) {
          const target = clonedName(name);
          if (target === undefined) continue;
          expected.add(target);
          compared++;
          const found = cloned.get(target);
          if (found === undefined) problems.push(`the clone has no ${target} for ${name} (${object})`);
          else if (found !== object) problems.push(`the clone's ${target} is ${found}, the manifest records ${object} for ${name}`);
        }
        for (const [name, object] of cloned) {
          const fromClone = name.startsWith('refs/tags/') || (name.startsWith('refs/remotes/origin/') && name !== 'refs/remotes/origin/HEAD');
          if (fromClone && !expected.has(name)) problems.push(`the clone has ${name} (${object}), which the manifest does not list`);
        }
        if (facts.head !== undefined) {
          let head: string;
          try {
            head = (await git(['-C', 'clone', 'rev-parse', '--verify', '--quiet', 'HEAD^{commit}'])).trim();
          } catch {
            head = 'unborn';
          }
          if (head !== facts.head) problems.push(`the clone's HEAD is ${head}, the manifest records ${facts.head}`);
        }
        if (problems.length > 0) throw new CheckFailure(summarize(problems));
        // Refs outside refs/heads and refs/tags (notes, pull requests) are not part of a plain clone; git-verify compares them.
        const other = recorded.size - compared;
        return `git clone checked out HEAD ${facts.head ?? '(none recorded)'}; ${compared} branches and tags match the manifest${other > 0 ? `; ${other} other refs are compared by git-verify only` : ''}`;
      }),
    );
    return results;
  } finally {
    await rm(workDirectory, { recursive: true, force: true });
  }
}
