// Restore drills of served bundles and Git repositories through Temporal. A
// signed bundle from a bundle server loads into a fresh OPA with its key and
// activates the recorded revision. A Git bundle verifies and clones with
// every recorded ref. A live OPA in the same plan that loaded another
// revision than the served one fails the drill as drift. A Git bundle that
// lost a tag and a bundle signed with another key fail, naming the check.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { reapDrillLeftovers } from '../activities/drill/scratch';
import { pairLoadedBundles, type LiveOpaBundles } from '../activities/drill/served-bundle';
import type { DrillWorkflowResult } from '../activities/drill/types';
import type { GitFacts } from '../common/manifest';
import type { Plan } from '../common/plan';
import { startBundleServer, type BundleServer } from './harness/bundle-server';
import { drillLeftovers, processesMentioning, readManifestFile, replaceArtifact, runDrill } from './harness/drill';
import { startOpa, type OpaServer } from './harness/opa';
import { runsDirectory } from './harness/process';
import { startStack, type Stack } from './harness/stack';
import { tool, toolsBin } from './harness/tools';

const POLICY = 'package app.authz\n\ndefault allow := false\n\nallow if input.user in data.admins\n';
const identity = {
  GIT_AUTHOR_NAME: 'Test Author',
  GIT_AUTHOR_EMAIL: 'author@example.invalid',
  GIT_COMMITTER_NAME: 'Test Author',
  GIT_COMMITTER_EMAIL: 'author@example.invalid',
};

let stack: Stack;
let server: BundleServer;
let folder: string;
let drillRoot: string;
let repository: string;
let keys: { public: string; private: string; otherPrivate: string };
/** Bundles built by `opa build`, by name; the revision is "NAME-rev". */
const bundles: Record<string, string> = {};
const opaServers: OpaServer[] = [];

function git(cwd: string, ...args: string[]): string {
  return execFileSync('git', args, { cwd, encoding: 'utf8', env: { ...process.env, ...identity } }).trim();
}

function opaBuild(name: string, admins: string[], signingKey?: string): string {
  const source = path.join(folder, `${name}-src`);
  mkdirSync(source, { recursive: true });
  writeFileSync(path.join(source, 'authz.rego'), POLICY);
  writeFileSync(path.join(source, 'data.json'), JSON.stringify({ admins }));
  const output = path.join(folder, `${name}.tar.gz`);
  const signing = signingKey ? ['--signing-key', signingKey] : [];
  execFileSync(tool('opa'), ['build', '--bundle', source, '--revision', `${name}-rev`, '--output', output, ...signing]);
  return output;
}

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'drill-source-of-truth-'));
  drillRoot = path.join(folder, 'scratch');
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const otherRsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
  keys = { public: path.join(folder, 'public.pem'), private: path.join(folder, 'private.pem'), otherPrivate: path.join(folder, 'other-private.pem') };
  writeFileSync(keys.public, rsa.publicKey.export({ type: 'spki', format: 'pem' }));
  writeFileSync(keys.private, rsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  writeFileSync(keys.otherPrivate, otherRsa.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  bundles.old = opaBuild('old', ['alice'], keys.private);
  bundles.current = opaBuild('current', ['alice', 'bob'], keys.private);
  bundles.forged = opaBuild('forged', ['mallory'], keys.otherPrivate);

  // A repository with two branches and an annotated tag.
  repository = path.join(folder, 'policies');
  mkdirSync(repository);
  git(repository, 'init', '--quiet', '--initial-branch=main');
  writeFileSync(path.join(repository, 'authz.rego'), POLICY);
  git(repository, 'add', '.');
  git(repository, 'commit', '--quiet', '-m', 'Add the authz policy');
  git(repository, 'tag', '-a', 'v1.0', '-m', 'First release');
  git(repository, 'checkout', '--quiet', '-b', 'feature');
  writeFileSync(path.join(repository, 'data.json'), '{"admins": ["alice"]}\n');
  git(repository, 'add', '.');
  git(repository, 'commit', '--quiet', '-m', 'Add admins');
  git(repository, 'checkout', '--quiet', 'main');

  server = await startBundleServer({});
  server.serve('authz.tar.gz', { file: bundles.current });
  stack = await startStack('drill-source-of-truth', { PATH: `${toolsBin}:${process.env.PATH}`, OPA_BACKUP_DRILL_DIR: drillRoot });
});

