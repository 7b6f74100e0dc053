// Times the search edge function under Deno for benchmarks/search.py: reads {"site", "model",
// "queries"} as JSON on stdin and answers each query through the function's answer() with the
// site's files read from disk once and then kept in memory (on Netlify they are fetched; waiting
// for them is not counted against its 50 ms CPU limit per request, nor here). Per query it reports
// the best of 3 runs: wall time and the process's CPU time (the figure Netlify's limit counts),
// the answer's size and its number of neurons.
import process from "node:process";
import { answer } from "../sitegen/services/neuron2graph/neuron2graph-search.ts";

const input = JSON.parse(await new Response(Deno.stdin.readable).text());
const files = new Map<string, Uint8Array | null>();
async function get(path: string): Promise<Response> {
  if (!files.has(path)) {
    try { files.set(path, await Deno.readFile(input.site + decodeURIComponent(path))); } catch { files.set(path, null); }
  }
  const data = files.get(path);
  return data ? new Response(data.slice()) : new Response("Not Found", { status: 404 });
}
const cpuMs = () => { const c = process.cpuUsage(); return (c.user + c.system) / 1000; };
const out = [];
for (const query of input.queries as string[]) {
  const pathname = `/api/${input.model}/neuron2graph-search`;
  await (await answer(pathname, query, get)).arrayBuffer(); // reads the files
  let ms = Infinity, cpu = Infinity, body = new Uint8Array(0), status = 0;
  for (let run = 0; run < 3; run++) {
    const wall0 = performance.now(), cpu0 = cpuMs();
    const r = await answer(pathname, query, get);
    body = new Uint8Array(await r.arrayBuffer());
    ms = Math.min(ms, performance.now() - wall0);
    cpu = Math.min(cpu, cpuMs() - cpu0);
    status = r.status;
  }
  const neurons = body.reduce((n, b) => n + (b === 0x7b ? 1 : 0), 0); // one "{" per neuron
  out.push({ query, ms, cpu, status, bytes: body.byteLength, neurons });
}
console.log(JSON.stringify(out));
