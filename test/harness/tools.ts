// Finds the binaries the tests start: .tools/bin (where scripts/setup.sh
// installs them) first, then PATH, then the PostgreSQL server folder.
import { existsSync, readdirSync, realpathSync } from 'node:fs';
import path from 'node:path';

export const repositoryRoot = path.resolve(__dirname, '..', '..', '..');
export const toolsBin = path.join(repositoryRoot, '.tools', 'bin');

function searchPath(name: string): string | undefined {
  for (const directory of (process.env.PATH ?? '').split(path.delimiter)) {
    const candidate = path.join(directory, name);
    if (directory && existsSync(candidate)) return candidate;
  }
  return undefined;
}

function postgresBin(): string | undefined {
  const base = '/usr/lib/postgresql';
  if (!existsSync(base)) return undefined;
  const versions = readdirSync(base)
    .filter((name) => /^\d+$/.test(name))
    .sort((a, b) => Number(b) - Number(a));
  return versions.length > 0 ? path.join(base, versions[0], 'bin') : undefined;
}

/**
 * Absolute path of a tool, with links resolved; throws with the setup command
 * when it is missing. Resolving matters for servers started as the postgres
 * user, who may not be allowed into the checkout (a clone in a private
 * temporary folder) where .tools/bin links to the real binaries.
 */
export function tool(name: string): string {
  const local = path.join(toolsBin, name);
  if (existsSync(local)) return realpathSync(local);
  const found = searchPath(name);
  if (found) return found;
  const postgres = postgresBin();
  if (postgres && existsSync(path.join(postgres, name))) return path.join(postgres, name);
  throw new Error(`${name} not found in ${toolsBin} or on PATH; run: bash scripts/setup.sh`);
}
