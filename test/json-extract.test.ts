// The raw JSON value extractor: exact bytes out, whatever the chunking.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { JsonShapeError, JsonValueExtractor, type JsonPathStep } from '../activities/opa/json-extract';

/** Runs the extractor over `text` cut into chunks of `size` bytes. */
function extract(text: string, steps: JsonPathStep[], size: number): { found: boolean; value: string } {
  const parts: Buffer[] = [];
  const extractor = new JsonValueExtractor(steps, (slice) => parts.push(Buffer.from(slice)));
  const bytes = Buffer.from(text, 'utf8');
  for (let offset = 0; offset < bytes.length; offset += size) extractor.write(bytes.subarray(offset, offset + size));
  extractor.end();
  return { found: extractor.found, value: Buffer.concat(parts).toString('utf8') };
}

const document =
  '{"decision_id":"a\\"}b","result":[{"x":{"big":9007199254740993,"one":1.0,"tiny":1e-320,"s":"q\\\\\\"[{","k":[[],{}]}},{"x":2}],"warning":{"code":"w"}}';

for (const size of [1, 2, 3, 7, 64, 4096]) {
  test(`extractor keeps exact bytes in chunks of ${size}`, () => {
    const { found, value } = extract(document, ['result', 0, 'x'], size);
    assert.equal(found, true);
    assert.equal(value, '{"big":9007199254740993,"one":1.0,"tiny":1e-320,"s":"q\\\\\\"[{","k":[[],{}]}');
  });
}

test('extractor finds a scalar at the end of an object', () => {
  assert.deepEqual(extract('{"a":1,"result":-12.5e+3}', ['result'], 3), { found: true, value: '-12.5e+3' });
  assert.deepEqual(extract('{"result":true }', ['result'], 1), { found: true, value: 'true' });
  assert.deepEqual(extract('{"result":"x\\"y"}', ['result'], 2), { found: true, value: '"x\\"y"' });
});

test('extractor finds the second array element', () => {
  assert.deepEqual(extract(document, ['result', 1, 'x'], 5), { found: true, value: '2' });
});

test('extractor reports an undefined result', () => {
  assert.deepEqual(extract('{}', ['result', 0, 'x'], 4), { found: false, value: '' });
  assert.deepEqual(extract('{"result":[]}', ['result', 0, 'x'], 4), { found: false, value: '' });
});

test('extractor matches escaped and non-ASCII keys', () => {
  assert.deepEqual(extract('{"r\\u00e9sult":1,"résult":2}', ['résult'], 1), { found: true, value: '1' });
});

test('extractor rejects truncated documents', () => {
  assert.throws(() => extract('{"result":[{"x":{"a":1', ['result', 0, 'y'], 4), JsonShapeError);
  assert.throws(() => extract('', ['result'], 4), /empty/);
});

test('extractor rejects a document that is not JSON', () => {
  assert.throws(() => extract('<html>', ['result'], 4), JsonShapeError);
});
