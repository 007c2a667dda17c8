// age v1 encryption: round trips through activities/crypto/age, interop in
// both directions with the age CLI (age and age-keygen on PATH, tested with
// 1.1.1), and one distinct error class for each kind of damage.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { PassThrough, Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import {
  CHUNK_BYTES,
  createDecryptStream,
  createEncryptStream,
  DamagedPayloadError,
  generateIdentity,
  HeaderMacMismatchError,
  identityToRecipient,
  InvalidKeyError,
  MalformedHeaderError,
  NoIdentityMatchError,
  NotAgeFileError,
  parseIdentity,
  parseRecipient,
  recipientFingerprint,
  ScryptWorkFactorTooLargeError,
  TrailingDataError,
  TruncatedPayloadError,
  UnsupportedVersionError,
  WrongPassphraseError,
  type DecryptOptions,
  type EncryptOptions,
  type X25519Identity,
} from '../activities/crypto/age';

const ENCRYPTED_CHUNK_BYTES = CHUNK_BYTES + 16;
/** Low scrypt work factor (log2 N) that keeps passphrase tests fast. */
const FAST_WORK_FACTOR = 10;
const SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536, 5_000_000];

let workDirectory: string;

before(() => {
  workDirectory = mkdtempSync(path.join(tmpdir(), 'age-test-'));
});

after(() => {
  rmSync(workDirectory, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/** Splits data into pieces of varying sizes, so chunk boundaries fall inside writes. */
function* pieces(data: Buffer): Generator<Buffer> {
  const sizes = [1, 7, 4093, 65536, 65552, 100_003];
  let offset = 0;
  let turn = 0;
  while (offset < data.length) {
    const size = sizes[turn++ % sizes.length];
    yield data.subarray(offset, offset + size);
    offset += size;
  }
}

async function collect(source: Readable | Iterable<Buffer>, transform: NodeJS.ReadWriteStream): Promise<Buffer> {
  const output: Buffer[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      output.push(chunk);
      callback();
    },
  });
  await pipeline(Readable.from(source), transform, sink);
  return Buffer.concat(output);
}

function encrypt(plaintext: Buffer, options: EncryptOptions): Promise<Buffer> {
  return collect(pieces(plaintext), createEncryptStream(options));
}

function decrypt(ciphertext: Buffer, options: DecryptOptions): Promise<Buffer> {
  return collect(pieces(ciphertext), createDecryptStream(options));
}

/** Asserts that decryption fails with exactly this class, not a subclass or parent; returns the error. */
async function expectDecryptError<T extends Error>(
  ciphertext: Buffer,
  options: DecryptOptions,
  errorClass: new (...args: never[]) => T,
): Promise<T> {
  let caught: unknown;
  try {
    await decrypt(ciphertext, options);
  } catch (error) {
    caught = error;
  }
  assert.ok(caught instanceof Error, `expected ${errorClass.name}, but decryption succeeded`);
  assert.equal(caught.constructor.name, errorClass.name, `expected ${errorClass.name}, got: ${caught.constructor.name}: ${caught.message}`);
  return caught as T;
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Byte length of the header: everything up to and including the newline after the "--- " MAC line. */
function headerLength(file: Buffer): number {
  const marker = file.indexOf('\n---');
  return file.indexOf(0x0a, marker + 1) + 1;
}

function withByteChanged(data: Buffer, offset: number, value?: number): Buffer {
  const copy = Buffer.from(data);
  copy[offset] = value ?? copy[offset] ^ 0x01;
  return copy;
}

/** Creates a key with age-keygen and returns the file path, the parsed identity and the CLI's recipient. */
function keygen(name: string): { file: string; identity: X25519Identity; recipient: string } {
  const file = path.join(workDirectory, `${name}.key`);
  execFileSync('age-keygen', ['-o', file], { stdio: ['ignore', 'ignore', 'ignore'] });
  const recipient = execFileSync('age-keygen', ['-y', file], { encoding: 'utf8' }).trim();
  const [identity] = parseIdentity(readFileSync(file, 'utf8'));
  return { file, identity, recipient };
}

function writeTemp(name: string, data: Buffer): string {
  const file = path.join(workDirectory, name);
  writeFileSync(file, data);
  return file;
}

/**
 * Runs an age command on a pseudo-terminal made by util-linux `script`,
 * because age 1.1.1 reads passphrases only from /dev/tty and has no
 * environment variable or flag for them. Each line is typed as input.
 */
function runWithTerminal(command: string, lines: string[]): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('script', ['-qec', command, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'], timeout: 60_000 });
    let output = '';
    child.stdout.on('data', (data: Buffer) => (output += data.toString()));
    child.stderr.on('data', (data: Buffer) => (output += data.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, output }));
    // stdin stays open until age exits, because script stops the session at end of input.
    child.stdin.write(lines.map((line) => `${line}\n`).join(''));
    child.on('exit', () => child.stdin.end());
  });
}

