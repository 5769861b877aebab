"""Placement: where the workers of a plan run.

``placement.engine: local`` (the default) starts every worker on this host
(``hetsched.runtime.workers.local_launcher``). ``placement.engine: ray`` places each cluster on the
Ray node it names (``clusters: {a_big: {node: board-a, cores: [...]}}``; a node is matched by the
custom resource ``hetsched_node_<name>`` that its ``ray start --resources`` declares):

* ``nodes``        the Ray nodes hetsched can use, from ``ray.nodes()`` (pure parsing)
* ``cores``        planner-facing core ids when several nodes use the same ids (pure)
* ``ray_cluster``  connecting to Ray, a task on a named node, each node's topology from its sysfs
* ``ray_workers``  stage workers as Ray actors, pinned before their session (a launcher)
* ``ray_profile``  profiling a cluster in a Ray actor on its node, pinned to its cores
* ``probe``        a quick CURVE tcp:// echo per node at start: each link's latency and bandwidth
* ``ray_placement`` everything above for one run of the service (``hetsched.runtime.service``)

Ray places and supervises processes; the data path stays hetsched's own (ZeroMQ, CURVE on tcp://,
shared memory on the coordinator's node): see README, "Several boards on Ray".
"""
