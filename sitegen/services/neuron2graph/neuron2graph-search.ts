// DeepDecipher's search URL, /api/<model>/neuron2graph-search?query=type:token[,type:token...],
// as a Netlify Edge Function (Deno): neuron2graph's, declared by its hook (Neuron2Graph.edge_functions)
// and in netlify.toml ([[edge_functions]]). Netlify bundles it through the one-line entry module
// netlify/edge-functions/neuron2graph-search.ts, which re-exports this module's default.
//
// It holds no data: it reads the same static files the site's search page reads
// (search/<model>/meta.json, tokens/<shard>.json, more/<shard>-<k>.json; sitegen/site/search.py
// writes them) from the deployed site and computes the answer. `sitegen serve` answers the same
// URL with edge.py beside this file, a Python port; tests/test_search.py runs both on every query
// of a small site and requires identical status, headers and bytes. Change both together.

type Get = (path: string) => Promise<Response>;
type Entry = { a: number[]; i: number[]; na: number; ni: number; m?: number };

const HEADERS = {
  "Content-Type": "application/json",
  "Access-Control-Allow-Origin": "*",
  "Cache-Control": "public, max-age=300",
  // Netlify's CDN keeps the answer until the next deploy purges it, keyed on ?query= only.
  "Netlify-CDN-Cache-Control": "public, max-age=31536000, must-revalidate",
  "Netlify-Vary": "query=query",
  // netlify.toml's site-wide security headers: Netlify does not add them to this response.
  "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
  "X-Content-Type-Options": "nosniff",
  "X-Frame-Options": "DENY",
  "Referrer-Policy": "no-referrer",
  "Permissions-Policy": "interest-cohort=()",
};
const KINDS = ["any", "activating", "important"];
const USAGE = "missing ?query=: ask for type:token[,type:token...] with type any, activating or important, " +
  "e.g. ?query=any:the or ?query=any:the,activating:of (terms combine by AND)";

const EMPTY = new Int32Array(0);

function reply(status: number, body: string | Uint8Array<ArrayBuffer>): Response {
  return new Response(body, { status, headers: HEADERS });
}
function error(status: number, message: string): Response {
  return reply(status, JSON.stringify({ error: message }));
}

// ---- Neuron2Graph's token normalisation, exactly as Python's sitegen...graph.normalise ----
// (str.istitle, str.isalpha, str.strip and str.lower have Python's definitions, not JavaScript's.)
const PY_SPACE = "\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008" +
  "\u2009\u200a\u2028\u2029\u202f\u205f\u3000";
function pyStrip(t: string): string {
  const chars = Array.from(t);
  let start = 0, end = chars.length;
  while (start < end && PY_SPACE.includes(chars[start])) start++;
  while (end > start && PY_SPACE.includes(chars[end - 1])) end--;
  return chars.slice(start, end).join("");
}
const UPPER_OR_TITLE = /^[\p{Uppercase}\p{Lt}]$/u, LOWER = /^\p{Lowercase}$/u, LETTER = /\p{L}/u;
function pyIsTitle(t: string): boolean {
  let previousCased = false, cased = false;
  for (const ch of t) {
    if (UPPER_OR_TITLE.test(ch)) {
      if (previousCased) return false;
      previousCased = cased = true;
    } else if (LOWER.test(ch)) {
      if (!previousCased) return false;
      previousCased = cased = true;
    } else previousCased = false;
  }
  return cased;
}
export function normalise(token: string): string {
  const n = Array.from(token).length;
  if (n > 1 && pyIsTitle(token)) token = token.toLowerCase();
  if (n > 1 && LETTER.test(token)) token = pyStrip(token);
  return token;
}

// Terms in one query (tokenstore.MAX_TERMS): each distinct term costs up to two fetches.
export const MAX_TERMS = 16;

