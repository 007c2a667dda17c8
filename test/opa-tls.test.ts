// Snapshots over HTTPS: the plan's CA file verifies OPA's certificate, a
// server with an unknown CA is rejected, and mutual TLS sends the client
// certificate with its key read from a secret reference.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { connectOpa } from '../activities/opa/client';
import { snapshotOpa } from '../activities/opa/snapshot';
import { freePort } from './harness/ports';
import { startProcess, runsDirectory, type ManagedProcess } from './harness/process';
import { tool } from './harness/tools';

let folder: string;
let opa: ManagedProcess;
let url: string;

function openssl(args: string[]): void {
  execFileSync('openssl', args, { cwd: folder, stdio: 'ignore' });
}

/** Creates a CA and a certificate signed by it for 127.0.0.1, named `<name>.pem` and `<name>-key.pem`. */
function issueCertificate(name: string, extension: string): void {
  openssl(['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${name}`]);
  writeFileSync(path.join(folder, `${name}.ext`), extension);
  openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${name}.pem`, '-days', '2', '-extfile', `${name}.ext`]);
}

async function waitForTls(port: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      execFileSync('openssl', ['s_client', '-connect', `127.0.0.1:${port}`], { input: '', stdio: ['pipe', 'ignore', 'ignore'], timeout: 2000 });
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`OPA did not serve TLS on ${port}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

before(async () => {
  folder = mkdtempSync(path.join(runsDirectory, 'tls-'));
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=opa-backup test CA']);
  issueCertificate('server', 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  issueCertificate('client', 'extendedKeyUsage=clientAuth\n');
  writeFileSync(path.join(folder, 'data.json'), '{"tls":{"ok":true}}');

  const port = await freePort();
  url = `https://127.0.0.1:${port}`;
  opa = startProcess('tls-opa', tool('opa'), [
    'run',
    '--server',
    '--addr',
    `127.0.0.1:${port}`,
    '--log-level',
    'error',
    '--tls-cert-file',
    path.join(folder, 'server.pem'),
    '--tls-private-key-file',
    path.join(folder, 'server-key.pem'),
    '--tls-ca-cert-file',
    path.join(folder, 'ca.pem'),
    '--authentication',
    'tls',
    path.join(folder, 'data.json'),
  ]);
  await waitForTls(port);
});

after(async () => {
  await opa?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

test('snapshot over mutual TLS with the plan CA', async () => {
  process.env.OPA_TLS_TEST_CLIENT_KEY = readFileSync(path.join(folder, 'client-key.pem'), 'utf8');
  const connection = connectOpa(
    {
      name: 'tls',
      url,
      tls: { caFile: path.join(folder, 'ca.pem'), certFile: path.join(folder, 'client.pem'), key: 'env:OPA_TLS_TEST_CLIENT_KEY' },
    },
    0,
  );
  const dataFile = path.join(folder, 'snapshot.json');
  await snapshotOpa(connection, { probes: [], dataFile });
  assert.equal(readFileSync(dataFile, 'utf8'), '{"tls":{"ok":true}}');
});

test('snapshot rejects a server certificate from an unknown CA', async () => {
  const connection = connectOpa({ name: 'tls', url }, 0);
  await assert.rejects(
    snapshotOpa(connection, { probes: [], dataFile: path.join(folder, 'rejected.json') }),
    /snapshot of OPA "tls" failed: GET \/v1\/policies to https:\/\/127\.0\.0\.1:\d+: (SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)/,
  );
});

test('snapshot without a client certificate is rejected by OPA', async () => {
  const connection = connectOpa({ name: 'tls', url, tls: { caFile: path.join(folder, 'ca.pem') } }, 0);
  await assert.rejects(snapshotOpa(connection, { probes: [], dataFile: path.join(folder, 'no-client.json') }), /snapshot of OPA "tls" failed/);
});
