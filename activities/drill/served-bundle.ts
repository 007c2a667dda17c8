// The served-bundle part of a restore drill. It starts a fresh
// `opa run --server --bundle FILE` with the stored bundle (with
// --verification-key when the backup verified its signature) and checks
// that OPA activated the revision the manifest recorded. It also compares
// that revision with the bundles the live OPA instances of the same backup
// had loaded, and reports a difference as drift.
import { createHash } from 'node:crypto';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { BundleFacts, OpaFacts } from '../../common/manifest';
import { CheckFailure, runCheck } from './checks';
import { startDrillOpa } from './opa';
import type { DrillProcess, Scratch } from './scratch';
import type { CheckResult } from './types';

export const BUNDLE_ACTIVATION_CHECK = 'bundle-activation';
export const BUNDLE_DRIFT_CHECK = 'bundle-drift';

/** Largest GET /v1/data/system/bundles response read, because a bundle's manifest metadata may be large. */
const MAX_SYSTEM_BUNDLES_BYTES = 16 * 1024 * 1024;

/** A snapshot of a live OPA in the same backup, with the bundles it had loaded. */
export interface LiveOpaBundles {
  /** Name of the OPA source in the plan. */
  source: string;
  loadedBundles: OpaFacts['loadedBundles'];
}

/** One live OPA bundle paired with a served bundle for the drift check. */
export interface BundlePairing {
  opaSource: string;
  bundleName: string;
  revision?: string;
}

/**
 * Pairs a served bundle with the bundles live OPA instances had loaded. A
 * loaded bundle pairs when its name equals the bundle source's name (the
 * name OPA's `bundles` configuration gives it). When no name matches, the
 * backup contains exactly one served bundle and the OPA loaded exactly one
 * bundle, those two pair, because a bundle loaded from a file or under
 * another name is then still the one the service serves. Other loaded
 * bundles are not compared.
 */
export function pairLoadedBundles(bundleSource: string, servedBundles: number, live: LiveOpaBundles[]): BundlePairing[] {
  const pairs: BundlePairing[] = [];
  for (const opa of live) {
    const loaded = Object.entries(opa.loadedBundles ?? {});
    const named = loaded.filter(([name]) => name === bundleSource);
    let chosen = named;
    if (named.length === 0 && servedBundles === 1 && loaded.length === 1) chosen = loaded;
    for (const [bundleName, bundle] of chosen) pairs.push({ opaSource: opa.source, bundleName, revision: bundle.revision });
  }
  return pairs;
}

const quote = (value: string | undefined): string => (value === undefined ? 'no revision' : JSON.stringify(value));

/**
 * Returns the drift check of a served bundle: failed when a paired live
 * bundle has another revision than the served one. It reads recorded facts
 * only, so it needs no server.
 */
export function checkBundleDrift(key: string, bundleSource: string, facts: BundleFacts, pairs: BundlePairing[]): Promise<CheckResult> {
  return runCheck(BUNDLE_DRIFT_CHECK, key, async () => {
    const served = facts.revision ?? '';
    const drifted = pairs.filter((pair) => (pair.revision ?? '') !== served);
    if (drifted.length > 0) {
      const lines = drifted.map(
        (pair) =>
          `OPA source "${pair.opaSource}" had loaded bundle "${pair.bundleName}" at revision ${quote(pair.revision)}, ` +
          `but bundle source "${bundleSource}" served revision ${quote(facts.revision)}`,
      );
      throw new CheckFailure(`drift: ${lines.join('; ')}`);
    }
    const sources = pairs.map((pair) => `"${pair.opaSource}" (bundle "${pair.bundleName}")`).join(', ');
    return `the live OPA sources ${sources} had loaded the served revision ${quote(facts.revision)}`;
  });
}

/** The verification options of `opa run`, from the plan's bundle source. */
export interface BundleVerification {
  /** The resolved verificationKey: a PEM public key or an HMAC secret. */
  key: string;
  /** The `scope` claim the signature must carry; empty for none. */
  scope: string;
}

export interface ServedBundleDrillOptions {
  scratch: Scratch;
  /** Verified local copy of the served bundle. */
  bundleFile: string;
  /** Key of the artifact, the object of every check. */
  key: string;
  facts: BundleFacts;
  /** Present when the plan's source has a verificationKey. */
  verification?: BundleVerification;
  signal?: AbortSignal;
}

