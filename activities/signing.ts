// Ed25519 signatures of manifests. The signature is detached: 64 raw bytes
// in manifest.json.sig over the exact bytes of manifest.json, so OpenSSL can
// check it without this project:
//   openssl pkeyutl -verify -pubin -inkey signing.pub.pem -rawin -in manifest.json -sigfile manifest.json.sig
import { createHash, createPrivateKey, createPublicKey, sign, verify, type KeyObject } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Plan } from '../common/plan';
import { resolveSecret } from './secrets';

/** Short id of a public key: the first 16 hex digits of the SHA-256 of its SPKI DER encoding. */
export function signingKeyId(publicKey: KeyObject): string {
  return createHash('sha256').update(publicKey.export({ format: 'der', type: 'spki' })).digest('hex').slice(0, 16);
}

function requireEd25519(key: KeyObject, origin: string): void {
  if (key.asymmetricKeyType !== 'ed25519') {
    throw new Error(`${origin} is a ${key.asymmetricKeyType ?? 'symmetric'} key; manifests are signed with Ed25519 keys (openssl genpkey -algorithm ed25519)`);
  }
}

/** Loads the plan's signing key, or returns undefined when the plan does not sign manifests. */
export function loadSigningKey(plan: Plan): { privateKey: KeyObject; keyId: string } | undefined {
  if (!plan.signing?.key) return undefined;
  const pem = resolveSecret(plan.signing.key, 'signing.key');
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(pem);
  } catch (error) {
    throw new Error(`signing.key (${plan.signing.key}) is not a PEM private key: ${(error as Error).message}`);
  }
  requireEd25519(privateKey, `signing.key (${plan.signing.key})`);
  return { privateKey, keyId: signingKeyId(createPublicKey(privateKey)) };
}

/**
 * Loads the key that checks the plan's manifests: signing.publicKeyFile, or
 * the public half of signing.key when only that is set and readable here.
 * Returns undefined when the plan names no key.
 */
export function loadVerifyKey(plan: Plan): { publicKey: KeyObject; keyId: string } | undefined {
  if (plan.signing?.publicKeyFile) {
    let publicKey: KeyObject;
    try {
      publicKey = createPublicKey(readFileSync(plan.signing.publicKeyFile));
    } catch (error) {
      throw new Error(`signing.publicKeyFile ${plan.signing.publicKeyFile} is not a readable PEM public key: ${(error as Error).message}`);
    }
    requireEd25519(publicKey, `signing.publicKeyFile ${plan.signing.publicKeyFile}`);
    return { publicKey, keyId: signingKeyId(publicKey) };
  }
  const signing = loadSigningKey(plan);
  return signing ? { publicKey: createPublicKey(signing.privateKey), keyId: signing.keyId } : undefined;
}

export function signManifest(manifest: Buffer, privateKey: KeyObject): Buffer {
  return sign(null, manifest, privateKey);
}

export function verifyManifest(manifest: Buffer, signature: Buffer, publicKey: KeyObject): boolean {
  return signature.length === 64 && verify(null, manifest, publicKey, signature);
}