after(async () => {
  await stack?.stop();
  // A failed test may leave a drill whose worker is gone: its servers lead their own process groups.
  if (drillRoot) {
    process.env.OPA_BACKUP_DRILL_DIR = drillRoot;
    await reapDrillLeftovers();
  }
  for (const opa of opaServers) await opa.stop();
  await server?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

/** Starts a live OPA that loaded `bundle` from a file, as one started with `opa run --bundle` does. */
async function liveOpa(name: string, bundle: string): Promise<OpaServer> {
  const opa = await startOpa(name, { args: ['--bundle', bundle, '--verification-key', keys.public] });
  opaServers.push(opa);
  return opa;
}

function planFor(name: string, sources: Plan['sources']): Plan {
  return {
    name,
    destination: { local: { path: folder } },
    encryption: { unencrypted: true },
    sources,
    settings: { bundleFetch: { retry: { initialInterval: '200ms', maximumAttempts: 3 } }, gitBundle: { retry: { initialInterval: '200ms', maximumAttempts: 3 } } },
  } as Plan;
}

const servedBundle = (): NonNullable<Plan['sources']['bundle']>[number] => ({
  name: 'authz',
  url: `${server.url}/bundles/authz.tar.gz`,
  verificationKey: `file:${keys.public}`,
});

function check(result: DrillWorkflowResult, name: string, object: string): DrillWorkflowResult['checks'][number] {
  const found = result.checks.find((entry) => entry.name === name && entry.object === object);
  assert.ok(found, `no check ${name} of ${object} in ${JSON.stringify(result.checks)}`);
  return found;
}

const failedChecks = (result: DrillWorkflowResult): string[] =>
  result.checks.filter((entry) => entry.outcome !== 'passed').map((entry) => `${entry.name} ${entry.object}: ${entry.message}`);

test('served bundle and git repository drill', async () => {
  const live = await liveOpa('drill-sot-live-current', bundles.current);
  const plan = planFor('sot-pass', {
    opa: [{ name: 'live', url: live.url }],
    bundle: [servedBundle()],
    git: [{ name: 'policies', url: repository }],
  });
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete', JSON.stringify(backup.failures));

  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.deepEqual(failedChecks(result), []);
  assert.equal(result.outcome, 'passed');
  const manifest = readManifestFile(folder, plan.name, backup.backupId);
  const served = manifest.artifacts.find((artifact) => artifact.kind === 'bundle')!.key;
  const stored = manifest.artifacts.find((artifact) => artifact.kind === 'git-bundle')!.key;
  assert.equal(served, 'bundle/authz.tar.gz');
  assert.equal(stored, 'git/policies.bundle');

  const names = result.checks.filter((entry) => entry.object === served || entry.object === stored).map((entry) => `${entry.name} ${entry.object}`).sort();
  assert.deepEqual(names, [
    `artifact-digest ${served}`,
    `artifact-digest ${stored}`,
    `bundle-activation ${served}`,
    `bundle-drift ${served}`,
    `git-clone ${stored}`,
    `git-verify ${stored}`,
  ]);
  assert.equal(
    check(result, 'bundle-activation', served).message,
    `OPA activated the bundle with revision "current-rev"; OPA verified its RS256 signature with the plan's verificationKey`,
  );
  assert.match(check(result, 'bundle-drift', served).message, /^the live OPA sources "live" \(bundle ".*current\.tar\.gz"\) had loaded the served revision "current-rev"$/);
  const facts = manifest.artifacts.find((artifact) => artifact.kind === 'git-bundle')!.facts as GitFacts;
  assert.equal(facts.refs.length, 3);
  assert.equal(check(result, 'git-verify', stored).message, 'git bundle verify passed; the bundle lists the 3 recorded refs at their recorded objects');
  assert.equal(check(result, 'git-clone', stored).message, `git clone checked out HEAD ${git(repository, 'rev-parse', 'main')}; 3 branches and tags match the manifest`);

  assert.deepEqual(drillLeftovers(drillRoot), []);
  assert.deepEqual(processesMentioning(drillRoot), []);
});

test('live OPA on an older revision is drift', async () => {
  const live = await liveOpa('drill-sot-live-old', bundles.old);
  const plan = planFor('sot-drift', { opa: [{ name: 'edge', url: live.url }], bundle: [servedBundle()] });
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete', JSON.stringify(backup.failures));

  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.equal(result.outcome, 'failed');
  const drift = check(result, 'bundle-drift', 'bundle/authz.tar.gz');
  assert.equal(drift.outcome, 'failed');
  assert.equal(
    drift.message,
    `drift: OPA source "edge" had loaded bundle "${bundles.old}" at revision "old-rev", but bundle source "authz" served revision "current-rev"`,
  );
  // Only the comparison fails: the served bundle and the snapshot both restore.
  assert.deepEqual(failedChecks(result), [`bundle-drift bundle/authz.tar.gz: ${drift.message}`]);
  assert.equal(check(result, 'bundle-activation', 'bundle/authz.tar.gz').outcome, 'passed');
});

test('git bundle without a tag fails', async () => {
  const plan = planFor('sot-git-refs', { git: [{ name: 'policies', url: repository }] });
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete', JSON.stringify(backup.failures));
  const key = 'git/policies.bundle';

  // The same history without the tag, stored with matching digests so only the ref checks can notice.
  const mirror = path.join(folder, 'untagged.git');
  git(folder, 'clone', '--quiet', '--mirror', repository, mirror);
  git(mirror, 'tag', '-d', 'v1.0');
  const untagged = path.join(folder, 'untagged.bundle');
  git(mirror, 'bundle', 'create', '--quiet', untagged, '--all');
  replaceArtifact(folder, plan.name, backup.backupId, key, readFileSync(untagged));

  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.equal(result.outcome, 'failed');
  assert.equal(check(result, 'artifact-digest', key).outcome, 'passed');
  const tag = git(repository, 'rev-parse', 'refs/tags/v1.0');
  const verify = check(result, 'git-verify', key);
  assert.equal(verify.outcome, 'failed');
  assert.equal(verify.message, `ref refs/tags/v1.0 (${tag}) is missing from the bundle`);
  const clone = check(result, 'git-clone', key);
  assert.equal(clone.outcome, 'failed');
  assert.equal(clone.message, `the clone has no refs/tags/v1.0 for refs/tags/v1.0 (${tag})`);
  assert.deepEqual(drillLeftovers(drillRoot), []);
});

test('bundle signed with another key fails activation', async () => {
  const plan = planFor('sot-forged', { bundle: [servedBundle()] });
  const backup = await stack.backup(plan);
  assert.equal(backup.status, 'complete', JSON.stringify(backup.failures));
  replaceArtifact(folder, plan.name, backup.backupId, 'bundle/authz.tar.gz', readFileSync(bundles.forged));

  const result = await runDrill(stack, { plan, backup: backup.backupId });
  assert.equal(result.outcome, 'failed');
  const activation = check(result, 'bundle-activation', 'bundle/authz.tar.gz');
  assert.equal(activation.outcome, 'failed');
  assert.match(activation.message, /^OPA did not load the bundle: .*failed to verify JWT signature/s);
  assert.deepEqual(processesMentioning(drillRoot), []);
});

test('drift pairs bundles by name', () => {
  const live: LiveOpaBundles[] = [
    { source: 'edge', loadedBundles: { authz: { revision: 'r2' }, system: { revision: 's1' } } },
    { source: 'file-loaded', loadedBundles: { '/etc/opa/authz.tar.gz': { revision: 'r1' } } },
    { source: 'rest-only', loadedBundles: {} },
  ];
  // A bundle whose name matches pairs; with two served bundles, an OPA with one unnamed bundle cannot pair.
  assert.deepEqual(pairLoadedBundles('authz', 2, live), [{ opaSource: 'edge', bundleName: 'authz', revision: 'r2' }]);
  assert.deepEqual(pairLoadedBundles('other', 2, live), []);
  // With one served bundle, an OPA that loaded exactly one bundle pairs with it under any name.
  assert.deepEqual(pairLoadedBundles('other', 1, live), [{ opaSource: 'file-loaded', bundleName: '/etc/opa/authz.tar.gz', revision: 'r1' }]);
  assert.deepEqual(pairLoadedBundles('authz', 1, live), [
    { opaSource: 'edge', bundleName: 'authz', revision: 'r2' },
    { opaSource: 'file-loaded', bundleName: '/etc/opa/authz.tar.gz', revision: 'r1' },
  ]);
});