function shellQuote(text: string): string {
  return `'${text.replace(/'/g, `'\\''`)}'`;
}

const hasScript = existsSync('/usr/bin/script') || existsSync('/bin/script');

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

describe('age keys', () => {
  test('identity from age-keygen file', () => {
    const key = keygen('keys');
    assert.equal(identityToRecipient(key.identity).toString(), key.recipient);
    assert.equal(parseRecipient(key.recipient).toString(), key.recipient);
    const secretLine = readFileSync(key.file, 'utf8')
      .split('\n')
      .find((line) => line.startsWith('AGE-SECRET-KEY-1'));
    assert.equal(key.identity.encodeSecret(), secretLine);
  });

  test('generated identity matches age-keygen -y', () => {
    const identity = generateIdentity();
    const file = writeTemp('generated.key', Buffer.from(`${identity.encodeSecret()}\n`));
    const recipient = execFileSync('age-keygen', ['-y', file], { encoding: 'utf8' }).trim();
    assert.equal(identity.recipient.toString(), recipient);
  });

  test('identity file with comments and two keys', () => {
    const first = generateIdentity();
    const second = generateIdentity();
    const text = `# created: today\n# public key: ${first.recipient}\n${first.encodeSecret()}\n\n# second\r\n${second.encodeSecret()}\n`;
    const identities = parseIdentity(text);
    assert.equal(identities.length, 2);
    assert.equal(identities[0].recipient.toString(), first.recipient.toString());
    assert.equal(identities[1].recipient.toString(), second.recipient.toString());
  });

  test('identity is not shown by toString', () => {
    const identity = generateIdentity();
    assert.ok(!String(identity).includes('AGE-SECRET-KEY'));
    assert.ok(!JSON.stringify({ text: `${identity}` }).includes(identity.encodeSecret()));
  });

  test('invalid keys are rejected', () => {
    const recipient = generateIdentity().recipient.toString();
    const lastCharacter = recipient.at(-1) === 'q' ? 'p' : 'q';
    assert.throws(() => parseRecipient(recipient.slice(0, -1) + lastCharacter), InvalidKeyError);
    assert.throws(() => parseRecipient('ssh-ed25519 AAAA'), InvalidKeyError);
    assert.throws(() => parseRecipient(recipient.slice(0, 10) + recipient.slice(10).toUpperCase()), InvalidKeyError);
    assert.throws(() => parseIdentity('# only a comment\n'), InvalidKeyError);
    assert.throws(() => parseIdentity(`${generateIdentity().encodeSecret()}\nnot a key\n`), /line 2/);
  });

  test('recipient fingerprint', () => {
    const recipient = generateIdentity().recipient;
    const expected = createHash('sha256').update(recipient.toString()).digest('hex').slice(0, 16);
    assert.equal(recipientFingerprint(recipient), expected);
    assert.equal(recipientFingerprint(recipient.toString()), expected);
    assert.match(expected, /^[0-9a-f]{16}$/);
  });
});

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

