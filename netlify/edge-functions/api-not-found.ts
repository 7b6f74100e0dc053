// Every URL under /api/ that the static site does not have (an unknown model, service, layer or
// neuron, or a service the model lacks) answers 404 with a JSON body, as DeepDecipher's server
// does, instead of the site's HTML 404 page. A redirect rule cannot do this on Netlify: the
// `/api/* -> /api/:splat.json 200` rewrite matches every such URL, and a rewrite to a missing
// file answers the 404 page without trying later rules. So this function lets the request go on
// (rules, static files) and replaces only a 404 answer's body and Content-Type, keeping its
// status and netlify.toml's headers (CORS included).
//
// Declared in netlify.toml after neuron2graph-search, which answers its own URL (so its JSON
// errors pass through untouched). `sitegen serve` does the same in sitegen/site/edge.py
// (NOT_FOUND_BODY; tests/test_netlify.py compares the two servers). Change both together.

type Next = { next: () => Promise<Response> };

export const BODY = JSON.stringify({
  error: "no such API URL: /api lists the models and each model's services; /api/openapi.json describes every URL",
});

export default async function handler(request: Request, context: Next): Promise<Response> {
  const response = await context.next();
  if (response.status !== 404) return response;
  const headers = new Headers(response.headers);
  headers.set("Content-Type", "application/json; charset=utf-8");
  for (const stale of ["Content-Length", "ETag", "Content-Encoding"]) headers.delete(stale); // they described the HTML page
  return new Response(request.method === "HEAD" ? null : BODY, { status: 404, headers });
}
