"""Simulated ESP32/M5Stack pacemakers: a physiological model, a crash-safe nonce counter,
a small MQTT 3.1.1 client over TLS, and a fleet runner (``pacegate devices``)."""
