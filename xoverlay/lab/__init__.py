"""The namespace lab: nodes, an underlay switch, the demo network, service and client."""
