// Retention rules as a table: backup dates, rules and the backups that must
// be kept. Each backup is named by its start time; flags mark partial (p)
// and verified (v) backups, and "->TIME" a reference (storedIn) to the
// backup started at TIME.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { applyRetention, describeReason, parseDuration, type RetentionCandidate } from '../common/retention';
import { makeBackupId } from '../common/layout';
import type { RetentionRules } from '../common/plan';

interface Row {
  name: string;
  backups: string[];
  rules: RetentionRules | undefined;
  now?: string;
  timeZone?: string;
  keep: string[];
  /** Expected reasons of some backups, as describeReason prints them. */
  reasons?: Record<string, string[]>;
  future?: string[];
  missing?: Array<{ by: string; id: string }>;
}

const NOW = '2027-01-01T00:00:00Z';

/** Builds candidates from "TIME[ p][ v][ ->TIME]" labels; the id is derived from the time and the index. */
function candidates(labels: string[]): { list: RetentionCandidate[]; idOf: Map<string, string>; labelOf: Map<string, string> } {
  const idOf = new Map<string, string>();
  const labelOf = new Map<string, string>();
  const parsed = labels.map((label, index) => {
    const [time, ...flags] = label.split(' ');
    const id = makeBackupId(new Date(time), `0000000${index.toString(16)}`.slice(-8));
    idOf.set(time, id);
    labelOf.set(id, time);
    return { time, flags, id };
  });
  const list = parsed.map(({ time, flags, id }) => ({
    id,
    time: new Date(time),
    status: flags.includes('p') ? ('partial' as const) : ('complete' as const),
    verified: flags.includes('v'),
    references: flags.filter((flag) => flag.startsWith('->')).map((flag) => idOf.get(flag.slice(2)) ?? `missing-${flag.slice(2)}`),
  }));
  return { list, idOf, labelOf };
}

