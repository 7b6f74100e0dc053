// Preloaded into Netlify's CLI (NODE_OPTIONS=--require) by tests/test_netlify.py: a server that
// would listen on every interface (no host given) listens on 127.0.0.1 only, so the test's
// Netlify dev server is reachable from this machine alone. Unix sockets and explicit hosts are
// left as they are.
"use strict";
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const first = args[0];
  if (first !== null && typeof first === "object" && !Array.isArray(first)) {
    if (first.path === undefined && first.host === undefined) args[0] = { ...first, host: "127.0.0.1" };
  } else if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first)) || first === undefined) {
    if (typeof args[1] !== "string") args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
