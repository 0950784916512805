"""The operator layer: the pacegate command, the stack, the demo, capture, the work directory.

The only code that imports the components (device_sim, broker, gateway, hospital, cloud);
they and the shared core (pacegate) never import it.
"""
