// Retention: which backups to keep and which to delete, with the rule that
// kept each one. Pure code: workflows and the CLI import it.
//
// The rules follow restic's `forget` as its documentation describes them
// (doc/060_forget.rst in restic's repository). keepLast keeps the N newest
// backups. keepHourly to keepYearly keep the newest backup of each of the N
// newest calendar periods that have one. keepWithin keeps every backup
// within a duration before the newest backup. A backup that any rule keeps
// is kept. docs/design.md lists the differences and their reasons.

import { compareStrings } from './compare';
import type { Plan, RetentionRules } from './plan';

export interface RetentionCandidate {
  /** Backup id; ids sort by time. */
  id: string;
  /** Start time of the backup. */
  time: Date;
  status: 'complete' | 'partial';
  /** True when a restore drill of this backup passed. */
  verified: boolean;
  /** Ids of earlier backups whose folders hold bytes that this backup's artifacts use (`storedIn`). */
  references?: string[];
}

export type KeepRule =
  | 'last'
  | 'hourly'
  | 'daily'
  | 'weekly'
  | 'monthly'
  | 'yearly'
  | 'within'
  | 'newestVerified'
  | 'newestComplete'
  | 'future'
  | 'noRules'
  | 'referenced';

export interface KeepReason {
  rule: KeepRule;
  /** Calendar period of a bucket rule, such as "2026-12-04" for daily or "2026-W49" for weekly. */
  period?: string;
  /** For "referenced": the kept backup whose artifacts are stored in this backup's folder. */
  by?: string;
}

export interface RetentionDecision {
  id: string;
  time: string;
  keep: boolean;
  /** Rules that keep the backup; empty when it is deleted. */
  reasons: KeepReason[];
}

export interface RetentionResult {
  /** One decision per backup, oldest first. */
  decisions: RetentionDecision[];
  keep: string[];
  delete: string[];
  /** Backups dated after `now`: kept and left out of every rule, because their clock or id is wrong. */
  future: string[];
  /** References to backups that are not in the list: their bytes are missing, so a restore of `by` fails. */
  missingReferences: Array<{ by: string; id: string }>;
}

export interface RetentionOptions {
  now: Date;
  /** IANA time zone of the calendar periods. @default "UTC" */
  timeZone?: string;
}

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Returns a plan duration ("500ms", "30s", "10m", "2h", "7d") in milliseconds; a day is 24 hours. */
export function parseDuration(text: string): number {
  const match = /^([1-9]\d*)(ms|s|m|h|d)$/.exec(text);
  if (!match) throw new Error(`invalid duration "${text}": use a positive number and a unit such as "30s", "2h" or "7d"`);
  return Number(match[1]) * DURATION_UNITS[match[2]];
}

/** Returns true when the rules keep anything less than everything. */
export function hasRetentionRules(rules: RetentionRules | undefined): boolean {
  if (!rules) return false;
  return BUCKET_RULES.some(([field]) => rules[field] !== undefined) || rules.keepLast !== undefined || rules.keepWithin !== undefined;
}

type BucketField = 'keepHourly' | 'keepDaily' | 'keepWeekly' | 'keepMonthly' | 'keepYearly';
type BucketRule = 'hourly' | 'daily' | 'weekly' | 'monthly' | 'yearly';

const BUCKET_RULES: ReadonlyArray<[BucketField, BucketRule]> = [
  ['keepHourly', 'hourly'],
  ['keepDaily', 'daily'],
  ['keepWeekly', 'weekly'],
  ['keepMonthly', 'monthly'],
  ['keepYearly', 'yearly'],
];

interface LocalTime {
  year: number;
  month: number;
  day: number;
  hour: number;
}

const formatters = new Map<string, Intl.DateTimeFormat>();

/** Returns the wall-clock year, month, day and hour of `time` in `timeZone`. */
function localTime(time: Date, timeZone: string): LocalTime {
  let formatter = formatters.get(timeZone);
  if (!formatter) {
    formatter = new Intl.DateTimeFormat('en-US', {
      timeZone,
      year: 'numeric',
      month: 'numeric',
      day: 'numeric',
      hour: 'numeric',
      hourCycle: 'h23',
    });
    formatters.set(timeZone, formatter);
  }
  const parts: Record<string, number> = {};
  for (const part of formatter.formatToParts(time)) {
    if (part.type !== 'literal') parts[part.type] = Number(part.value);
  }
  return { year: parts.year, month: parts.month, day: parts.day, hour: parts.hour };
}

const pad = (value: number, width = 2): string => String(value).padStart(width, '0');

