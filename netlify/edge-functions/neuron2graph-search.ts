// Netlify bundles edge functions from this folder only; this one's module lives in its service's
// folder (Service.edge_functions), so this entry re-exports it (sitegen.site.edge.netlify_entry).
export { default } from "../../sitegen/services/neuron2graph/neuron2graph-search.ts";
