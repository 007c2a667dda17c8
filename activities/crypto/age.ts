// Streaming encryption and decryption in the age v1 file format
// (https://age-encryption.org/v1, also published as https://c2sp.org/age),
// built on node:crypto only. It supports X25519 recipients and scrypt
// passphrases. Files it writes decrypt with the `age` CLI and it decrypts
// the CLI's binary output. The ASCII-armored format is not supported.
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  hkdfSync,
  randomBytes,
  scrypt,
  timingSafeEqual,
  type KeyObject,
} from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { inspect } from 'node:util';

// ---------------------------------------------------------------------------
// Format constants
// ---------------------------------------------------------------------------

const VERSION_PREFIX = 'age-encryption.org/';
const VERSION_LINE = 'age-encryption.org/v1';
const ARMOR_BEGIN = '-----BEGIN AGE ENCRYPTED FILE-----';
const X25519_INFO = 'age-encryption.org/v1/X25519';
const SCRYPT_SALT_LABEL = 'age-encryption.org/v1/scrypt';

const FILE_KEY_BYTES = 16;
const PAYLOAD_NONCE_BYTES = 16;
const TAG_BYTES = 16;
/** Plaintext bytes per STREAM chunk. Every chunk but the last has exactly this size. */
export const CHUNK_BYTES = 64 * 1024;
const ENCRYPTED_CHUNK_BYTES = CHUNK_BYTES + TAG_BYTES;
/**
 * Buffer size of both sides of the encrypt and decrypt streams. Node 20's
 * default of 16 KiB is smaller than one chunk, which stops reading, crypto
 * and writing from overlapping.
 */
const STREAM_HIGH_WATER_MARK = 1024 * 1024;
/** Stanza bodies are base64 wrapped at this many columns. */
const BODY_COLUMNS = 64;

/** The age CLI 1.1.1 encrypts passphrases with this scrypt work factor (log2 N). */
export const DEFAULT_SCRYPT_WORK_FACTOR = 18;
/**
 * Largest scrypt work factor accepted when decrypting, as in the age CLI 1.1.1.
 * scrypt needs 128 * 8 * 2^workFactor bytes, so 22 needs 4 GiB of memory.
 */
export const DEFAULT_MAX_SCRYPT_WORK_FACTOR = 22;
/**
 * Largest header the decryptor buffers. A header with ten thousand X25519
 * stanzas takes about 1 MB, so a larger one is treated as damaged.
 */
export const MAX_HEADER_BYTES = 4 * 1024 * 1024;

// DER prefixes that wrap a raw 32-byte X25519 key (OID 1.3.101.110) in PKCS#8 and SPKI.
const PKCS8_X25519_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_X25519_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/** Base class of every error this module raises for invalid keys or files. */
export class AgeError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A recipient, identity or passphrase option is invalid. */
export class InvalidKeyError extends AgeError {}

/** The input does not start with an age version line. */
export class NotAgeFileError extends AgeError {}

/** The input is an age file of a version other than v1. */
export class UnsupportedVersionError extends AgeError {
  constructor(readonly version: string) {
    super(`unsupported age format version "${version}"; only age-encryption.org/v1 is supported`);
  }
}

/** The header is syntactically invalid, truncated or too large. */
export class MalformedHeaderError extends AgeError {}

/** The header MAC does not match, so the header was modified after encryption. */
export class HeaderMacMismatchError extends AgeError {}

/** None of the given identities can unwrap the file key from the header stanzas. */
export class NoIdentityMatchError extends AgeError {}

/** The passphrase does not unwrap the file key from the scrypt stanza. */
export class WrongPassphraseError extends AgeError {}

/** The scrypt stanza requires a larger work factor than the decryptor accepts. */
export class ScryptWorkFactorTooLargeError extends AgeError {
  constructor(readonly workFactor: number, readonly maxWorkFactor: number) {
    super(
      `scrypt work factor ${workFactor} exceeds the maximum of ${maxWorkFactor}; ` +
        'raise maxScryptWorkFactor if the file is trusted',
    );
  }
}

/**
 * A payload chunk failed authentication, so the payload was modified or cut.
 * chunkIndex counts from 0 after the 16-byte payload nonce.
 */
export class DamagedPayloadError extends AgeError {
  constructor(readonly chunkIndex: number, message: string, options?: ErrorOptions) {
    super(`payload chunk ${chunkIndex}: ${message}`, options);
  }
}

/** The payload ends before its final chunk, so data is missing from the end. */
export class TruncatedPayloadError extends DamagedPayloadError {}

/** Bytes follow the final payload chunk. */
export class TrailingDataError extends DamagedPayloadError {}

// ---------------------------------------------------------------------------
// Bech32 (BIP 173 without its 90-character limit, as age requires)
// ---------------------------------------------------------------------------

const BECH32_CHARSET = 'qpzry9x8gf2tvdw0s3jn54khce6mua7l';
const BECH32_GENERATORS = [0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3];

function bech32Polymod(values: number[]): number {
  let checksum = 1;
  for (const value of values) {
    const top = checksum >>> 25;
    checksum = ((checksum & 0x1ffffff) << 5) ^ value;
    for (let bit = 0; bit < 5; bit++) {
      if ((top >>> bit) & 1) checksum ^= BECH32_GENERATORS[bit];
    }
  }
  return checksum >>> 0;
}

