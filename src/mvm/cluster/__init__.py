"""Many hosts on Ray: one host actor per machine in front of its mvmd, and a cluster
front that serves `mvmctl serve`'s API and routes each sandbox to its host (docs/cluster.md).

Ray is an optional extra (``mvm[ray]``): only :mod:`mvm.cluster.placement` and
:mod:`mvm.cluster.state` import without it.
"""
