// Runs the search edge function under Deno for tests/test_search.py: reads {"base", "urls",
// "normalise"} as JSON on stdin, calls the function's Netlify entry point with a Request for each
// base + url (the function fetches the site's shard files from `base`, a `sitegen serve`), and
// prints [{status, headers, body (hex)}] and the normalised strings as JSON.
import handler, { normalise } from "../netlify/edge-functions/neuron2graph-search.ts";

const input = JSON.parse(await new Response(Deno.stdin.readable).text());
const responses = [];
for (const url of input.urls as string[]) {
  const r = await handler(new Request(input.base + url));
  const body = new Uint8Array(await r.arrayBuffer());
  responses.push({
    status: r.status,
    headers: [...r.headers],
    body: Array.from(body, (b) => b.toString(16).padStart(2, "0")).join(""),
  });
}
console.log(JSON.stringify({ responses, normalised: (input.normalise as string[]).map(normalise) }));