function bech32ExpandPrefix(prefix: string): number[] {
  const values: number[] = [];
  for (const character of prefix) values.push(character.charCodeAt(0) >>> 5);
  values.push(0);
  for (const character of prefix) values.push(character.charCodeAt(0) & 31);
  return values;
}

/** Regroups bits, for example from bytes (8) into bech32 characters (5). */
function convertBits(data: ArrayLike<number>, fromBits: number, toBits: number, pad: boolean): number[] | undefined {
  let accumulator = 0;
  let bitCount = 0;
  const result: number[] = [];
  const maxValue = (1 << toBits) - 1;
  for (let index = 0; index < data.length; index++) {
    accumulator = (accumulator << fromBits) | data[index];
    bitCount += fromBits;
    while (bitCount >= toBits) {
      bitCount -= toBits;
      result.push((accumulator >>> bitCount) & maxValue);
    }
    accumulator &= (1 << bitCount) - 1;
  }
  if (pad) {
    if (bitCount > 0) result.push((accumulator << (toBits - bitCount)) & maxValue);
  } else if (bitCount >= fromBits || accumulator !== 0) {
    // Leftover bits must be fewer than one input group and all zero.
    return undefined;
  }
  return result;
}

/** Encodes bytes as lowercase bech32 with the given human-readable prefix. */
export function bech32Encode(prefix: string, data: Uint8Array): string {
  const lowerPrefix = prefix.toLowerCase();
  const words = convertBits(data, 8, 5, true) as number[];
  const checksumInput = [...bech32ExpandPrefix(lowerPrefix), ...words, 0, 0, 0, 0, 0, 0];
  const checksum = bech32Polymod(checksumInput) ^ 1;
  let text = `${lowerPrefix}1`;
  for (const word of words) text += BECH32_CHARSET[word];
  for (let index = 0; index < 6; index++) text += BECH32_CHARSET[(checksum >>> (5 * (5 - index))) & 31];
  return text;
}