/** Reads data.system.bundles of the drill's OPA: each activated bundle's name and manifest. */
async function activatedBundles(url: string, signal?: AbortSignal): Promise<Record<string, { manifest?: { revision?: string; roots?: string[] } }>> {
  const response = await fetch(`${url}/v1/data/system/bundles`, { signal: signal ? AbortSignal.any([signal, AbortSignal.timeout(30_000)]) : AbortSignal.timeout(30_000) });
  const chunks: Buffer[] = [];
  let size = 0;
  // Leaving the loop early cancels the response body.
  for await (const chunk of response.body ?? []) {
    size += (chunk as Uint8Array).length;
    if (size > MAX_SYSTEM_BUNDLES_BYTES) break;
    chunks.push(Buffer.from(chunk as Uint8Array));
  }
  if (size > MAX_SYSTEM_BUNDLES_BYTES) throw new Error(`GET ${url}/v1/data/system/bundles returned more than ${MAX_SYSTEM_BUNDLES_BYTES} bytes`);
  const text = Buffer.concat(chunks).toString('utf8');
  if (!response.ok) throw new Error(`GET ${url}/v1/data/system/bundles returned ${response.status}: ${text.slice(0, 500)}`);
  return ((JSON.parse(text) as { result?: Record<string, { manifest?: { revision?: string; roots?: string[] } }> }).result ?? {});
}

/**
 * Runs the bundle-activation check of one served bundle. The OPA it starts
 * and its files (the verification key included) are removed before it
 * returns, also when it fails or the signal aborts.
 */
export async function checkBundleActivation(options: ServedBundleDrillOptions): Promise<CheckResult> {
  const { scratch, key, facts, signal } = options;
  const workDirectory = path.join(scratch.directory, `served-bundle-${createHash('sha256').update(key).digest('hex').slice(0, 12)}`);
  await rm(workDirectory, { recursive: true, force: true });
  await mkdir(workDirectory, { recursive: true, mode: 0o700 });
  let opa: DrillProcess | undefined;
  try {
    return await runCheck(BUNDLE_ACTIVATION_CHECK, key, async () => {
      const args: string[] = [];
      let signature: string;
      if (options.verification && facts.signature.verified === true) {
        // opa reads --verification-key as a file when the path exists, so neither a key nor an HMAC secret appears in its arguments.
        const keyFile = path.join(workDirectory, 'verification-key');
        await writeFile(keyFile, options.verification.key, { mode: 0o600 });
        args.push('--verification-key', keyFile, '--verification-key-id', 'default', '--signing-alg', facts.signature.algorithm ?? 'RS256');
        if (options.verification.scope) args.push('--scope', options.verification.scope);
        signature = `; OPA verified its ${facts.signature.algorithm ?? 'RS256'} signature with the plan's verificationKey`;
      } else if (facts.signature.signed) {
        const atBackup =
          facts.signature.verified === true
            ? 'verified, but the plan now gives no verificationKey'
            : facts.signature.verified === false
              ? `failed: ${facts.signature.reason ?? 'no reason recorded'}`
              : 'not checked';
        // OPA rejects a signed bundle without a verification key unless run with --skip-verify.
        args.push('--skip-verify');
        signature = `; OPA skipped its signature check (--skip-verify; at backup time: ${atBackup})`;
      } else {
        signature = '; it is not signed';
      }
      args.push('--bundle', options.bundleFile);

      const started = await startDrillOpa(scratch, args, workDirectory, signal);
      if (!started.opa) throw new CheckFailure(`OPA did not load the bundle: ${started.output}`);
      opa = started.opa.process;

      const bundles = Object.entries(await activatedBundles(started.opa.url, signal));
      if (bundles.length !== 1) {
        const names = bundles.map(([name]) => JSON.stringify(name)).join(', ');
        throw new CheckFailure(`OPA activated ${bundles.length} bundles (${names}); expected the one it was started with`);
      }
      const [, activated] = bundles[0];
      const revision = activated.manifest?.revision ?? '';
      const problems: string[] = [];
      if (revision !== (facts.revision ?? '')) {
        problems.push(`OPA activated revision ${JSON.stringify(revision)}, the manifest records ${quote(facts.revision)}`);
      }
      if (facts.roots !== undefined) {
        const recorded = JSON.stringify([...facts.roots].sort());
        const active = JSON.stringify([...(activated.manifest?.roots ?? [''])].sort());
        if (recorded !== active) problems.push(`OPA activated roots ${active}, the manifest records ${recorded}`);
      }
      if (problems.length > 0) throw new CheckFailure(problems.join('; '));
      return `OPA activated the bundle with revision ${JSON.stringify(revision)}${signature}`;
    });
  } finally {
    await (opa as DrillProcess | undefined)?.stop();
    await rm(workDirectory, { recursive: true, force: true });
  }
}