const rows: Row[] = [
  {
    name: 'no rules keep everything',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
    rules: undefined,
    keep: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
    reasons: { '2026-12-01T00:00:00Z': ['no retention rules'] },
  },
  {
    name: 'empty rules keep everything',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
    rules: {},
    keep: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
  },
  {
    name: 'leftoverGrace alone is no keep rule',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
    rules: { leftoverGrace: '1h' },
    keep: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
  },
  {
    name: 'keepLast keeps the newest',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z', '2026-12-03T00:00:00Z', '2026-12-04T00:00:00Z'],
    rules: { keepLast: 2 },
    keep: ['2026-12-03T00:00:00Z', '2026-12-04T00:00:00Z'],
    reasons: { '2026-12-04T00:00:00Z': ['keepLast'] },
  },
  {
    name: 'keepLast larger than the list',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
    rules: { keepLast: 10 },
    keep: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z'],
  },
  {
    name: 'keepDaily keeps the newest of each day',
    backups: ['2026-12-03T01:00:00Z', '2026-12-03T13:00:00Z', '2026-12-04T01:00:00Z', '2026-12-04T13:00:00Z', '2026-12-04T20:00:00Z'],
    rules: { keepDaily: 2 },
    keep: ['2026-12-03T13:00:00Z', '2026-12-04T20:00:00Z'],
    reasons: { '2026-12-03T13:00:00Z': ['daily 2026-12-03'] },
  },
  {
    name: 'keepDaily skips days without backups',
    backups: ['2026-11-20T12:00:00Z', '2026-11-25T12:00:00Z', '2026-12-01T12:00:00Z', '2026-12-04T12:00:00Z'],
    rules: { keepDaily: 3 },
    keep: ['2026-11-25T12:00:00Z', '2026-12-01T12:00:00Z', '2026-12-04T12:00:00Z'],
  },
  {
    name: 'keepHourly keeps the newest of each hour',
    backups: ['2026-12-04T10:05:00Z', '2026-12-04T10:55:00Z', '2026-12-04T11:10:00Z', '2026-12-04T12:00:00Z', '2026-12-04T12:59:59Z'],
    rules: { keepHourly: 2 },
    keep: ['2026-12-04T11:10:00Z', '2026-12-04T12:59:59Z'],
  },
  {
    name: 'keepWeekly uses ISO weeks from Monday',
    // 2026-12-06 is a Sunday (week 49), 2026-12-07 a Monday (week 50).
    backups: ['2026-11-30T12:00:00Z', '2026-12-05T12:00:00Z', '2026-12-06T12:00:00Z', '2026-12-07T12:00:00Z'],
    rules: { keepWeekly: 2 },
    keep: ['2026-12-06T12:00:00Z', '2026-12-07T12:00:00Z'],
    reasons: { '2026-12-06T12:00:00Z': ['weekly 2026-W49'], '2026-12-07T12:00:00Z': ['weekly 2026-W50'] },
  },
  {
    name: 'keepWeekly week spanning new year',
    // 2026-12-31 (Thursday) and 2027-01-01 (Friday) are both in 2026-W53.
    backups: ['2026-12-24T12:00:00Z', '2026-12-31T12:00:00Z', '2027-01-01T12:00:00Z'],
    now: '2027-01-02T00:00:00Z',
    rules: { keepWeekly: 1 },
    keep: ['2027-01-01T12:00:00Z'],
    reasons: { '2027-01-01T12:00:00Z': ['weekly 2026-W53'] },
  },
  {
    name: 'keepMonthly keeps the newest of each month',
    backups: ['2026-09-15T00:00:00Z', '2026-10-01T00:00:00Z', '2026-10-31T23:00:00Z', '2026-11-02T00:00:00Z', '2026-11-30T00:00:00Z'],
    rules: { keepMonthly: 2 },
    keep: ['2026-10-31T23:00:00Z', '2026-11-30T00:00:00Z'],
  },
  {
    name: 'keepYearly keeps the newest of each year',
    backups: ['2024-06-01T00:00:00Z', '2025-01-01T00:00:00Z', '2025-12-31T23:59:59Z', '2026-03-01T00:00:00Z'],
    rules: { keepYearly: 2 },
    keep: ['2025-12-31T23:59:59Z', '2026-03-01T00:00:00Z'],
  },
  {
    name: 'rules combine as a union',
    backups: ['2026-12-01T06:00:00Z', '2026-12-02T06:00:00Z', '2026-12-03T06:00:00Z', '2026-12-03T18:00:00Z'],
    rules: { keepLast: 1, keepDaily: 2, keepMonthly: 1 },
    keep: ['2026-12-02T06:00:00Z', '2026-12-03T18:00:00Z'],
    reasons: { '2026-12-03T18:00:00Z': ['keepLast', 'daily 2026-12-03', 'monthly 2026-12'] },
  },
  {
    name: 'keepWithin counts from the newest backup',
    // `now` is months later: the schedule stopped, and the last backups stay.
    backups: ['2026-06-01T00:00:00Z', '2026-06-09T00:00:00Z', '2026-06-10T00:00:00Z'],
    rules: { keepWithin: '2d' },
    keep: ['2026-06-09T00:00:00Z', '2026-06-10T00:00:00Z'],
  },
  {
    name: 'keepWithin boundary is exclusive',
    backups: ['2026-12-02T00:00:00Z', '2026-12-02T00:00:01Z', '2026-12-04T00:00:00Z'],
    rules: { keepWithin: '2d' },
    keep: ['2026-12-02T00:00:01Z', '2026-12-04T00:00:00Z'],
  },
  {
    name: 'future backups kept and left out',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z', '2027-03-01T00:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-02T00:00:00Z', '2027-03-01T00:00:00Z'],
    future: ['2027-03-01T00:00:00Z'],
    reasons: { '2027-03-01T00:00:00Z': ['dated in the future'] },
  },
  {
    name: 'future backup does not move keepWithin',
    backups: ['2026-12-01T00:00:00Z', '2026-12-05T00:00:00Z', '2030-01-01T00:00:00Z'],
    rules: { keepWithin: '7d' },
    keep: ['2026-12-01T00:00:00Z', '2026-12-05T00:00:00Z', '2030-01-01T00:00:00Z'],
    future: ['2030-01-01T00:00:00Z'],
  },
  {
    name: 'newest verified backup always kept',
    backups: ['2026-12-01T00:00:00Z v', '2026-12-02T00:00:00Z v', '2026-12-03T00:00:00Z', '2026-12-04T00:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-02T00:00:00Z', '2026-12-04T00:00:00Z'],
    reasons: { '2026-12-02T00:00:00Z': ['newest verified backup'] },
  },
  {
    name: 'unverified backups get no protection',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z', '2026-12-03T00:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-03T00:00:00Z'],
  },
  {
    name: 'future verified backup is not newest verified',
    backups: ['2026-12-01T00:00:00Z v', '2026-12-02T00:00:00Z', '2027-06-01T00:00:00Z v'],
    rules: { keepLast: 1 },
    keep: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z', '2027-06-01T00:00:00Z'],
    future: ['2027-06-01T00:00:00Z'],
    reasons: { '2026-12-01T00:00:00Z': ['newest verified backup'] },
  },
  {
    name: 'complete backup represents its day',
    backups: ['2026-12-04T06:00:00Z', '2026-12-04T18:00:00Z p'],
    rules: { keepDaily: 1 },
    keep: ['2026-12-04T06:00:00Z'],
  },
  {
    name: 'partial backup represents a day without complete',
    backups: ['2026-12-03T06:00:00Z', '2026-12-04T06:00:00Z p', '2026-12-04T18:00:00Z p'],
    rules: { keepDaily: 2 },
    keep: ['2026-12-03T06:00:00Z', '2026-12-04T18:00:00Z'],
  },
  {
    name: 'keepLast counts partial backups',
    backups: ['2026-12-02T06:00:00Z', '2026-12-03T06:00:00Z', '2026-12-04T06:00:00Z p'],
    rules: { keepLast: 1 },
    keep: ['2026-12-03T06:00:00Z', '2026-12-04T06:00:00Z'],
    reasons: { '2026-12-04T06:00:00Z': ['keepLast'], '2026-12-03T06:00:00Z': ['newest complete backup'] },
  },
  {
    name: 'newest complete backup outlives partial ones',
    // One source failed in the last three runs: its newest data is in the 1 December backup.
    backups: ['2026-11-30T06:00:00Z', '2026-12-01T06:00:00Z', '2026-12-02T06:00:00Z p', '2026-12-03T06:00:00Z p', '2026-12-04T06:00:00Z p'],
    rules: { keepLast: 2 },
    keep: ['2026-12-01T06:00:00Z', '2026-12-03T06:00:00Z', '2026-12-04T06:00:00Z'],
    reasons: { '2026-12-01T06:00:00Z': ['newest complete backup'] },
  },
  {
    name: 'newest complete backup is named only when no rule keeps it',
    backups: ['2026-12-03T06:00:00Z', '2026-12-04T06:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-04T06:00:00Z'],
    reasons: { '2026-12-04T06:00:00Z': ['keepLast'] },
  },
  {
    name: 'daily periods follow the time zone',
    // 2026-12-03T23:30Z is 00:30 on 4 December in Berlin.
    backups: ['2026-12-03T22:30:00Z', '2026-12-03T23:30:00Z', '2026-12-04T10:00:00Z'],
    rules: { keepDaily: 2 },
    timeZone: 'Europe/Berlin',
    keep: ['2026-12-03T22:30:00Z', '2026-12-04T10:00:00Z'],
    reasons: { '2026-12-03T22:30:00Z': ['daily 2026-12-03'] },
  },
  {
    name: 'daily periods in UTC by default',
    backups: ['2026-12-03T22:30:00Z', '2026-12-03T23:30:00Z', '2026-12-04T10:00:00Z'],
    rules: { keepDaily: 2 },
    keep: ['2026-12-03T23:30:00Z', '2026-12-04T10:00:00Z'],
  },
  {
    name: 'repeated hour at DST end is one period',
    // Berlin, 2026-10-25: 00:30Z is 02:30 CEST and 01:30Z is 02:30 CET, the same wall-clock hour.
    backups: ['2026-10-25T00:30:00Z', '2026-10-25T01:30:00Z', '2026-10-25T02:00:00Z'],
    rules: { keepHourly: 3 },
    timeZone: 'Europe/Berlin',
    keep: ['2026-10-25T01:30:00Z', '2026-10-25T02:00:00Z'],
    reasons: { '2026-10-25T01:30:00Z': ['hourly 2026-10-25T02'], '2026-10-25T02:00:00Z': ['hourly 2026-10-25T03'] },
  },
  {
    name: 'DST start day keeps one daily backup',
    // New York, 2026-03-08 has 23 hours: 06:59Z is 01:59 EST, 07:00Z is 03:00 EDT.
    backups: ['2026-03-08T04:30:00Z', '2026-03-08T06:59:00Z', '2026-03-08T07:00:00Z', '2026-03-09T03:59:00Z'],
    rules: { keepDaily: 2, keepHourly: 1 },
    timeZone: 'America/New_York',
    keep: ['2026-03-08T04:30:00Z', '2026-03-09T03:59:00Z'],
    reasons: { '2026-03-08T04:30:00Z': ['daily 2026-03-07'], '2026-03-09T03:59:00Z': ['hourly 2026-03-08T23', 'daily 2026-03-08'] },
  },
  {
    name: 'monthly periods ahead of UTC',
    // 2026-11-30T11:00Z is 00:00 on 1 December in Auckland (UTC+13 in summer).
    backups: ['2026-11-15T00:00:00Z', '2026-11-30T10:59:00Z', '2026-11-30T11:00:00Z'],
    rules: { keepMonthly: 2 },
    timeZone: 'Pacific/Auckland',
    keep: ['2026-11-30T10:59:00Z', '2026-11-30T11:00:00Z'],
  },
  {
    name: 'referenced backup kept for storedIn',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z', '2026-12-03T00:00:00Z ->2026-12-01T00:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-01T00:00:00Z', '2026-12-03T00:00:00Z'],
  },
  {
    name: 'references followed transitively',
    backups: [
      '2026-12-01T00:00:00Z',
      '2026-12-02T00:00:00Z ->2026-12-01T00:00:00Z',
      '2026-12-03T00:00:00Z',
      '2026-12-04T00:00:00Z ->2026-12-02T00:00:00Z',
    ],
    rules: { keepLast: 1 },
    keep: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z', '2026-12-04T00:00:00Z'],
  },
  {
    name: 'reference from deleted backup ignored',
    backups: ['2026-12-01T00:00:00Z', '2026-12-02T00:00:00Z ->2026-12-01T00:00:00Z', '2026-12-03T00:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-03T00:00:00Z'],
  },
  {
    name: 'missing reference reported',
    backups: ['2026-12-02T00:00:00Z', '2026-12-03T00:00:00Z ->2026-11-01T00:00:00Z'],
    rules: { keepLast: 1 },
    keep: ['2026-12-03T00:00:00Z'],
    missing: [{ by: '2026-12-03T00:00:00Z', id: 'missing-2026-11-01T00:00:00Z' }],
  },
  {
    name: 'no backups decide nothing',
    backups: [],
    rules: { keepLast: 3 },
    keep: [],
  },
];