/** Decodes a bech32 string. Throws InvalidKeyError on a bad checksum, mixed case or bad padding. */
export function bech32Decode(text: string): { prefix: string; data: Buffer } {
  if (text !== text.toLowerCase() && text !== text.toUpperCase()) {
    throw new InvalidKeyError('invalid bech32 string: mixes upper and lower case');
  }
  const lower = text.toLowerCase();
  const separator = lower.lastIndexOf('1');
  if (separator < 1 || separator + 7 > lower.length) {
    throw new InvalidKeyError('invalid bech32 string: separator "1" missing or checksum too short');
  }
  const prefix = lower.slice(0, separator);
  for (const character of prefix) {
    const code = character.charCodeAt(0);
    if (code < 33 || code > 126) throw new InvalidKeyError('invalid bech32 string: invalid character in prefix');
  }
  const words: number[] = [];
  for (const character of lower.slice(separator + 1)) {
    const word = BECH32_CHARSET.indexOf(character);
    if (word === -1) throw new InvalidKeyError(`invalid bech32 string: invalid character "${character}"`);
    words.push(word);
  }
  if (bech32Polymod([...bech32ExpandPrefix(prefix), ...words]) !== 1) {
    throw new InvalidKeyError('invalid bech32 string: checksum mismatch');
  }
  const bytes = convertBits(words.slice(0, -6), 5, 8, false);
  if (bytes === undefined) throw new InvalidKeyError('invalid bech32 string: invalid padding');
  return { prefix, data: Buffer.from(bytes) };
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

const RECIPIENT_PREFIX = 'age';
const IDENTITY_PREFIX = 'AGE-SECRET-KEY-';

function x25519PublicKeyObject(raw: Buffer): KeyObject {
  return createPublicKey({ key: Buffer.concat([SPKI_X25519_PREFIX, raw]), format: 'der', type: 'spki' });
}

function x25519PrivateKeyObject(raw: Buffer): KeyObject {
  return createPrivateKey({ key: Buffer.concat([PKCS8_X25519_PREFIX, raw]), format: 'der', type: 'pkcs8' });
}

function rawPublicKey(key: KeyObject): Buffer {
  const der = key.export({ format: 'der', type: 'spki' });
  return der.subarray(der.length - 32);
}

/** An X25519 public key, written as age1… */
export class X25519Recipient {
  readonly type = 'X25519';
  readonly keyObject: KeyObject;

  constructor(readonly publicKey: Buffer) {
    if (publicKey.length !== 32) {
      throw new InvalidKeyError(`X25519 public key must be 32 bytes, got ${publicKey.length}`);
    }
    this.keyObject = x25519PublicKeyObject(publicKey);
  }

  /** Encodes the key as age1… */
  toString(): string {
    return bech32Encode(RECIPIENT_PREFIX, this.publicKey);
  }
}

/**
 * An X25519 private key, written as AGE-SECRET-KEY-1…
 * toString() and util.inspect() show only the public side, so a logged
 * identity does not leak the key. encodeSecret() returns the secret text.
 */
export class X25519Identity {
  readonly type = 'X25519';
  readonly recipient: X25519Recipient;
  private readonly secretKey: Buffer;
  private readonly keyObject: KeyObject;

  constructor(secretKey: Buffer) {
    if (secretKey.length !== 32) {
      throw new InvalidKeyError(`X25519 secret key must be 32 bytes, got ${secretKey.length}`);
    }
    this.secretKey = Buffer.from(secretKey);
    this.keyObject = x25519PrivateKeyObject(this.secretKey);
    this.recipient = new X25519Recipient(rawPublicKey(createPublicKey(this.keyObject)));
  }

  /** Encodes the secret key as AGE-SECRET-KEY-1…, as age-keygen writes it. */
  encodeSecret(): string {
    return bech32Encode(IDENTITY_PREFIX, this.secretKey).toUpperCase();
  }

  /** Computes the X25519 shared secret with a peer public key. */
  sharedSecret(peer: KeyObject): Buffer {
    return diffieHellman({ privateKey: this.keyObject, publicKey: peer });
  }

  toString(): string {
    return `X25519Identity(${this.recipient.toString()})`;
  }

  [inspect.custom](): string {
    return this.toString();
  }
}

/** Parses an age1… X25519 recipient. */
export function parseRecipient(text: string): X25519Recipient {
  const trimmed = text.trim();
  if (!trimmed.toLowerCase().startsWith('age1')) {
    throw new InvalidKeyError(`invalid age recipient "${trimmed}": expected an X25519 recipient starting with age1`);
  }
  const { prefix, data } = bech32Decode(trimmed);
  if (prefix !== RECIPIENT_PREFIX) {
    throw new InvalidKeyError(`unsupported age recipient type "${prefix}1…": only X25519 recipients (age1…) are supported`);
  }
  return new X25519Recipient(data);
}

function parseIdentityLine(line: string, lineNumber: number): X25519Identity {
  const where = `identity on line ${lineNumber}`;
  if (!line.startsWith(`${IDENTITY_PREFIX}1`)) {
    throw new InvalidKeyError(`invalid ${where}: expected AGE-SECRET-KEY-1…, a # comment or an empty line`);
  }
  let decoded: { prefix: string; data: Buffer };
  try {
    decoded = bech32Decode(line);
  } catch (error) {
    throw new InvalidKeyError(`invalid ${where}: ${(error as Error).message}`, { cause: error });
  }
  if (decoded.prefix !== IDENTITY_PREFIX.toLowerCase() || decoded.data.length !== 32) {
    throw new InvalidKeyError(`invalid ${where}: not a 32-byte X25519 secret key`);
  }
  return new X25519Identity(decoded.data);
}

/**
 * Parses one AGE-SECRET-KEY-1… key or the content of an identity file as
 * age-keygen writes it: # comments, blank lines and one key per line.
 * Returns every key in file order, so a single key gives an array of one.
 * Throws InvalidKeyError naming the line of an invalid key, or when no key is found.
 */
export function parseIdentity(text: string): X25519Identity[] {
  const identities: X25519Identity[] = [];
  const lines = text.split(/\r?\n/);
  for (let index = 0; index < lines.length; index++) {
    const line = lines[index].trim();
    if (line === '' || line.startsWith('#')) continue;
    identities.push(parseIdentityLine(line, index + 1));
  }
  if (identities.length === 0) throw new InvalidKeyError('no AGE-SECRET-KEY-1… identity found in the input');
  return identities;
}

/** Returns the recipient (public key) of an identity. */
export function identityToRecipient(identity: X25519Identity): X25519Recipient {
  return identity.recipient;
}

/** Generates a new X25519 identity from 32 CSPRNG bytes, as age-keygen does. */
export function generateIdentity(): X25519Identity {
  return new X25519Identity(randomBytes(32));
}

/**
 * Returns a short recipient id for manifests: the first 8 bytes of the
 * SHA-256 of the age1… string, as 16 lowercase hex characters.
 */
export function recipientFingerprint(recipient: X25519Recipient | string): string {
  const text = typeof recipient === 'string' ? parseRecipient(recipient).toString() : recipient.toString();
  return createHash('sha256').update(text, 'utf8').digest().subarray(0, 8).toString('hex');
}

// ---------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------

function hkdf(inputKey: Buffer, salt: Buffer, info: string): Buffer {
  return Buffer.from(hkdfSync('sha256', inputKey, salt, info, 32));
}

const ZERO_NONCE = Buffer.alloc(12);

function sealFileKey(wrapKey: Buffer, fileKey: Buffer): Buffer {
  const cipher = createCipheriv('chacha20-poly1305', wrapKey, ZERO_NONCE, { authTagLength: TAG_BYTES });
  return Buffer.concat([cipher.update(fileKey), cipher.final(), cipher.getAuthTag()]);
}

/** Returns the file key, or undefined when the body does not authenticate under wrapKey. */
function openFileKey(wrapKey: Buffer, body: Buffer): Buffer | undefined {
  const decipher = createDecipheriv('chacha20-poly1305', wrapKey, ZERO_NONCE, { authTagLength: TAG_BYTES });
  decipher.setAuthTag(body.subarray(FILE_KEY_BYTES));
  const fileKey = decipher.update(body.subarray(0, FILE_KEY_BYTES));
  try {
    decipher.final();
  } catch {
    return undefined;
  }
  return fileKey;
}

function scryptWrapKey(passphrase: string, salt: Buffer, workFactor: number): Promise<Buffer> {
  const cost = 2 ** workFactor;
  const blockSize = 8;
  // Node rejects scrypt calls that need more than maxmem (32 MiB by default),
  // but the work factor 18 that the CLI uses needs 256 MiB.
  const maxmem = 2 * 128 * blockSize * cost;
  return new Promise((resolve, reject) => {
    scrypt(
      Buffer.from(passphrase, 'utf8'),
      Buffer.concat([Buffer.from(SCRYPT_SALT_LABEL), salt]),
      32,
      { N: cost, r: blockSize, p: 1, maxmem },
      (error, key) => (error ? reject(error) : resolve(key)),
    );
  });
}

function encodeBase64(data: Buffer): string {
  return data.toString('base64').replace(/=+$/, '');
}

const BASE64_PATTERN = /^[A-Za-z0-9+/]*$/;

/** Decodes unpadded base64, rejecting padding and non-canonical encodings as the spec requires. */
function decodeBase64(text: string, field: string): Buffer {
  const decoded = BASE64_PATTERN.test(text) && text.length % 4 !== 1 ? Buffer.from(text, 'base64') : undefined;
  if (decoded === undefined || encodeBase64(decoded) !== text) {
    throw new MalformedHeaderError(`invalid header: ${field} is not canonical unpadded base64`);
  }
  return decoded;
}

function decodeFixedBase64(text: string, length: number, field: string): Buffer {
  const decoded = decodeBase64(text, field);
  if (decoded.length !== length) {
    throw new MalformedHeaderError(`invalid header: ${field} must be ${length} bytes, got ${decoded.length}`);
  }
  return decoded;
}

// ---------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------

interface Stanza {
  args: string[];
  body: Buffer;
}

function encodeStanza(stanza: Stanza): string {
  let text = `-> ${stanza.args.join(' ')}\n`;
  const body = encodeBase64(stanza.body);
  // The body ends with a line shorter than 64 columns, which is empty when the length is a multiple of 64.
  for (let offset = 0; offset <= body.length; offset += BODY_COLUMNS) {
    text += `${body.slice(offset, offset + BODY_COLUMNS)}\n`;
  }
  return text;
}

function headerMac(fileKey: Buffer, headerUpToMarker: Buffer): Buffer {
  const macKey = hkdf(fileKey, Buffer.alloc(0), 'header');
  return createHmac('sha256', macKey).update(headerUpToMarker).digest();
}

function encodeHeader(fileKey: Buffer, stanzas: Stanza[]): Buffer {
  const upToMarker = Buffer.from(`${VERSION_LINE}\n${stanzas.map(encodeStanza).join('')}---`, 'latin1');
  const mac = headerMac(fileKey, upToMarker);
  return Buffer.concat([upToMarker, Buffer.from(` ${encodeBase64(mac)}\n`, 'latin1')]);
}

function x25519Stanza(recipient: X25519Recipient, fileKey: Buffer): Stanza {
  const ephemeralSecret = randomBytes(32);
  const ephemeral = new X25519Identity(ephemeralSecret);
  const ephemeralShare = ephemeral.recipient.publicKey;
  const sharedSecret = ephemeral.sharedSecret(recipient.keyObject);
  const salt = Buffer.concat([ephemeralShare, recipient.publicKey]);
  const wrapKey = hkdf(sharedSecret, salt, X25519_INFO);
  return { args: ['X25519', encodeBase64(ephemeralShare)], body: sealFileKey(wrapKey, fileKey) };
}

async function scryptStanza(passphrase: string, workFactor: number, fileKey: Buffer): Promise<Stanza> {
  const salt = randomBytes(16);
  const wrapKey = await scryptWrapKey(passphrase, salt, workFactor);
  return { args: ['scrypt', encodeBase64(salt), String(workFactor)], body: sealFileKey(wrapKey, fileKey) };
}

/** A parsed header: its stanzas, its MAC and the bytes the MAC covers. */
interface ParsedHeader {
  stanzas: Stanza[];
  mac: Buffer;
  upToMarker: Buffer;
}

function isArgument(text: string): boolean {
  if (text.length === 0) return false;
  for (let index = 0; index < text.length; index++) {
    const code = text.charCodeAt(index);
    if (code < 0x21 || code > 0x7e) return false;
  }
  return true;
}

/** Parses a complete v1 header, which ends with the newline of its MAC line. */
function parseHeader(header: Buffer): ParsedHeader {
  const lines = header.toString('latin1').split('\n');
  // The header ends with "\n", so split() leaves one empty string after the MAC line.
  lines.pop();
  const stanzas: Stanza[] = [];
  let index = 1;
  while (index < lines.length && lines[index].startsWith('-> ')) {
    const args = lines[index].slice(3).split(' ');
    if (!args.every(isArgument)) {
      throw new MalformedHeaderError(`invalid header: stanza line ${index + 1} has an empty or non-printable argument`);
    }
    index++;
    const bodyLines: string[] = [];
    for (;;) {
      if (index >= lines.length) throw new MalformedHeaderError('invalid header: stanza body is not terminated');
      const line = lines[index++];
      if (line.length > BODY_COLUMNS) {
        throw new MalformedHeaderError(`invalid header: line ${index} is longer than ${BODY_COLUMNS} columns`);
      }
      bodyLines.push(line);
      if (line.length < BODY_COLUMNS) break;
    }
    stanzas.push({ args, body: decodeBase64(bodyLines.join(''), `body of stanza ${stanzas.length + 1}`) });
  }
  if (stanzas.length === 0) throw new MalformedHeaderError('invalid header: no recipient stanza');
  if (index !== lines.length - 1 || !lines[index].startsWith('--- ')) {
    throw new MalformedHeaderError(`invalid header: line ${index + 1} is neither a stanza nor the MAC line`);
  }
  const mac = decodeFixedBase64(lines[index].slice(4), 32, 'header MAC');
  const upToMarker = header.subarray(0, header.length - lines[index].length - 1 + 3);
  return { stanzas, mac, upToMarker };
}

// ---------------------------------------------------------------------------
// File key unwrapping
// ---------------------------------------------------------------------------

/** Options of createDecryptStream. */
export interface DecryptOptions {
  identities?: X25519Identity[];
  passphrase?: string;
  /** Largest scrypt work factor (log2 N) accepted; defaults to DEFAULT_MAX_SCRYPT_WORK_FACTOR. */
  maxScryptWorkFactor?: number;
}

interface X25519StanzaFields {
  share: Buffer;
  shareKey: KeyObject;
  body: Buffer;
}

function parseX25519Stanza(stanza: Stanza): X25519StanzaFields {
  if (stanza.args.length !== 2) {
    throw new MalformedHeaderError(`invalid X25519 stanza: expected 2 arguments, got ${stanza.args.length}`);
  }
  const share = decodeFixedBase64(stanza.args[1], 32, 'X25519 ephemeral share');
  if (stanza.body.length !== 32) {
    throw new MalformedHeaderError(`invalid X25519 stanza: body must be 32 bytes, got ${stanza.body.length}`);
  }
  return { share, shareKey: x25519PublicKeyObject(share), body: stanza.body };
}

function unwrapX25519(stanzas: Stanza[], identities: X25519Identity[]): Buffer {
  const x25519Stanzas = stanzas.filter((stanza) => stanza.args[0] === 'X25519').map(parseX25519Stanza);
  for (const stanza of x25519Stanzas) {
    for (const identity of identities) {
      let sharedSecret: Buffer;
      try {
        sharedSecret = identity.sharedSecret(stanza.shareKey);
      } catch (error) {
        // OpenSSL fails the X25519 derivation when the result is all zeros,
        // which the spec requires to abort decryption.
        throw new MalformedHeaderError('invalid X25519 stanza: ephemeral share gives an all-zero shared secret', {
          cause: error,
        });
      }
      if (sharedSecret.every((byte) => byte === 0)) {
        throw new MalformedHeaderError('invalid X25519 stanza: ephemeral share gives an all-zero shared secret');
      }
      const salt = Buffer.concat([stanza.share, identity.recipient.publicKey]);
      const fileKey = openFileKey(hkdf(sharedSecret, salt, X25519_INFO), stanza.body);
      if (fileKey !== undefined) return fileKey;
    }
  }
  const types = [...new Set(stanzas.map((stanza) => stanza.args[0]))].join(', ');
  throw new NoIdentityMatchError(
    `no identity matched any of the ${stanzas.length} recipient stanza(s) (types: ${types}); ` +
      `tried ${identities.length} identit${identities.length === 1 ? 'y' : 'ies'}`,
  );
}

async function unwrapScrypt(stanza: Stanza, passphrase: string, maxWorkFactor: number): Promise<Buffer> {
  if (stanza.args.length !== 3) {
    throw new MalformedHeaderError(`invalid scrypt stanza: expected 3 arguments, got ${stanza.args.length}`);
  }
  const salt = decodeFixedBase64(stanza.args[1], 16, 'scrypt salt');
  if (!/^[1-9][0-9]*$/.test(stanza.args[2])) {
    throw new MalformedHeaderError(`invalid scrypt stanza: work factor "${stanza.args[2]}" is not a decimal number`);
  }
  const workFactor = Number(stanza.args[2]);
  if (workFactor > maxWorkFactor) throw new ScryptWorkFactorTooLargeError(workFactor, maxWorkFactor);
  if (stanza.body.length !== 32) {
    throw new MalformedHeaderError(`invalid scrypt stanza: body must be 32 bytes, got ${stanza.body.length}`);
  }
  const fileKey = openFileKey(await scryptWrapKey(passphrase, salt, workFactor), stanza.body);
  if (fileKey === undefined) throw new WrongPassphraseError('incorrect passphrase');
  return fileKey;
}

async function unwrapFileKey(header: ParsedHeader, options: DecryptOptions): Promise<Buffer> {
  const scryptStanzas = header.stanzas.filter((stanza) => stanza.args[0] === 'scrypt');
  if (scryptStanzas.length > 0) {
    // A passphrase-encrypted file must contain nothing else, so a second
    // stanza would let someone without the passphrase add a recipient.
    if (header.stanzas.length !== 1) {
      throw new MalformedHeaderError('invalid header: an scrypt stanza must be the only stanza');
    }
    if (options.passphrase === undefined) {
      throw new NoIdentityMatchError('the file is encrypted with a passphrase, but no passphrase was given');
    }
    const maxWorkFactor = options.maxScryptWorkFactor ?? DEFAULT_MAX_SCRYPT_WORK_FACTOR;
    return unwrapScrypt(scryptStanzas[0], options.passphrase, maxWorkFactor);
  }
  const identities = options.identities ?? [];
  if (identities.length === 0) {
    throw new NoIdentityMatchError('the file is encrypted to recipients, but no identity was given (only a passphrase)');
  }
  return unwrapX25519(header.stanzas, identities);
}

// ---------------------------------------------------------------------------
// STREAM payload
// ---------------------------------------------------------------------------

/** Largest chunk counter that fits a JavaScript safe integer; 2^53 chunks of 64 KiB is far beyond any file. */
const MAX_CHUNK_INDEX = Number.MAX_SAFE_INTEGER;

function chunkNonce(chunkIndex: number, final: boolean): Buffer {
  if (chunkIndex > MAX_CHUNK_INDEX) throw new AgeError('payload has too many chunks');
  // 11-byte big-endian counter followed by the final-chunk flag; bytes 0-2 stay zero below 2^53.
  const nonce = Buffer.alloc(12);
  nonce.writeUInt32BE(Math.floor(chunkIndex / 2 ** 32), 3);
  nonce.writeUInt32BE(chunkIndex >>> 0, 7);
  nonce[11] = final ? 1 : 0;
  return nonce;
}

function payloadKey(fileKey: Buffer, nonce: Buffer): Buffer {
  return hkdf(fileKey, nonce, 'payload');
}

/**
 * Pushes the chunks produced from one input write as one buffer, because
 * one 1 MiB write downstream costs less than sixteen 64 KiB writes.
 */
function pushBatch(stream: Transform, batch: Buffer[]): void {
  if (batch.length === 0) return;
  stream.push(batch.length === 1 ? batch[0] : Buffer.concat(batch));
  batch.length = 0;
}

// ---------------------------------------------------------------------------
// Encryption
// ---------------------------------------------------------------------------

/** Options of createEncryptStream: either recipients or a passphrase. */
export interface EncryptOptions {
  recipients?: X25519Recipient[];
  passphrase?: string;
  /** scrypt work factor (log2 N) for a passphrase; defaults to DEFAULT_SCRYPT_WORK_FACTOR. */
  scryptWorkFactor?: number;
}

class EncryptStream extends Transform {
  private readonly fileKey = randomBytes(FILE_KEY_BYTES);
  private readonly header: Promise<Buffer>;
  private key: Buffer | undefined;
  /** Plaintext of the current chunk; a full chunk is held until more input shows that it is not the last. */
  private readonly pending = Buffer.allocUnsafe(CHUNK_BYTES);
  private pendingBytes = 0;
  private chunkIndex = 0;
  private readonly batch: Buffer[] = [];

  constructor(options: EncryptOptions) {
    super({ highWaterMark: STREAM_HIGH_WATER_MARK });
    const recipients = options.recipients ?? [];
    const hasPassphrase = options.passphrase !== undefined;
    if (hasPassphrase && recipients.length > 0) {
      throw new InvalidKeyError('give either recipients or a passphrase, not both: an scrypt stanza must be the only stanza');
    }
    if (!hasPassphrase && recipients.length === 0) {
      throw new InvalidKeyError('no recipients and no passphrase given');
    }
    if (hasPassphrase) {
      const passphrase = options.passphrase as string;
      const workFactor = options.scryptWorkFactor ?? DEFAULT_SCRYPT_WORK_FACTOR;
      if (passphrase.length === 0) throw new InvalidKeyError('passphrase is empty');
      if (!Number.isInteger(workFactor) || workFactor < 1 || workFactor > 30) {
        throw new InvalidKeyError(`scrypt work factor must be an integer from 1 to 30, got ${workFactor}`);
      }
      this.header = scryptStanza(passphrase, workFactor, this.fileKey).then((stanza) => encodeHeader(this.fileKey, [stanza]));
    } else {
      const stanzas = recipients.map((recipient) => x25519Stanza(recipient, this.fileKey));
      this.header = Promise.resolve(encodeHeader(this.fileKey, stanzas));
    }
    // The header is awaited in _transform or _flush; this keeps an early rejection from being reported as unhandled.
    this.header.catch(() => undefined);
  }

  /** Pushes the header and payload nonce before the first chunk. */
  private async start(): Promise<Buffer> {
    if (this.key !== undefined) return this.key;
    const header = await this.header;
    const nonce = randomBytes(PAYLOAD_NONCE_BYTES);
    this.push(header);
    this.push(nonce);
    this.key = payloadKey(this.fileKey, nonce);
    return this.key;
  }

  private sealChunk(key: Buffer, plaintext: Buffer, final: boolean): void {
    const cipher = createCipheriv('chacha20-poly1305', key, chunkNonce(this.chunkIndex, final), { authTagLength: TAG_BYTES });
    this.batch.push(cipher.update(plaintext));
    cipher.final();
    this.batch.push(cipher.getAuthTag());
    this.chunkIndex++;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.start().then(
      (key) => {
        let offset = 0;
        // Full chunks that more input follows are sealed straight from the input, without a copy.
        while (this.pendingBytes === 0 && chunk.length - offset > CHUNK_BYTES) {
          this.sealChunk(key, chunk.subarray(offset, offset + CHUNK_BYTES), false);
          offset += CHUNK_BYTES;
        }
        while (offset < chunk.length) {
          if (this.pendingBytes === CHUNK_BYTES) {
            this.sealChunk(key, this.pending, false);
            this.pendingBytes = 0;
          }
          const copied = chunk.copy(this.pending, this.pendingBytes, offset);
          this.pendingBytes += copied;
          offset += copied;
        }
        pushBatch(this, this.batch);
        callback();
      },
      (error: Error) => callback(error),
    );
  }

  override _flush(callback: TransformCallback): void {
    this.start().then(
      (key) => {
        this.sealChunk(key, this.pending.subarray(0, this.pendingBytes), true);
        this.pendingBytes = 0;
        pushBatch(this, this.batch);
        callback();
      },
      (error: Error) => callback(error),
    );
  }
}

/**
 * Creates a Transform that encrypts its input into an age v1 file: one
 * X25519 stanza per recipient, or a single scrypt stanza for a passphrase.
 * Memory use grows with the largest single input write and the 1 MiB
 * stream buffers, not with the input size.
 * Throws InvalidKeyError when both or neither of recipients and passphrase are given.
 */
export function createEncryptStream(options: EncryptOptions): Transform {
  return new EncryptStream(options);
}

// ---------------------------------------------------------------------------
// Decryption
// ---------------------------------------------------------------------------

const NEWLINE_MARKER = Buffer.from('\n---', 'latin1');

/** Finds where a complete header ends, or returns -1 while its MAC line is incomplete. */
function findHeaderEnd(buffer: Buffer): number {
  const firstNewline = buffer.indexOf(0x0a);
  if (firstNewline === -1) return -1;
  // Base64 body lines and "-> " stanza lines never start with "---", so the first such line is the MAC line.
  const marker = buffer.indexOf(NEWLINE_MARKER, firstNewline);
  if (marker === -1) return -1;
  const end = buffer.indexOf(0x0a, marker + 1);
  return end === -1 ? -1 : end + 1;
}

/**
 * Checks the version line as soon as enough bytes are available. When atEnd
 * is true no more input follows, so a partial match is final.
 */
function checkVersion(buffer: Buffer, atEnd: boolean): void {
  const prefixLength = Math.min(buffer.length, VERSION_PREFIX.length);
  if (buffer.toString('latin1', 0, prefixLength) !== VERSION_PREFIX.slice(0, prefixLength)) {
    const start = buffer.toString('latin1', 0, Math.min(buffer.length, ARMOR_BEGIN.length));
    if (start === ARMOR_BEGIN) {
      throw new NotAgeFileError('input is an ASCII-armored age file, which is not supported; use the binary format');
    }
    // Wait for more bytes while the input may still turn out to be armored.
    if (!atEnd && ARMOR_BEGIN.startsWith(start)) return;
    throw new NotAgeFileError('input is not an age file: it does not start with "age-encryption.org/"');
  }
  const newline = buffer.indexOf(0x0a);
  if (newline !== -1) {
    const line = buffer.toString('latin1', 0, newline);
    if (line !== VERSION_LINE) throw new UnsupportedVersionError(line.slice(VERSION_PREFIX.length));
  }
}

class DecryptStream extends Transform {
  private readonly options: DecryptOptions;
  private headerChunks: Buffer[] = [];
  private headerBytes = 0;
  private fileKey: Buffer | undefined;
  private nonceChunks: Buffer[] = [];
  private nonceBytes = 0;
  private key: Buffer | undefined;
  /** Ciphertext of the current chunk; a full chunk is held until more input shows that it is not the last. */
  private readonly pending = Buffer.allocUnsafe(ENCRYPTED_CHUNK_BYTES);
  private pendingBytes = 0;
  private chunkIndex = 0;
  private readonly batch: Buffer[] = [];

  constructor(options: DecryptOptions) {
    super({ highWaterMark: STREAM_HIGH_WATER_MARK });
    if ((options.identities ?? []).length === 0 && options.passphrase === undefined) {
      throw new InvalidKeyError('no identities and no passphrase given');
    }
    this.options = options;
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, callback: TransformCallback): void {
    this.consume(chunk).then(
      () => callback(),
      (error: Error) => callback(error),
    );
  }

  override _flush(callback: TransformCallback): void {
    try {
      this.finish();
      callback();
    } catch (error) {
      callback(error as Error);
    }
  }

  private async consume(chunk: Buffer): Promise<void> {
    let data = chunk;
    if (this.fileKey === undefined) {
      const rest = await this.readHeader(data);
      if (rest === undefined) return;
      data = rest;
    }
    if (this.key === undefined) {
      data = this.readNonce(data);
      if (this.key === undefined) return;
    }
    this.readPayload(data);
  }

  /** Buffers header bytes; returns the bytes after the header once it is complete and verified. */
  private async readHeader(chunk: Buffer): Promise<Buffer | undefined> {
    this.headerChunks.push(chunk);
    this.headerBytes += chunk.length;
    const buffer = this.headerChunks.length === 1 ? chunk : Buffer.concat(this.headerChunks, this.headerBytes);
    this.headerChunks = [buffer];
    checkVersion(buffer, false);
    const end = findHeaderEnd(buffer);
    if (end === -1) {
      if (this.headerBytes > MAX_HEADER_BYTES) {
        throw new MalformedHeaderError(`invalid header: no MAC line within the first ${MAX_HEADER_BYTES} bytes`);
      }
      return undefined;
    }
    const header = parseHeader(buffer.subarray(0, end));
    const fileKey = await unwrapFileKey(header, this.options);
    const expected = headerMac(fileKey, header.upToMarker);
    if (!timingSafeEqual(expected, header.mac)) {
      throw new HeaderMacMismatchError('header MAC mismatch: the header was modified or damaged');
    }
    this.fileKey = fileKey;
    this.headerChunks = [];
    return buffer.subarray(end);
  }

  private readNonce(data: Buffer): Buffer {
    const needed = PAYLOAD_NONCE_BYTES - this.nonceBytes;
    this.nonceChunks.push(data.subarray(0, needed));
    this.nonceBytes += Math.min(needed, data.length);
    if (this.nonceBytes === PAYLOAD_NONCE_BYTES) {
      this.key = payloadKey(this.fileKey as Buffer, Buffer.concat(this.nonceChunks));
      this.nonceChunks = [];
    }
    return data.subarray(needed);
  }

  private readPayload(data: Buffer): void {
    const key = this.key as Buffer;
    let offset = 0;
    // Full chunks that more input follows are opened straight from the input, without a copy.
    while (this.pendingBytes === 0 && data.length - offset > ENCRYPTED_CHUNK_BYTES) {
      this.openFullChunk(key, data.subarray(offset, offset + ENCRYPTED_CHUNK_BYTES));
      offset += ENCRYPTED_CHUNK_BYTES;
    }
    while (offset < data.length) {
      if (this.pendingBytes === ENCRYPTED_CHUNK_BYTES) {
        this.openFullChunk(key, this.pending);
        this.pendingBytes = 0;
      }
      const copied = data.copy(this.pending, this.pendingBytes, offset);
      this.pendingBytes += copied;
      offset += copied;
    }
    pushBatch(this, this.batch);
  }

  /** Returns the plaintext, or undefined when the chunk does not authenticate. */
  private open(key: Buffer, ciphertext: Buffer, final: boolean): Buffer | undefined {
    const decipher = createDecipheriv('chacha20-poly1305', key, chunkNonce(this.chunkIndex, final), {
      authTagLength: TAG_BYTES,
    });
    decipher.setAuthTag(ciphertext.subarray(ciphertext.length - TAG_BYTES));
    const plaintext = decipher.update(ciphertext.subarray(0, ciphertext.length - TAG_BYTES));
    try {
      decipher.final();
    } catch {
      return undefined;
    }
    return plaintext;
  }

  /** Opens a full-size chunk that more input follows, so it must not be the final one. */
  private openFullChunk(key: Buffer, ciphertext: Buffer): void {
    const plaintext = this.open(key, ciphertext, false);
    if (plaintext === undefined) {
      if (this.open(key, ciphertext, true) !== undefined) {
        throw new TrailingDataError(this.chunkIndex, 'data follows the final chunk');
      }
      throw new DamagedPayloadError(this.chunkIndex, 'authentication failed; the payload was modified or damaged');
    }
    this.batch.push(plaintext);
    this.chunkIndex++;
  }

  private finish(): void {
    if (this.fileKey === undefined) {
      const buffer = Buffer.concat(this.headerChunks, this.headerBytes);
      if (buffer.length === 0) throw new NotAgeFileError('input is empty, not an age file');
      checkVersion(buffer, true);
      throw new MalformedHeaderError('invalid header: input ends before the header MAC line');
    }
    if (this.key === undefined) {
      throw new TruncatedPayloadError(0, `input ends inside the ${PAYLOAD_NONCE_BYTES}-byte payload nonce`);
    }
    const key = this.key;
    const last = this.pending.subarray(0, this.pendingBytes);
    if (last.length < TAG_BYTES) {
      const message =
        last.length === 0 ? 'input ends before the final chunk' : `final chunk has ${last.length} bytes, fewer than its 16-byte tag`;
      throw new TruncatedPayloadError(this.chunkIndex, message);
    }
    const plaintext = this.open(key, last, true);
    if (plaintext === undefined) {
      // A full-size chunk that opens as non-final means later chunks were cut off.
      if (last.length === ENCRYPTED_CHUNK_BYTES && this.open(key, last, false) !== undefined) {
        throw new TruncatedPayloadError(this.chunkIndex + 1, 'input ends before the final chunk');
      }
      // NOTE: bytes appended after a final chunk shorter than 64 KiB also end
      // up here, because the chunk boundary is then unknown.
      throw new DamagedPayloadError(this.chunkIndex, 'authentication failed; the payload was modified, damaged or cut short');
    }
    if (plaintext.length === 0 && this.chunkIndex > 0) {
      throw new DamagedPayloadError(this.chunkIndex, 'final chunk is empty, which only an empty file may have');
    }
    this.push(plaintext);
    this.pendingBytes = 0;
  }
}

/**
 * Creates a Transform that decrypts an age v1 file with X25519 identities or
 * a passphrase. It verifies the header MAC before it emits any plaintext,
 * and emits each 64 KiB chunk only after the chunk authenticates. A consumer
 * may therefore receive the plaintext of early chunks before a later chunk
 * fails, and must discard the output when the stream errors. The stream fails with NotAgeFileError, UnsupportedVersionError,
 * MalformedHeaderError, HeaderMacMismatchError, NoIdentityMatchError,
 * WrongPassphraseError, ScryptWorkFactorTooLargeError or DamagedPayloadError
 * (with its subclasses TruncatedPayloadError and TrailingDataError).
 */
export function createDecryptStream(options: DecryptOptions): Transform {
  return new DecryptStream(options);
}
