// Runs the search edge function under Deno for tests/test_search.py: reads {"base", "urls",
// "normalise"} as JSON on stdin, calls the function's Netlify entry point with a Request for each
// base + url (the function fetches the site's shard files from `base`, a `sitegen serve`), and
// prints [{status, headers, body (hex), fetched (the site paths it fetched)}] and the normalised
// strings as JSON.
import handler, { normalise } from "../sitegen/services/neuron2graph/neuron2graph-search.ts";

const input = JSON.parse(await new Response(Deno.stdin.readable).text());
const responses = [];
const realFetch = globalThis.fetch;
let fetched: string[] = [];
globalThis.fetch = (what: string | URL | Request, init?: RequestInit) => {
  fetched.push(new URL(what instanceof Request ? what.url : what).pathname);
  return realFetch(what, init);
};
for (const url of input.urls as string[]) {
  fetched = [];
  const r = await handler(new Request(input.base + url));
  const body = new Uint8Array(await r.arrayBuffer());
  responses.push({
    status: r.status,
    headers: [...r.headers],
    body: Array.from(body, (b) => b.toString(16).padStart(2, "0")).join(""),
    fetched,
  });
}
console.log(JSON.stringify({ responses, normalised: (input.normalise as string[]).map(normalise) }));
