// Pure helpers that workflows may import.

/** Orders strings by UTF-16 code units, for stable output independent of locale. */
export function compareStrings(a: string, b: string): number {
  if (a < b) return -1;
  if (a > b) return 1;
  return 0;
}