describe('age round trips', () => {
  const alice = generateIdentity();
  const bob = generateIdentity();

  for (const size of SIZES) {
    test(`one recipient, ${size} bytes`, async () => {
      const plaintext = randomBytes(size);
      const ciphertext = await encrypt(plaintext, { recipients: [alice.recipient] });
      const chunks = Math.max(1, Math.ceil(size / CHUNK_BYTES));
      assert.equal(ciphertext.length - headerLength(ciphertext), 16 + size + 16 * chunks);
      const decrypted = await decrypt(ciphertext, { identities: [alice] });
      assert.equal(decrypted.length, size);
      assert.equal(sha256(decrypted), sha256(plaintext));
    });

    test(`two recipients, ${size} bytes`, async () => {
      const plaintext = randomBytes(size);
      const ciphertext = await encrypt(plaintext, { recipients: [alice.recipient, bob.recipient] });
      assert.equal(ciphertext.toString('latin1', 0, headerLength(ciphertext)).match(/^-> X25519 /gm)?.length, 2);
      assert.equal(sha256(await decrypt(ciphertext, { identities: [alice] })), sha256(plaintext));
      assert.equal(sha256(await decrypt(ciphertext, { identities: [bob] })), sha256(plaintext));
    });

    test(`passphrase, ${size} bytes`, async () => {
      const plaintext = randomBytes(size);
      const ciphertext = await encrypt(plaintext, { passphrase: 'correct horse', scryptWorkFactor: FAST_WORK_FACTOR });
      const header = ciphertext.toString('latin1', 0, headerLength(ciphertext));
      assert.match(header, /^age-encryption\.org\/v1\n-> scrypt [A-Za-z0-9+/]{22} 10\n[A-Za-z0-9+/]{43}\n--- /);
      assert.equal(sha256(await decrypt(ciphertext, { passphrase: 'correct horse' })), sha256(plaintext));
    });
  }

  test('identity list with a non-matching key first', async () => {
    const plaintext = randomBytes(1000);
    const ciphertext = await encrypt(plaintext, { recipients: [bob.recipient] });
    assert.deepEqual(await decrypt(ciphertext, { identities: [alice, bob] }), plaintext);
  });

  test('encrypt emits output before input ends', async () => {
    const stream = createEncryptStream({ recipients: [alice.recipient] });
    const output = new PassThrough();
    stream.pipe(output);
    let received = 0;
    output.on('data', (data: Buffer) => (received += data.length));
    for (let index = 0; index < 16; index++) stream.write(randomBytes(CHUNK_BYTES));
    await new Promise((resolve) => setImmediate(resolve));
    // 15 of the 16 chunks are sealed, and the last waits because it may be the final chunk.
    assert.ok(received >= 15 * ENCRYPTED_CHUNK_BYTES, `only ${received} bytes emitted before end()`);
    stream.end();
  });

  test('encrypt options are validated', () => {
    assert.throws(() => createEncryptStream({}), InvalidKeyError);
    assert.throws(() => createEncryptStream({ recipients: [alice.recipient], passphrase: 'x' }), InvalidKeyError);
    assert.throws(() => createEncryptStream({ passphrase: '' }), InvalidKeyError);
    assert.throws(() => createEncryptStream({ passphrase: 'x', scryptWorkFactor: 0 }), InvalidKeyError);
    assert.throws(() => createDecryptStream({}), InvalidKeyError);
  });
});

// ---------------------------------------------------------------------------
// Interop with the age CLI
// ---------------------------------------------------------------------------