/** Returns the ISO 8601 week-numbering year and week of a calendar date. */
function isoWeek(year: number, month: number, day: number): { year: number; week: number } {
  const date = Date.UTC(year, month - 1, day);
  const weekday = (new Date(date).getUTCDay() + 6) % 7;
  // The ISO week belongs to the year that contains its Thursday.
  const thursday = new Date(date + (3 - weekday) * 86_400_000);
  const weekYear = thursday.getUTCFullYear();
  const week = 1 + Math.floor((thursday.getTime() - Date.UTC(weekYear, 0, 1)) / (7 * 86_400_000));
  return { year: weekYear, week };
}

/** Returns the calendar period of `time` for a bucket rule, as a sortable label. */
export function periodOf(rule: BucketRule, time: Date, timeZone: string): string {
  const local = localTime(time, timeZone);
  switch (rule) {
    case 'hourly':
      return `${pad(local.year, 4)}-${pad(local.month)}-${pad(local.day)}T${pad(local.hour)}`;
    case 'daily':
      return `${pad(local.year, 4)}-${pad(local.month)}-${pad(local.day)}`;
    case 'weekly': {
      const week = isoWeek(local.year, local.month, local.day);
      return `${pad(week.year, 4)}-W${pad(week.week)}`;
    }
    case 'monthly':
      return `${pad(local.year, 4)}-${pad(local.month)}`;
    case 'yearly':
      return pad(local.year, 4);
  }
}

/**
 * Decides which backups to keep. Backups dated after `options.now` are kept
 * and reported. The newest verified backup and the newest complete backup
 * are always kept, so is every
 * backup a kept backup references, and with no rules every backup is kept.
 */
export function applyRetention(
  backups: readonly RetentionCandidate[],
  rules: RetentionRules | undefined,
  options: RetentionOptions,
): RetentionResult {
  const timeZone = options.timeZone ?? 'UTC';
  const reasons = new Map<string, KeepReason[]>(backups.map((backup) => [backup.id, []]));
  const keep = (id: string, reason: KeepReason): void => {
    reasons.get(id)!.push(reason);
  };

  const sorted = [...backups].sort((a, b) => a.time.getTime() - b.time.getTime() || compareStrings(a.id, b.id));
  const future = sorted.filter((backup) => backup.time.getTime() > options.now.getTime());
  for (const backup of future) keep(backup.id, { rule: 'future' });
  // Newest first, as restic walks them.
  const current = sorted.filter((backup) => backup.time.getTime() <= options.now.getTime()).reverse();

  if (!hasRetentionRules(rules)) {
    for (const backup of current) keep(backup.id, { rule: 'noRules' });
  } else {
    applyRules(current, rules!, timeZone, keep);
  }

  const newestVerified = current.find((backup) => backup.verified);
  if (newestVerified) keep(newestVerified.id, { rule: 'newestVerified' });
  // Without this, keepLast over backups where one source kept failing
  // would delete the last copy of that source's data. It is named only
  // where no other rule keeps the backup.
  const newestComplete = current.find((backup) => backup.status === 'complete');
  if (newestComplete && reasons.get(newestComplete.id)!.length === 0) keep(newestComplete.id, { rule: 'newestComplete' });

  const missingReferences = keepReferenced(sorted, reasons, keep);

  const decisions = sorted.map((backup) => {
    const kept = reasons.get(backup.id)!;
    return { id: backup.id, time: backup.time.toISOString(), keep: kept.length > 0, reasons: kept };
  });
  return {
    decisions,
    keep: decisions.filter((decision) => decision.keep).map((decision) => decision.id),
    delete: decisions.filter((decision) => !decision.keep).map((decision) => decision.id),
    future: future.map((backup) => backup.id),
    missingReferences,
  };
}

/** Applies keepLast, the bucket rules and keepWithin to backups sorted newest first. */
function applyRules(
  newestFirst: readonly RetentionCandidate[],
  rules: RetentionRules,
  timeZone: string,
  keep: (id: string, reason: KeepReason) => void,
): void {
  if (rules.keepLast !== undefined) {
    for (const backup of newestFirst.slice(0, rules.keepLast)) keep(backup.id, { rule: 'last' });
  }

  for (const [field, rule] of BUCKET_RULES) {
    const count = rules[field];
    if (count === undefined) continue;
    // Backups are sorted, so each period's backups are adjacent.
    const periods: Array<{ period: string; members: RetentionCandidate[] }> = [];
    for (const backup of newestFirst) {
      const period = periodOf(rule, backup.time, timeZone);
      const last = periods[periods.length - 1];
      if (last && last.period === period) last.members.push(backup);
      else periods.push({ period, members: [backup] });
    }
    for (const { period, members } of periods.slice(0, count)) {
      // A complete backup represents its period over a newer partial one.
      const chosen = members.find((backup) => backup.status === 'complete') ?? members[0];
      keep(chosen.id, { rule, period });
    }
  }

  if (rules.keepWithin !== undefined && newestFirst.length > 0) {
    const oldest = newestFirst[0].time.getTime() - parseDuration(rules.keepWithin);
    for (const backup of newestFirst) {
      if (backup.time.getTime() > oldest) keep(backup.id, { rule: 'within' });
    }
  }
}

