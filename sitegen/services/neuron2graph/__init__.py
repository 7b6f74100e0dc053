"""The neuron2graph service (issue 4). So far: the graph core (graph.py). Its compute half (prune,
saliency, augmentation on the model) and render half are not written yet, so the service is not
in the registry."""