describe('age CLI interop', () => {
  for (const size of [0, 65536, 5_000_000]) {
    test(`CLI decrypts ours, ${size} bytes`, async () => {
      const key = keygen(`cli-decrypt-${size}`);
      const other = generateIdentity();
      const plaintext = randomBytes(size);
      const ciphertext = await encrypt(plaintext, { recipients: [other.recipient, parseRecipient(key.recipient)] });
      const input = writeTemp(`ours-${size}.age`, ciphertext);
      // Standard output, because age 1.1.1 creates the -o file only when it writes plaintext.
      const decrypted = execFileSync('age', ['-d', '-i', key.file, input], { maxBuffer: 64 * 1024 * 1024 });
      assert.equal(decrypted.length, size);
      assert.equal(sha256(decrypted), sha256(plaintext));
    });

    test(`we decrypt CLI output, ${size} bytes`, async () => {
      const key = keygen(`cli-encrypt-${size}`);
      const other = generateIdentity();
      const plaintext = randomBytes(size);
      const input = writeTemp(`plain-${size}.bin`, plaintext);
      const output = path.join(workDirectory, `cli-${size}.age`);
      execFileSync('age', ['-r', other.recipient.toString(), '-r', key.recipient, '-o', output, input]);
      const identities = parseIdentity(readFileSync(key.file, 'utf8'));
      assert.equal(sha256(await decrypt(readFileSync(output), { identities })), sha256(plaintext));
    });
  }

  test('CLI rejects our damaged payload', async () => {
    const key = keygen('cli-damaged');
    const ciphertext = await encrypt(randomBytes(100_000), { recipients: [parseRecipient(key.recipient)] });
    const input = writeTemp('damaged.age', withByteChanged(ciphertext, ciphertext.length - 10));
    assert.throws(() => execFileSync('age', ['-d', '-i', key.file, input], { stdio: 'pipe' }));
  });

  test('CLI decrypts our passphrase file, work factor 18', { skip: !hasScript && 'util-linux script is not installed' }, async () => {
    const plaintext = randomBytes(200_000);
    const ciphertext = await encrypt(plaintext, { passphrase: 'interop passphrase' });
    assert.match(ciphertext.toString('latin1', 0, 100), /-> scrypt \S+ 18\n/);
    const input = writeTemp('ours-passphrase.age', ciphertext);
    const output = path.join(workDirectory, 'ours-passphrase.out');
    const result = await runWithTerminal(`age -d -o ${shellQuote(output)} ${shellQuote(input)}`, ['interop passphrase']);
    assert.equal(result.code, 0, result.output);
    assert.equal(sha256(readFileSync(output)), sha256(plaintext));
  });

  test('we decrypt CLI passphrase file', { skip: !hasScript && 'util-linux script is not installed' }, async () => {
    const plaintext = randomBytes(70_000);
    const input = writeTemp('cli-passphrase.bin', plaintext);
    const output = path.join(workDirectory, 'cli-passphrase.age');
    const result = await runWithTerminal(`age -p -o ${shellQuote(output)} ${shellQuote(input)}`, ['cli passphrase', 'cli passphrase']);
    assert.equal(result.code, 0, result.output);
    const ciphertext = readFileSync(output);
    assert.equal(sha256(await decrypt(ciphertext, { passphrase: 'cli passphrase' })), sha256(plaintext));
    await expectDecryptError(ciphertext, { passphrase: 'cli passphrase!' }, WrongPassphraseError);
  });
});

// ---------------------------------------------------------------------------
// Damage
// ---------------------------------------------------------------------------

