"""The neuron2graph service (Foote et al. 2023): compute.py prunes, takes saliency and augments
each neuron's top examples on the model (torch); graph.py builds and evaluates the trie (pure
Python); tokenstore.py holds the token search; render.py and service.py publish the graphs."""