/** Keeps every backup that a kept backup references, following references of references. */
function keepReferenced(
  sorted: readonly RetentionCandidate[],
  reasons: Map<string, KeepReason[]>,
  keep: (id: string, reason: KeepReason) => void,
): Array<{ by: string; id: string }> {
  const byId = new Map(sorted.map((backup) => [backup.id, backup]));
  const missing: Array<{ by: string; id: string }> = [];
  const pending = sorted.filter((backup) => reasons.get(backup.id)!.length > 0);
  const visited = new Set(pending.map((backup) => backup.id));
  while (pending.length > 0) {
    const backup = pending.pop()!;
    for (const id of new Set(backup.references ?? [])) {
      if (id === backup.id) continue;
      const target = byId.get(id);
      if (!target) {
        missing.push({ by: backup.id, id });
        continue;
      }
      keep(id, { rule: 'referenced', by: backup.id });
      if (!visited.has(id)) {
        visited.add(id);
        pending.push(target);
      }
    }
  }
  return missing.sort((a, b) => compareStrings(a.by, b.by) || compareStrings(a.id, b.id));
}

/** Formats a keep reason for people: "daily 2026-12-04", "referenced by 20261204T...". */
export function describeReason(reason: KeepReason): string {
  switch (reason.rule) {
    case 'last':
      return 'keepLast';
    case 'within':
      return 'keepWithin';
    case 'newestVerified':
      return 'newest verified backup';
    case 'newestComplete':
      return 'newest complete backup';
    case 'future':
      return 'dated in the future';
    case 'noRules':
      return 'no retention rules';
    case 'referenced':
      return `referenced by ${reason.by} (storedIn)`;
    default:
      return `${reason.rule} ${reason.period}`;
  }
}

/**
 * Input of retentionWorkflow. Give exactly one of `plan` (the plan document)
 * or `planFile` (an absolute path the worker can read).
 */
export interface RetentionWorkflowInput {
  plan?: Plan;
  planFile?: string;
  /** Decide and report, but delete nothing. */
  dryRun?: boolean;
}

/** A kept backup and the rules that keep it, formatted by describeReason. */
export interface KeptBackup {
  id: string;
  reasons: string[];
}

/** Report of a retention run: the backups found, kept and deleted (or, in a dry run, to delete). */
export interface RetentionReport {
  plan: string;
  destination: string;
  /** Time the decision was made, ISO 8601. */
  decidedAt: string;
  timeZone: string;
  dryRun: boolean;
  /** Backups found: folders with manifest.json. */
  backups: number;
  kept: KeptBackup[];
  /** Backups deleted, or to delete in a dry run, oldest first. */
  deleted: string[];
  /**
   * Backups that no rule keeps beyond the most one run deletes (the newest
   * of them): left for the next run, so that a report stays within
   * Temporal's payload limits.
   */
  deferred?: number;
  /** Backups dated after decidedAt: kept, because their clock or id is wrong. */
  future: string[];
  /** Backups whose manifest cannot be read: kept for a person to look at. */
  unreadable: Array<{ id: string; error: string }>;
  missingReferences: Array<{ by: string; id: string }>;
  /** Running restore drills that could not say which backup they use. */
  unresolvedDrills: Array<{ workflowId: string; reason: string }>;
  /** Folders of backups that never committed (no manifest.json), older than the grace period. */
  leftovers: Array<{ id: string; objects: number; lastModified: string }>;
  /** Folders without manifest.json that are younger than the grace period: a running backup, or leftovers of later runs. */
  uncommittedRecent?: string[];
  /** Unfinished uploads older than the grace period. */
  staleUploads: Array<{ key: string; uploadId: string; initiated?: string }>;
  /** Ids in `deleted` that a running drill started using before they were deleted, so they were kept. */
  skippedForDrills?: string[];
}
