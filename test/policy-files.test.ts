// Mapping policy ids to bundle file paths.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { policyFiles } from '../activities/opa/snapshot';

function filesOf(ids: string[]): string[] {
  return policyFiles(ids.map((id) => ({ id, raw: `package p\n# ${id}\n` }))).map((record) => record.file);
}

test('policy ids stay inside the bundle', () => {
  assert.deepEqual(filesOf(['../../etc/passwd', '/abs', 'a/./b']), ['policies/%2E%2E/%2E%2E/etc/passwd.rego', 'policies/%00/abs.rego', 'policies/a/%2E/b.rego']);
});

test('policy ids with spaces keep them', () => {
  assert.deepEqual(filesOf(['team/policies v1.rego']), ['policies/team/policies v1.rego']);
});

test('policy ids that collide get suffixes', () => {
  assert.deepEqual(filesOf(['z', 'z.rego']), ['policies/z.rego', 'policies/z~2.rego']);
});

test('policy file never shadows a folder', () => {
  const files = filesOf(['z.rego', 'z.rego/inner']);
  assert.deepEqual(files, ['policies/z~2.rego', 'policies/z.rego/inner.rego']);
});
