// Git sources through Temporal. A local repository with two branches and
// an annotated tag is stored as a `git bundle`, and `git clone` of the
// artifact has every ref at the same commit. The manifest records HEAD and
// the refs, and the temporary mirror is removed. Over HTTP, the token
// reaches the server as an Authorization header, and a wrong token fails at
// once. A path that is no repository fails at once, naming the source.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PlanError, validatePlan } from '../activities/plan-loader';
import type { GitFacts, Manifest } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startGitHttpServer, type GitHttpServer } from './harness/git-http-server';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';

let stack: Stack;
let folder: string;
let repository: string;
let gitServer: GitHttpServer;
const TOKEN = 'git-test-token-39ad';

const identity = {
  GIT_AUTHOR_NAME: 'Test Author',
  GIT_AUTHOR_EMAIL: 'author@example.invalid',
  GIT_COMMITTER_NAME: 'Test Author',
  GIT_COMMITTER_EMAIL: 'author@example.invalid',
};

function git(cwd: string, ...args: string[]): string {
  return execFileSync('git', args, { cwd, encoding: 'utf8', env: { ...process.env, ...identity } }).trim();
}

/** Every ref of a repository, name to object. */
function refs(cwd: string): Map<string, string> {
  const map = new Map<string, string>();
  for (const line of git(cwd, 'for-each-ref', '--format=%(refname) %(objectname)').split('\n')) {
    const [name, object] = line.split(' ');
    map.set(name, object);
  }
  return map;
}

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'git-source-'));
  repository = path.join(folder, 'policies');
  mkdirSync(repository);
  git(repository, 'init', '--quiet', '--initial-branch=main');
  writeFileSync(path.join(repository, 'authz.rego'), 'package app.authz\n\ndefault allow := false\n');
  git(repository, 'add', '.');
  git(repository, 'commit', '--quiet', '-m', 'Add the authz policy');
  git(repository, 'tag', '-a', 'v1.0', '-m', 'First release');
  git(repository, 'checkout', '--quiet', '-b', 'feature');
  writeFileSync(path.join(repository, 'data.json'), '{"admins": ["alice"]}\n');
  git(repository, 'add', '.');
  git(repository, 'commit', '--quiet', '-m', 'Add admins');
  git(repository, 'checkout', '--quiet', 'main');
  git(folder, 'clone', '--quiet', '--bare', repository, path.join(folder, 'served', 'policies.git'));
  gitServer = await startGitHttpServer({ root: path.join(folder, 'served'), token: TOKEN });
  stack = await startStack('git-source', { GIT_TEST_TOKEN: TOKEN, GIT_TEST_WRONG_TOKEN: 'not-the-token' });
});