describe('age damage detection', () => {
  const alice = generateIdentity();
  const bob = generateIdentity();
  /** Three full chunks, so the final chunk is full-size. */
  const fullChunks = randomBytes(3 * CHUNK_BYTES);
  /** Three full chunks and a 100-byte final chunk. */
  const shortFinal = randomBytes(3 * CHUNK_BYTES + 100);
  let fullFile: Buffer;
  let shortFile: Buffer;

  before(async () => {
    fullFile = await encrypt(fullChunks, { recipients: [alice.recipient] });
    shortFile = await encrypt(shortFinal, { recipients: [alice.recipient] });
  });

  test('wrong identity', async () => {
    const error = await expectDecryptError(fullFile, { identities: [bob] }, NoIdentityMatchError);
    assert.match(error.message, /no identity matched/);
  });

  test('wrong passphrase', async () => {
    const file = await encrypt(randomBytes(1000), { passphrase: 'right', scryptWorkFactor: FAST_WORK_FACTOR });
    await expectDecryptError(file, { passphrase: 'wrong' }, WrongPassphraseError);
  });

  test('identity for passphrase file', async () => {
    const file = await encrypt(randomBytes(1000), { passphrase: 'right', scryptWorkFactor: FAST_WORK_FACTOR });
    await expectDecryptError(file, { identities: [alice] }, NoIdentityMatchError);
  });

  test('scrypt work factor above maximum', async () => {
    const file = await encrypt(randomBytes(10), { passphrase: 'right', scryptWorkFactor: FAST_WORK_FACTOR });
    await expectDecryptError(file, { passphrase: 'right', maxScryptWorkFactor: FAST_WORK_FACTOR - 1 }, ScryptWorkFactorTooLargeError);
  });

  test('flipped byte in header MAC', async () => {
    // Character 10 of the 43-character MAC: changing it keeps the base64 canonical but changes the MAC.
    const macStart = fullFile.indexOf('\n--- ') + 5;
    const original = fullFile[macStart + 10];
    const replacement = original === 0x41 ? 0x42 : 0x41;
    const damaged = withByteChanged(fullFile, macStart + 10, replacement);
    const emitted: Buffer[] = [];
    const stream = createDecryptStream({ identities: [alice] });
    stream.on('data', (data: Buffer) => emitted.push(data));
    await assert.rejects(pipeline(Readable.from([damaged]), stream), HeaderMacMismatchError);
    assert.equal(emitted.length, 0, 'plaintext was emitted before the header MAC was checked');
  });

  test('flipped byte in another stanza', async () => {
    // The first stanza still unwraps the file key, and the MAC then covers the change in the second.
    const file = await encrypt(randomBytes(1000), { recipients: [alice.recipient, bob.recipient] });
    const secondStanza = file.indexOf('-> X25519 ', file.indexOf('-> X25519 ') + 1);
    const offset = secondStanza + '-> X25519 '.length + 5;
    const damaged = withByteChanged(file, offset, file[offset] === 0x41 ? 0x42 : 0x41);
    await expectDecryptError(damaged, { identities: [alice] }, HeaderMacMismatchError);
  });

  test('flipped byte in own stanza', async () => {
    // The changed ephemeral share no longer unwraps the file key, so the MAC cannot be checked.
    const offset = fullFile.indexOf('-> X25519 ') + '-> X25519 '.length + 5;
    const damaged = withByteChanged(fullFile, offset, fullFile[offset] === 0x41 ? 0x42 : 0x41);
    await expectDecryptError(damaged, { identities: [alice] }, NoIdentityMatchError);
  });

  test('invalid base64 in header', async () => {
    const offset = fullFile.indexOf('-> X25519 ') + '-> X25519 '.length + 5;
    await expectDecryptError(withByteChanged(fullFile, offset, 0x2a), { identities: [alice] }, MalformedHeaderError);
  });

  test('scrypt stanza mixed with X25519', async () => {
    const passphraseFile = await encrypt(randomBytes(10), { passphrase: 'p', scryptWorkFactor: FAST_WORK_FACTOR });
    const scryptStanza = passphraseFile.subarray(passphraseFile.indexOf('-> scrypt'), passphraseFile.indexOf('\n---') + 1);
    const versionEnd = fullFile.indexOf(0x0a) + 1;
    const mixed = Buffer.concat([fullFile.subarray(0, versionEnd), scryptStanza, fullFile.subarray(versionEnd)]);
    await expectDecryptError(mixed, { passphrase: 'p' }, MalformedHeaderError);
  });

  test('header cut short', async () => {
    await expectDecryptError(fullFile.subarray(0, headerLength(fullFile) - 5), { identities: [alice] }, MalformedHeaderError);
  });

  test('unsupported version', async () => {
    const damaged = Buffer.concat([Buffer.from('age-encryption.org/v2\n'), fullFile.subarray(fullFile.indexOf(0x0a) + 1)]);
    const error = await expectDecryptError(damaged, { identities: [alice] }, UnsupportedVersionError);
    assert.equal(error.version, 'v2');
  });

  test('not an age file', async () => {
    await expectDecryptError(Buffer.from('{"policies": []}\n'), { identities: [alice] }, NotAgeFileError);
    await expectDecryptError(randomBytes(100_000), { identities: [alice] }, NotAgeFileError);
    await expectDecryptError(Buffer.alloc(0), { identities: [alice] }, NotAgeFileError);
    const armored = Buffer.from('-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n-----END AGE ENCRYPTED FILE-----\n');
    const error = await expectDecryptError(armored, { identities: [alice] }, NotAgeFileError);
    assert.match(error.message, /ASCII-armored/);
  });

  test('flipped byte in first chunk', async () => {
    const offset = headerLength(fullFile) + 16 + 1000;
    const error = await expectDecryptError(withByteChanged(fullFile, offset), { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 0);
  });

  test('flipped byte in full-size last chunk', async () => {
    const error = await expectDecryptError(withByteChanged(fullFile, fullFile.length - 100), { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 2);
  });

  test('flipped byte in short last chunk', async () => {
    const error = await expectDecryptError(withByteChanged(shortFile, shortFile.length - 1), { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 3);
  });

  test('flipped payload nonce', async () => {
    const offset = headerLength(fullFile) + 3;
    const error = await expectDecryptError(withByteChanged(fullFile, offset), { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 0);
  });

  test('last full-size chunk dropped', async () => {
    const truncated = fullFile.subarray(0, fullFile.length - ENCRYPTED_CHUNK_BYTES);
    const error = await expectDecryptError(truncated, { identities: [alice] }, TruncatedPayloadError);
    assert.equal(error.chunkIndex, 2);
  });

  test('last short chunk dropped', async () => {
    const truncated = shortFile.subarray(0, shortFile.length - 116);
    const error = await expectDecryptError(truncated, { identities: [alice] }, TruncatedPayloadError);
    assert.equal(error.chunkIndex, 3);
  });

  test('few bytes dropped from end', async () => {
    // A cut inside the final chunk is indistinguishable from damage to it, so the error is DamagedPayloadError.
    const error = await expectDecryptError(fullFile.subarray(0, fullFile.length - 5), { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 2);
    const shortError = await expectDecryptError(shortFile.subarray(0, shortFile.length - 5), { identities: [alice] }, DamagedPayloadError);
    assert.equal(shortError.chunkIndex, 3);
  });

  test('payload cut to fewer than 16 bytes', async () => {
    const cut = fullFile.subarray(0, headerLength(fullFile) + 16 + 2 * ENCRYPTED_CHUNK_BYTES + 10);
    const error = await expectDecryptError(cut, { identities: [alice] }, TruncatedPayloadError);
    assert.equal(error.chunkIndex, 2);
  });

  test('payload missing entirely', async () => {
    await expectDecryptError(fullFile.subarray(0, headerLength(fullFile)), { identities: [alice] }, TruncatedPayloadError);
    await expectDecryptError(fullFile.subarray(0, headerLength(fullFile) + 16), { identities: [alice] }, TruncatedPayloadError);
  });

  test('empty plaintext cut to its nonce', async () => {
    const empty = await encrypt(Buffer.alloc(0), { recipients: [alice.recipient] });
    await expectDecryptError(empty.subarray(0, empty.length - 16), { identities: [alice] }, TruncatedPayloadError);
  });

  test('trailing garbage after full-size final chunk', async () => {
    const withGarbage = Buffer.concat([fullFile, Buffer.from('garbage')]);
    const error = await expectDecryptError(withGarbage, { identities: [alice] }, TrailingDataError);
    assert.equal(error.chunkIndex, 2);
  });

  test('trailing garbage after short final chunk', async () => {
    // The final chunk boundary is unknown when the chunk is shorter than 64 KiB, so the chunk fails authentication.
    const withGarbage = Buffer.concat([shortFile, Buffer.from('garbage')]);
    const error = await expectDecryptError(withGarbage, { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 3);
  });

  test('chunks reordered', async () => {
    const payloadStart = headerLength(fullFile) + 16;
    const first = fullFile.subarray(payloadStart, payloadStart + ENCRYPTED_CHUNK_BYTES);
    const second = fullFile.subarray(payloadStart + ENCRYPTED_CHUNK_BYTES, payloadStart + 2 * ENCRYPTED_CHUNK_BYTES);
    const reordered = Buffer.concat([fullFile.subarray(0, payloadStart), second, first, fullFile.subarray(payloadStart + 2 * ENCRYPTED_CHUNK_BYTES)]);
    const error = await expectDecryptError(reordered, { identities: [alice] }, DamagedPayloadError);
    assert.equal(error.chunkIndex, 0);
  });
});
