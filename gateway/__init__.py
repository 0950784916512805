"""The pacegate gateway: MQTT subscriber, sealed-reading opening, forwarding to the hospital.

Modules: :mod:`gateway.config` (the gateway.yaml schema), :mod:`gateway.pipeline` (the pure
per-message decision), :mod:`gateway.replay_store` (replay windows that survive restarts),
:mod:`gateway.metrics` (Prometheus on loopback), :mod:`gateway.spool` (encrypted
store-and-forward), :mod:`gateway.forwarder` (batches over the PQ channel) and
:mod:`gateway.service` (``pacegate gateway -c FILE``).
"""