after(async () => {
  await stack?.stop();
  await gitServer?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

function planFor(name: string, sources: NonNullable<Plan['sources']['git']>): Plan {
  return {
    name,
    destination: { local: { path: path.join(folder, 'store') } },
    encryption: { unencrypted: true },
    sources: { git: sources },
    settings: { gitBundle: { retry: { initialInterval: '200ms', maximumAttempts: 3 } } },
  } as Plan;
}

test('git repository restores with every ref', async () => {
  const plan = planFor('git-plan', [{ name: 'policies', url: repository }]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));

  const manifest = JSON.parse(readFileSync(path.join(folder, 'store', result.manifestKey), 'utf8')) as Manifest;
  const artifact = manifest.artifacts[0];
  assert.equal(artifact.kind, 'git-bundle');
  assert.equal(artifact.key, 'git/policies.bundle');
  const source = refs(repository);
  const facts = artifact.facts as GitFacts;
  assert.equal(facts.defaultBranch, 'refs/heads/main');
  assert.equal(facts.head, source.get('refs/heads/main'));
  assert.deepEqual(new Map(facts.refs.map((ref) => [ref.name, ref.object])), source);
  assert.match(facts.gitVersion, /^\d+\.\d+/);

  const bundle = path.join(folder, 'store', plan.name, result.backupId, artifact.key);
  const clone = path.join(folder, 'restored');
  git(folder, 'clone', '--quiet', bundle, clone);
  const restored = refs(clone);
  assert.equal(restored.get('refs/heads/main'), source.get('refs/heads/main'));
  assert.equal(restored.get('refs/remotes/origin/feature'), source.get('refs/heads/feature'));
  assert.equal(restored.get('refs/tags/v1.0'), source.get('refs/tags/v1.0'));
  assert.equal(git(clone, 'rev-parse', 'v1.0^{commit}'), git(repository, 'rev-parse', 'v1.0^{commit}'));
  assert.equal(git(clone, 'show', 'origin/feature:data.json'), '{"admins": ["alice"]}');

  const leftovers = readdirSync(tmpdir()).filter((name) => name.startsWith('opa-backup-git-policies-'));
  assert.deepEqual(leftovers, []);
});

test('path without repository fails at once', async () => {
  const missing = path.join(folder, 'no-such-repository');
  const plan = planFor('git-missing', [
    { name: 'good', url: repository },
    { name: 'missing', url: missing },
  ]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'partial');
  const [failure] = result.failures;
  assert.equal(failure.kind, 'git');
  assert.equal(failure.source, 'missing');
  assert.equal(failure.type, 'InvalidPlan');
  assert.match(failure.message, /git source "missing" \(.*no-such-repository\): git clone exited with 128/);
  const leftovers = readdirSync(tmpdir()).filter((name) => name.startsWith('opa-backup-git-missing-'));
  assert.deepEqual(leftovers, []);
});

test('http token reaches git as a header', async () => {
  const plan = planFor('git-http', [{ name: 'served', url: `${gitServer.url}/policies.git`, token: 'env:GIT_TEST_TOKEN' }]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'complete', JSON.stringify(result.failures));
  assert.ok(gitServer.authorizations.length > 0);
  assert.ok(gitServer.authorizations.every((header) => header === `Bearer ${TOKEN}`));

  const manifest = JSON.parse(readFileSync(path.join(folder, 'store', result.manifestKey), 'utf8')) as Manifest;
  const facts = manifest.artifacts[0].facts as GitFacts;
  assert.equal(facts.url, `${gitServer.url}/policies.git`);
  assert.deepEqual(new Map(facts.refs.map((ref) => [ref.name, ref.object])), refs(repository));
  assert.doesNotMatch(readFileSync(path.join(folder, 'store', result.manifestKey), 'utf8'), new RegExp(TOKEN));
});

test('wrong git token fails at once', async () => {
  const plan = planFor('git-wrong-token', [
    { name: 'good', url: repository },
    { name: 'guarded', url: `${gitServer.url}/policies.git`, token: 'env:GIT_TEST_WRONG_TOKEN' },
  ]);
  const result = await stack.backup(plan);
  assert.equal(result.status, 'partial');
  const [failure] = result.failures;
  assert.equal(failure.source, 'guarded');
  assert.equal(failure.type, 'Unauthorized');
  assert.match(failure.message, /git source "guarded" .*check the token in env GIT_TEST_WRONG_TOKEN/);
  assert.doesNotMatch(failure.message, /not-the-token/);
});

test('git plan fields are checked', () => {
  const issues = (url: string): string[] => {
    try {
      validatePlan({ name: 'fields', destination: { local: { path: '/srv' } }, encryption: { unencrypted: true }, sources: { git: [{ name: 'repo', url }] } }, 'plan.yaml');
      return [];
    } catch (error) {
      assert.ok(error instanceof PlanError);
      return error.issues.map((issue) => `${issue.path}: ${issue.message}`);
    }
  };
  assert.deepEqual(issues('ssh://git@git.internal/policies.git'), []);
  assert.deepEqual(issues('/srv/git/policies.git'), []);
  assert.match(issues('https://ci:token@git.internal/policies.git')[0], /^sources\.git\[0\]\.url: must not contain a password or token/);
  assert.match(issues('relative/path')[0], /must be an absolute path or a file:\/\/, https:\/\/ or ssh:\/\/ URL/);
});