// Two terms with a space, not a comma, between them (tokenstore._JOINED): matched on the
// ASCII-lower-cased term; whitespace right at the start belongs to a token (" the").
const JOINED = /[^ \t\r\n][ \t\r\n]+(?:any|activating|important):/;
const asciiLower = (t: string) => t.replace(/[A-Z]/g, (c) => c.toLowerCase());

// DeepDecipher's syntax, as sitegen.services.neuron2graph.tokenstore.parse_query (same messages):
// at most MAX_TERMS terms as written, repeated terms (after normalisation) kept once.
export function parseQuery(query: string): [string, string][] {
  const n = query.split(",").length;
  if (n > MAX_TERMS) {
    throw new Error(`too many terms (${n}) in the query: ask for at most ${MAX_TERMS} type:token terms, e.g. any:the,activating:of`);
  }
  const terms: [string, string][] = [], seen = new Set<string>();
  for (const raw of query.split(",")) {
    if (pyStrip(raw) === "") throw new Error(`empty term in ${JSON.stringify(query)}: write type:token, e.g. any:the`);
    if (JOINED.test(asciiLower(raw))) {
      throw new Error(`two terms in ${JSON.stringify(raw)} with no comma between them: join terms with commas, e.g. any:the,any:of`);
    }
    const at = raw.indexOf(":");
    let kind = "any", token = raw;
    if (at >= 0) {
      kind = pyStrip(raw.slice(0, at)).toLowerCase();
      token = raw.slice(at + 1);
    }
    if (!KINDS.includes(kind)) {
      throw new Error(`unknown type ${JSON.stringify(kind)} in ${JSON.stringify(raw)}: use any, activating or important, e.g. any:the`);
    }
    if (token === "") throw new Error(`no token after ${JSON.stringify(kind)}: write ${kind}:token`);
    const term: [string, string] = [kind, normalise(token)], key = JSON.stringify(term);
    if (!seen.has(key)) {
      seen.add(key);
      terms.push(term);
    }
  }
  return terms;
}

export function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(text)) h = Math.imul(h ^ byte, 0x01000193) >>> 0;
  return h >>> 0;
}

// Lists are sorted Int32Arrays: at GPT-2 XL scale a common token's list holds ~200,000 neurons,
// and Netlify allows 50 ms of CPU per request.
function undelta(d: number[]): Int32Array {
  const out = new Int32Array(d.length);
  let x = 0;
  for (let k = 0; k < d.length; k++) out[k] = x += d[k];
  return out;
}
function union(a: Int32Array, b: Int32Array): Int32Array {
  const out = new Int32Array(a.length + b.length);
  let x = 0, y = 0, n = 0;
  while (x < a.length && y < b.length) {
    if (a[x] < b[y]) out[n++] = a[x++];
    else if (b[y] < a[x]) out[n++] = b[y++];
    else { out[n++] = a[x++]; y++; }
  }
  while (x < a.length) out[n++] = a[x++];
  while (y < b.length) out[n++] = b[y++];
  return out.subarray(0, n);
}
function intersect(a: Int32Array, b: Int32Array): Int32Array {
  const out = new Int32Array(Math.min(a.length, b.length));
  let x = 0, y = 0, n = 0;
  while (x < a.length && y < b.length) {
    if (a[x] < b[y]) x++;
    else if (b[y] < a[x]) y++;
    else { out[n++] = a[x++]; y++; }
  }
  return out.subarray(0, n);
}

