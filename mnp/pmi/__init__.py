"""Direct MPI launch (issue 16): mnp starts every rank itself and serves PMI.

The pieces that are pure live here, beside the node agent's PMI server
(``mnp/agent/pmi.py``, standard library only, since it runs on the nodes):

- ``layout``: which rank runs on which node, the MPMD application numbers, the
  ``PMI_process_mapping`` job attribute and each rank's PMI environment;
- ``exchange``: the controller's side of a PMI barrier, merging the puts that
  every node's agent collected from its ranks into the key-value space that is
  sent back to all of them.
"""
