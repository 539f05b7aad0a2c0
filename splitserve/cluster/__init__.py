"""The cluster: membership and shared state (the MetadataStore, in Redis or embedded in a Ray
actor) and the deployment that starts a serving setup's workers as Ray actors.

Nothing here knows what a worker does: ``Deployment`` is given the actor class of each worker
kind by the serving assembly (splitserve.server).
"""

RAY_NAMESPACE = "splitserve"  # the Ray namespace of every named actor: workers and the embedded store