for (const row of rows) {
  test(`retention: ${row.name}`, () => {
    const { list, labelOf } = candidates(row.backups);
    const result = applyRetention(list, row.rules, { now: new Date(row.now ?? NOW), timeZone: row.timeZone });
    const label = (id: string): string => labelOf.get(id) ?? id;

    assert.deepEqual(result.keep.map(label), row.keep);
    const expectedDeleted = list.map((backup) => labelOf.get(backup.id)!).filter((time) => !row.keep.includes(time));
    assert.deepEqual(result.delete.map(label), expectedDeleted);
    assert.equal(result.decisions.length, list.length);
    assert.deepEqual(result.future.map(label), row.future ?? []);
    assert.deepEqual(
      result.missingReferences.map((reference) => ({ by: label(reference.by), id: reference.id })),
      row.missing ?? [],
    );
    for (const [time, expected] of Object.entries(row.reasons ?? {})) {
      const decision = result.decisions.find((entry) => label(entry.id) === time);
      assert.ok(decision, `no decision for ${time}`);
      assert.deepEqual(decision.reasons.map(describeReason), expected, `reasons of ${time}`);
    }
    for (const decision of result.decisions) {
      assert.equal(decision.keep, decision.reasons.length > 0, `keep of ${label(decision.id)} must match its reasons`);
    }
  });
}

test('retention: input order does not matter', () => {
  const { list } = candidates(['2026-12-01T00:00:00Z', '2026-12-02T12:00:00Z', '2026-12-02T18:00:00Z', '2026-12-03T00:00:00Z']);
  const forward = applyRetention(list, { keepDaily: 2 }, { now: new Date(NOW) });
  const backward = applyRetention([...list].reverse(), { keepDaily: 2 }, { now: new Date(NOW) });
  assert.deepEqual(backward, forward);
});

test('retention: durations in milliseconds', () => {
  assert.equal(parseDuration('500ms'), 500);
  assert.equal(parseDuration('90s'), 90_000);
  assert.equal(parseDuration('24h'), 86_400_000);
  assert.equal(parseDuration('7d'), 7 * 86_400_000);
  assert.throws(() => parseDuration('1w'), /invalid duration "1w"/);
});
