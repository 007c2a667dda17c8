// `opa-backup verify` and `opa-backup keygen`. Both run locally, without
// Temporal: verifying a backup must work when the orchestration is down.
import { createPublicKey, generateKeyPairSync } from 'node:crypto';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { generateIdentity } from '../activities/crypto/age';
import { loadPlanFile, PlanError } from '../activities/plan-loader';
import { signingKeyId } from '../activities/signing';
import { verifyStoredBackup, type VerifyCheck } from '../activities/verify';
import { isBackupId } from '../common/layout';
import { PRIMARY_DESTINATION, type Plan } from '../common/plan';
import { listBackups } from './backups';

/** verify: every check passed. */
export const EXIT_VERIFIED = 0;
/** verify: invalid usage or plan. */
export const EXIT_VERIFY_USAGE = 2;
/** verify: at least one object is damaged (missing, truncated, changed, not of its format). */
export const EXIT_DAMAGED = 4;
/** verify: an object could not be read here (no such backup, wrong key, store unreachable), and none is known damaged. */
export const EXIT_UNREADABLE = 5;

function loadPlan(file: string): Plan | number {
  try {
    return loadPlanFile(file);
  } catch (error) {
    if (error instanceof PlanError) {
      console.error(`opa-backup: invalid plan:\n${error.message}`);
      return EXIT_VERIFY_USAGE;
    }
    throw error;
  }
}

function formatCheck(check: VerifyCheck): string {
  const marks = { ok: 'ok', damaged: 'DAMAGED', unreadable: 'UNREADABLE' } as const;
  const mark = marks[check.outcome];
  return `  ${mark.padEnd(10)} ${check.outcome === 'ok' ? `${check.object}: ${check.message}` : check.message}`;
}

async function verifyCommand(backup: string, options: { plan: string; identity?: string; json?: boolean; destination?: string }): Promise<number> {
  // Should the checks ever stall and the event loop drain, the process
  // exits "cannot read", never 0.
  process.exitCode = EXIT_UNREADABLE;
  const plan = loadPlan(options.plan);
  if (typeof plan === 'number') return plan;
  if (options.identity !== undefined && !/^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$/.test(options.identity)) {
    console.error(`opa-backup: --identity "${options.identity}" is not a secret reference; use file:PATH (an age identity file) or env:NAME`);
    return EXIT_VERIFY_USAGE;
  }
  const names = [PRIMARY_DESTINATION, ...(plan.replicas ?? []).map((replica) => replica.name)];
  if (options.destination !== undefined && !names.includes(options.destination)) {
    console.error(`opa-backup: --destination "${options.destination}" is not a destination of plan ${plan.name}; use one of ${names.join(', ')}`);
    return EXIT_VERIFY_USAGE;
  }
  let backupId = backup;
  if (backup === 'latest') {
    const backups = await listBackups(plan);
    // The newest backup with a manifest, readable or not, as drills choose it:
    // an unreadable newest manifest is a finding, not a reason to check an older backup.
    const newest = [...backups].filter((entry) => options.destination === undefined || entry.destinations.includes(options.destination)).pop();
    if (!newest) {
      console.error(`opa-backup: plan ${plan.name} has no backup in ${backups.destination}`);
      return EXIT_UNREADABLE;
    }
    backupId = newest.backupId;
  } else if (!isBackupId(backup)) {
    console.error(`opa-backup: "${backup}" is not a backup id (such as 20261204T194512Z-3f9a1c2b) or "latest"; run "opa-backup list --plan ${options.plan}"`);
    return EXIT_VERIFY_USAGE;
  }
  const print = options.json ? () => undefined : (check: VerifyCheck) => console.log(formatCheck(check));
  if (!options.json) console.log(`verifying backup ${backupId} of plan ${plan.name}`);
  const report = await verifyStoredBackup(plan, backupId, { identity: options.identity, onCheck: print, where: 'here', destination: options.destination });
  if (options.json) console.log(JSON.stringify(report, null, 2));
  else {
    console.log(`backup ${backupId}: ${report.outcome === 'ok' ? 'verified' : report.outcome}`);
    if (report.outcome === 'ok' && !report.plaintextChecked) {
      console.log('  stored digests only: give --identity (or set encryption.identity) to decrypt and check contents');
    }
  }
  const exitCodes = { ok: EXIT_VERIFIED, damaged: EXIT_DAMAGED, unreadable: EXIT_UNREADABLE } as const;
  return exitCodes[report.outcome];
}

/** Writes an age identity and an Ed25519 signing key pair into `directory`; refuses to overwrite. */
function keygenCommand(directory: string): number {
  const files = {
    identity: path.join(directory, 'age-identity.txt'),
    recipient: path.join(directory, 'age-recipient.txt'),
    signingKey: path.join(directory, 'signing-key.pem'),
    verifyKey: path.join(directory, 'signing-key.pub.pem'),
  };
  const existing = Object.values(files).filter((file) => existsSync(file));
  if (existing.length > 0) {
    console.error(`opa-backup: ${existing.join(', ')} exist already; keygen never overwrites keys. Choose another directory`);
    return EXIT_VERIFY_USAGE;
  }
  mkdirSync(directory, { recursive: true, mode: 0o700 });
  const identity = generateIdentity();
  const recipient = identity.recipient.toString();
  const created = new Date().toISOString();
  writeFileSync(files.identity, `# created: ${created}\n# public key: ${recipient}\n${identity.encodeSecret()}\n`, { mode: 0o600, flag: 'wx' });
  writeFileSync(files.recipient, `${recipient}\n`, { flag: 'wx' });
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  writeFileSync(files.signingKey, privateKey.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600, flag: 'wx' });
  writeFileSync(files.verifyKey, publicKey.export({ format: 'pem', type: 'spki' }), { flag: 'wx' });
  console.log(`wrote ${files.identity} (secret: keep it away from backup workers)`);
  console.log(`wrote ${files.recipient}`);
  console.log(`wrote ${files.signingKey} (secret: for the worker that seals backups)`);
  console.log(`wrote ${files.verifyKey} (key id ${signingKeyId(createPublicKey(privateKey))})`);
  console.log('plan fields:');
  console.log(`  encryption:\n    recipients: ["${recipient}"]\n    identity: file:${files.identity}`);
  console.log(`  signing:\n    key: file:${files.signingKey}\n    publicKeyFile: ${files.verifyKey}`);
  return 0;
}

/** Adds `verify` and `keygen` to the program. */
export function addVerifyCommands(program: Command): void {
  program
    .command('verify')
    .description('check a stored backup: signature, sizes, digests and, with an identity, contents and formats')
    .argument('<backup>', 'backup id, or "latest"')
    .requiredOption('--plan <file>', 'backup plan (YAML)')
    .option('--identity <reference>', 'age identity to decrypt with, as file:PATH or env:NAME (default: encryption.identity of the plan)')
    .option('--destination <name>', 'check the copy in this destination only: "primary" or a replica\'s name (default: each object from the first destination that has it)')
    .option('--json', 'print the report as JSON')
    .action(async (backup: string, options) => {
      process.exitCode = await verifyCommand(backup, options);
    });

  program
    .command('keygen')
    .description('create an age identity and an Ed25519 manifest signing key in a directory')
    .requiredOption('--out <directory>', 'directory for the key files (created 0700)')
    .action((options: { out: string }) => {
      process.exitCode = keygenCommand(options.out);
    });
}
