// Finds the document paths that rules produce, from the policy ASTs that
// GET /v1/policies returns. Those paths are virtual documents: the snapshot
// must neither evaluate them (a rule may call http.send, or fail at
// evaluation) nor store their values as base documents.

interface AstTerm {
  type: string;
  value: unknown;
}

interface AstRule {
  head?: { name?: string; ref?: AstTerm[]; args?: AstTerm[] };
}

/** A module as GET /v1/policies returns it. */
export interface PolicyModule {
  id: string;
  raw: string;
  ast?: { package?: { path?: AstTerm[] }; rules?: AstRule[] };
}

/** A node of the tree of rule paths: either a rule, or a prefix of one or more rule paths. */
export class PathNode {
  readonly children = new Map<string, PathNode>();
  rule = false;

  child(key: string): PathNode {
    let node = this.children.get(key);
    if (!node) {
      node = new PathNode();
      this.children.set(key, node);
    }
    return node;
  }

  /** Rule paths at or under this node, as segment arrays relative to it. */
  rulePaths(prefix: string[] = []): string[][] {
    if (this.rule) return [prefix];
    const paths: string[][] = [];
    for (const [key, node] of this.children) paths.push(...node.rulePaths([...prefix, key]));
    return paths;
  }
}

/**
 * Returns the path under `data` of a rule: the package path, then the head's
 * reference up to its first variable. For `a.b[x] := 1` in package p that is
 * p.a.b: the rule owns the whole object at p.a.b. Functions return undefined
 * because they produce no document.
 */
export function rulePath(packagePath: string[], rule: AstRule): string[] | undefined {
  const head = rule.head;
  if (!head || (head.args && head.args.length > 0)) return undefined;
  const reference = head.ref;
  if (!reference || reference.length === 0) {
    return head.name ? [...packagePath, head.name] : undefined;
  }
  const path = [...packagePath];
  for (let index = 0; index < reference.length; index++) {
    const term = reference[index];
    if (index === 0 && term.type === 'var') path.push(String(term.value));
    else if (term.type === 'string') path.push(String(term.value));
    else break;
    // NOTE: for `t[1] := 2` (a number, boolean or null key) the path stops
    // at t, so base documents OPA merges beside the rule (t.x) are not read.
    // A `with` modifier cannot target t[1] alone ("bad document path"), and
    // reading t would evaluate the rule.
  }
  return path;
}

/** Builds the tree of rule paths of all modules. */
export function ruleTree(modules: PolicyModule[]): PathNode {
  const root = new PathNode();
  for (const module of modules) {
    const terms = module.ast?.package?.path ?? [];
    // The first term is the `data` variable.
    const packagePath = terms.slice(1).map((term) => String(term.value));
    // A package that holds only functions still appears in data as an
    // empty object; as a prefix it is read and left out when empty.
    let packageNode = root;
    for (const segment of packagePath) packageNode = packageNode.child(segment);
    for (const rule of module.ast?.rules ?? []) {
      const path = rulePath(packagePath, rule);
      if (!path || path.length === 0) continue;
      let node = root;
      for (const segment of path) node = node.child(segment);
      node.rule = true;
    }
  }
  return root;
}

/** Rego reference text for a path under data, safe for any key: data["a"]["b/c"]. */
export function dataReference(path: readonly string[]): string {
  return `data${path.map((segment) => `[${JSON.stringify(segment)}]`).join('')}`;
}