// [{"layer":L,"neuron":N},...] written into bytes (ASCII only): at ~200,000 neurons, building a
// string per neuron and joining them took longer than Netlify's whole CPU allowance.
function neuronsJSON(ids: Int32Array, layerSize: number): Uint8Array<ArrayBuffer> {
  const last = ids.length ? ids[ids.length - 1] : 0;
  const out = new Uint8Array(2 + ids.length * (22 + String(Math.floor(last / layerSize)).length + String(layerSize).length));
  let p = 0, layer = -1, prefix = new Uint8Array(0);
  out[p++] = 0x5b; // [
  for (let k = 0; k < ids.length; k++) {
    const l = Math.floor(ids[k] / layerSize);
    if (l !== layer) {
      layer = l;
      prefix = Uint8Array.from('{"layer":' + l + ',"neuron":', (c) => c.charCodeAt(0));
    }
    if (k > 0) out[p++] = 0x2c; // ,
    out.set(prefix, p);
    p += prefix.length;
    let n = ids[k] - l * layerSize, digits = 1;
    for (let t = n; t >= 10; t = (t / 10) | 0) digits++;
    for (let j = p + digits - 1; j >= p; j--, n = (n / 10) | 0) out[j] = 48 + (n % 10);
    p += digits;
    out[p++] = 0x7d; // }
  }
  out[p++] = 0x5d; // ]
  return out.subarray(0, p);
}

class SiteError extends Error {}
async function readJSON(path: string, r: Response): Promise<any> {
  if (r.ok) {
    try { return await r.json(); } catch { /* reported below */ }
  }
  throw new SiteError(`the site's search file ${path} is missing or broken; rebuild the site`);
}
async function getJSON(get: Get, path: string): Promise<any> {
  return await readJSON(path, await get(path));
}

const PATH = /^\/api\/([^/]+)\/neuron2graph-search\/?$/;

/** The answer to PATHNAME?QUERY (query = the value of ?query=, or null), reading site files through GET. */
export async function answer(pathname: string, query: string | null, get: Get): Promise<Response> {
  const m = PATH.exec(pathname);
  let model: string | null = null;
  if (m) {
    try { model = decodeURIComponent(m[1]); } catch { model = null; }
  }
  if (model === null || model === "." || model === ".." || /[/\\\x00-\x1f\x7f]/.test(model)) {
    return error(404, "no such search URL: ask /api/<model>/neuron2graph-search?query=any:the (the models are listed at /api)");
  }
  if (query === null) return error(404, USAGE);
  let terms: [string, string][];
  try { terms = parseQuery(query); } catch (e) { return error(400, (e as Error).message); }
  const base = `/search/${encodeURIComponent(model)}/`;
  const metaResponse = await get(base + "meta.json");
  if (metaResponse.status === 404) return error(404, `no model ${JSON.stringify(model)} on this site (the models are listed at /api)`);
  try {
    const meta = await readJSON(base + "meta.json", metaResponse);
    // each shard and "more" file is fetched once per request, however many terms need it
    const files = new Map<string, Promise<any>>();
    const load = (path: string) => {
      if (!files.has(path)) files.set(path, getJSON(get, path));
      return files.get(path)!;
    };
    const lists = await Promise.all(terms.map(async ([kind, token]) => {
      const shard = fnv1a(token) % meta.shards;
      const body: Record<string, Entry> = await load(`${base}tokens/${shard}.json`);
      if (!Object.prototype.hasOwnProperty.call(body, token)) return EMPTY;
      const e = body[token];
      // a list capped in the shard is read whole from the token's "more" file
      const capped = (kind !== "important" && e.na > e.a.length) || (kind !== "activating" && e.ni > e.i.length);
      const whole: { a: number[]; i: number[] } = capped ? await load(`${base}more/${shard}-${e.m}.json`) : e;
      const a = kind === "important" ? EMPTY : undelta(whole.a), i = kind === "activating" ? EMPTY : undelta(whole.i);
      return kind === "activating" ? a : kind === "important" ? i : union(a, i);
    }));
    return reply(200, neuronsJSON(lists.reduce(intersect), meta.layer_size));
  } catch (e) {
    if (e instanceof SiteError) return error(500, e.message);
    throw e;
  }
}

/** Netlify's entry point: the site's files are fetched from the site itself (same origin). */
export default async function handler(request: Request): Promise<Response> {
  const url = new URL(request.url);
  return await answer(url.pathname, url.searchParams.get("query"), (path) => fetch(new URL(path, url)));
}
